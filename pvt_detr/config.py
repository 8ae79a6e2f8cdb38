"""The detector's configuration: every model, matcher, loss and evaluation-resize setting, at the paper's values.

`ModelConfig` is the one source of these defaults: `main.py`'s flags, `build_model`, `hubconf.py`, the inference
API and the benchmark all read them from here. Each field's metadata holds its help text, its valid range or
choices, and whether it is part of the architecture (a checkpoint only fits a model with the same values).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

MAX_NUM_CLASSES = 10_000  # class outputs a head may have (LVIS has 1,203 categories)
POSITION_EMBEDDINGS = {"sine": "sine", "v2": "sine", "learned": "learned", "v3": "learned"}  # DETR's names too


def setting(default: Any, help: str, *, low: float | None = None, high: float | None = None,
            low_open: bool = False, high_open: bool = False, choices: tuple | None = None,
            length: int | None = None, arch: bool = False, path: bool = False):
    """A dataclass field with its help text, valid range [low, high] (`*_open`: that end excluded), choices, the
    length of a tuple value, `arch`: whether checkpoints must agree on it, and `path`: a file or folder name."""
    return field(default=default, metadata={"help": help, "low": low, "high": high, "low_open": low_open,
                                            "high_open": high_open, "choices": choices, "length": length,
                                            "arch": arch, "path": path})


def check_value(name: str, value: Any, meta: dict) -> None:
    """Raises ValueError (one line naming `--name`) unless `value` is finite and within the field's range/choices."""
    values = value if isinstance(value, (tuple, list)) else (value,)
    if meta.get("length") is not None and len(values) != meta["length"]:
        raise ValueError(f"--{name} needs {meta['length']} values (one per stage), got {len(values)}: "
                         f"{','.join(map(str, values))}")
    if isinstance(value, (tuple, list)) and not values:
        raise ValueError(f"--{name} needs at least one value")
    choices = meta.get("choices")
    for v in values:
        if v is None:
            continue
        if choices is not None:
            if v not in choices:
                raise ValueError(f"--{name} {v!r} is not one of {', '.join(map(str, choices))}")
            continue
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"--{name} must be a finite number, got {v}")
        low, high = meta.get("low"), meta.get("high")
        if low is not None and (v < low or (meta.get("low_open") and v == low)):
            raise ValueError(f"--{name} must be {'>' if meta.get('low_open') else '>='} {low:g}, got {v}")
        if high is not None and (v > high or (meta.get("high_open") and v == high)):
            raise ValueError(f"--{name} must be {'<' if meta.get('high_open') else '<='} {high:g}, got {v}")


@dataclass(frozen=True)
class ModelConfig:
    """PVT + DETR: backbone, transformer, heads, matcher, loss and the evaluation resize (the paper's recipe)."""

    # Backbone.
    backbone: str = setting("pvt_small", "PVT variant (pvt_detr.list_backbones())", arch=True)
    drop_path: float = setting(0.1, "stochastic depth rate of the backbone", low=0, high=1, high_open=True)
    backbone_stages: tuple[int, ...] = setting(
        (4,), "backbone stages feeding DETR (comma-separated, 1-4); the paper uses stage 4 only", low=1, high=4,
        arch=True)
    sr_ratios: tuple[int, ...] = setting(
        (8, 4, 2, 1), "spatial-reduction ratio of each of the 4 stages; smaller ones give small images more keys",
        low=1, high=64, length=4, arch=True)
    local_layers: tuple[int, ...] = setting(
        (0, 0, 0, 0), "3 x 3 neighbourhood-attention layers after the patch embedding of each of the 4 stages "
        "(0,0,0,0 = PVT v1; not in the paper, used by the demo)", low=0, high=16, length=4, arch=True)
    grad_checkpointing: bool = setting(
        True, "recompute the backbone blocks' activations and the encoder's attention maps in backward instead "
        "of keeping them (less memory, a few % more compute)")

    # Transformer (facebookresearch/detr's defaults).
    hidden_dim: int = setting(256, "transformer width d_model", low=2, high=8192, arch=True)
    nheads: int = setting(8, "attention heads", low=1, high=256, arch=True)
    enc_layers: int = setting(6, "encoder layers", low=0, high=100, arch=True)
    dec_layers: int = setting(6, "decoder layers", low=1, high=100, arch=True)
    dim_feedforward: int = setting(2048, "FFN hidden size", low=1, high=65536, arch=True)
    dropout: float = setting(0.1, "transformer dropout", low=0, high=1, high_open=True)
    num_queries: int = setting(100, "object queries", low=1, high=10000, arch=True)
    position_embedding: str = setting(
        "sine", "encoder token positions: DETR's sine encoding (v2) or learned row/column embeddings (v3; at most "
        "50 x 50 feature cells)", choices=tuple(POSITION_EMBEDDINGS), arch=True)
    pre_norm: bool = setting(False, "pre-norm transformer layers", arch=True)
    aux_loss: bool = setting(True, "per-layer aux losses")

    # Opt-in convergence aids (not in the paper's recipe; the demo uses them).
    anchor_queries: bool = setting(
        False, "queries own learned reference boxes (DAB-DETR style): query position = MLP(sine(box)), boxes "
        "predicted as offsets to them; off = DETR's learned query embeddings", arch=True)
    anchor_size: float = setting(0.25, "initial width/height of the reference boxes (fraction of the image)",
                                 low=0, high=1, low_open=True, high_open=True)
    two_stage: bool = setting(
        False, "Deformable DETR two-stage (needs --anchor_queries): encoder tokens predict boxes with the set "
        "loss; the --num_queries best become the decoder's reference boxes", arch=True)
    two_stage_repeat: int = setting(
        1, "--two_stage: match each target to this many encoder tokens (H-DETR one-to-many); 1 = one-to-one",
        low=1, high=100)
    focal_loss: bool = setting(
        False, "sigmoid focal classification loss (Deformable DETR) with a K-way sigmoid head and top-100 "
        "(query, class) post-processing instead of softmax CE with no-object", arch=True)
    focal_alpha: float = setting(0.25, "alpha of --focal_loss", low=0, high=1)
    num_classes: int | None = setting(
        None, f"class outputs: max category id + 1 (at most {MAX_NUM_CLASSES}); default: from the annotation file",
        low=1, high=MAX_NUM_CLASSES, arch=True)

    # Matcher and loss (DETR's).
    set_cost_class: float = setting(1.0, "matching cost: class", low=0, high=1e4)
    set_cost_bbox: float = setting(5.0, "matching cost: L1 box", low=0, high=1e4)
    set_cost_giou: float = setting(2.0, "matching cost: GIoU", low=0, high=1e4)
    cls_loss_coef: float = setting(1.0, "loss weight: classification", low=0, high=1e4)
    bbox_loss_coef: float = setting(5.0, "loss weight: L1 box", low=0, high=1e4)
    giou_loss_coef: float = setting(2.0, "loss weight: GIoU", low=0, high=1e4)
    eos_coef: float = setting(0.1, "relative weight of the no-object class", low=0, high=1, low_open=True)

    # Evaluation resize (also what the inference API applies).
    test_size: int = setting(800, "evaluation short side", low=1, high=8192)
    max_size: int = setting(1333, "longest side after resizing", low=1, high=8192)

    def __post_init__(self):
        self.validate()
        # DETR's aliases (v2, v3) stored under one name, so that checkpoints compare equal.
        object.__setattr__(self, "position_embedding", POSITION_EMBEDDINGS[self.position_embedding])

    def validate(self) -> None:
        """Raises ValueError (one line naming the flag) for a value `build_model` cannot use."""
        for f in dataclasses.fields(self):
            check_value(f.name, getattr(self, f.name), f.metadata)
        from pvt_detr.backbone.registry import list_backbones

        if self.backbone not in list_backbones():
            raise ValueError(f"--backbone {self.backbone!r} is not one of {', '.join(list_backbones())}")
        if self.hidden_dim % self.nheads or self.hidden_dim % 2:
            raise ValueError(f"--hidden_dim {self.hidden_dim} must be even and divisible by --nheads {self.nheads}")
        if len(set(self.backbone_stages)) != len(self.backbone_stages):
            raise ValueError(f"--backbone_stages lists a stage twice: {','.join(map(str, self.backbone_stages))}")
        if self.two_stage and not self.anchor_queries:
            raise ValueError("--two_stage needs --anchor_queries")
        if self.set_cost_class == self.set_cost_bbox == self.set_cost_giou == 0:
            raise ValueError("--set_cost_class, --set_cost_bbox and --set_cost_giou are all 0: nothing to match on")

    @classmethod
    def architecture_fields(cls) -> list[str]:
        """Names of the fields a checkpoint's weights depend on."""
        return [f.name for f in dataclasses.fields(cls) if f.metadata["arch"]]

    @classmethod
    def from_any(cls, source: Any, **overrides) -> ModelConfig:
        """A ModelConfig from a ModelConfig, a mapping or an object with attributes (e.g. parsed flags); fields it
        lacks keep their defaults. Values are type-checked (ValueError naming the field)."""
        if isinstance(source, ModelConfig):
            values = dataclasses.asdict(source)
        elif isinstance(source, dict):
            values = dict(source)
        else:
            values = vars(source)
        values.update(overrides)
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in values:
                kwargs[f.name] = coerce(f.name, values[f.name], f.default)
        return cls(**kwargs)

    def to_dict(self) -> dict:
        """Plain Python types (tuples as lists), as stored in checkpoints."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def coerce(name: str, value: Any, default: Any) -> Any:
    """`value` converted to the type of the field whose default is `default`; ValueError naming `--name` if it
    cannot be (e.g. a string for a number, a float for a count, a bool for a number)."""
    def fail(expected: str):
        raise ValueError(f"--{name}: expected {expected}, got {value!r}")

    if isinstance(default, bool):
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if isinstance(default, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            fail("a list of integers")
        return tuple(coerce(name, v, 0) for v in value)
    if isinstance(default, int) or (default is None and name == "num_classes"):
        if value is None and default is None:
            return None
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                fail("an integer")
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an integer")
        return value
    if isinstance(default, float):
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                fail("a number")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail("a number")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            fail("a string")
        return value
    return value


def stored_config(state: Any, source: str) -> ModelConfig:
    """The ModelConfig a pvt-detr checkpoint (`{'model', 'config', ...}`) was trained with. ValueError (one line
    naming `source`) when the stored configuration is missing, lacks an architecture field or holds a value of the
    wrong type or range."""
    config = state.get("config") if isinstance(state, dict) else None
    if not isinstance(config, dict):
        raise ValueError(f"{source}: holds no stored configuration (not a pvt-detr training checkpoint)")
    missing = [name for name in ModelConfig.architecture_fields() if name not in config and name != "num_classes"]
    if missing or config.get("num_classes") is None:
        raise ValueError(f"{source}: its stored configuration lacks {', '.join(missing or ['num_classes'])}")
    try:
        return ModelConfig.from_any(config)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{source}: its stored configuration is invalid: {err}") from None
