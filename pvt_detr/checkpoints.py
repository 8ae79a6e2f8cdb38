"""Loading official PVT ImageNet checkpoints, facebookresearch/detr checkpoints and MMDetection 2.x DETR / PVT-DETR
checkpoints into our modules.

Every file is read with `torch.load(weights_only=True)`: tensors and plain Python types only (a pickled
`argparse.Namespace`, in which DETR-family training checkpoints keep their flags, is read as a
`SimpleNamespace`). Official conv weights (patch embedding, spatial reduction) are converted to our linear
layout; keys are remapped (`block{s}.{j}` -> `blocks.{s-1}.{j}`, `patch_embed{s}` -> `patch_embed.{s-1}`,
`pos_embed{s}` -> `pos_embed.{s-1}`). MMDetection 2.x files (`{'meta', 'state_dict', 'optimizer'}`, DETR head under
`bbox_head.`, mmdet 2.8 or 2.13 key names) are renamed to facebookresearch/detr's names and their 80 + 1 class head
is remapped to category-id rows (see `pvt_detr.label_map`).
"""

from __future__ import annotations

import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from pvt_detr.backbone.patch_embed import conv_weight_to_linear
from pvt_detr.backbone.pvt import resize_pos_embed
from pvt_detr.label_map import COCO_CATEGORIES, LabelMap


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message is one line."""


@dataclass
class LoadReport:
    """What a load did: keys loaded, checkpoint keys not used, model keys not filled, keys skipped and why,
    positional embeddings resized from another grid; for converted formats also the detected format, tensors whose
    values were converted (our key -> how), renamed keys (our key -> the checkpoint's), notes, and the label map of
    a class head kept as the checkpoint's (`keep_label_map=True`)."""

    loaded: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    resized: dict[str, str] = field(default_factory=dict)
    format: str = ""
    converted: dict[str, str] = field(default_factory=dict)
    renamed: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    label_map: LabelMap | None = None

    def __str__(self) -> str:
        lines = [f"format: {self.format}"] if self.format else []
        lines += self.notes
        renamed = f", {len(self.renamed)} renamed from the checkpoint's names" if self.renamed else ""
        lines.append(f"loaded {len(self.loaded)} tensors{renamed}")
        if self.converted:
            kinds: dict[str, int] = {}
            for how in self.converted.values():
                kinds[how] = kinds.get(how, 0) + 1
            lines.append(f"converted {len(self.converted)}: " + "; ".join(f"{how} ({n})" for how, n in kinds.items()))
        if self.unused:
            lines.append(f"unused checkpoint keys ({len(self.unused)}): {_summarise(self.unused)}")
        if self.missing:
            lines.append(f"model keys not in the checkpoint ({len(self.missing)}): {_summarise(self.missing)}")
        lines += [f"skipped {k}: {why}" for k, why in self.skipped.items()]
        lines += [f"{k}: {how}" for k, how in self.resized.items()]
        return "\n".join(lines)


def _summarise(keys: list[str], limit: int = 8) -> str:
    prefixes = sorted({k.split(".")[0] if k.count(".") else k for k in keys})
    text = ", ".join(prefixes[:limit])
    return text + (", ..." if len(prefixes) > limit else "")


def _load_error(path: Path, err: Exception) -> CheckpointError:
    """One line saying why torch.load(weights_only=True) failed on path."""
    text = str(err).strip()
    unsafe = re.search(r"GLOBAL ([\w.]+)", text)  # a pickled class or function that weights_only refuses
    if isinstance(err, pickle.UnpicklingError) and unsafe:
        return CheckpointError(f"{path}: refused to load, it holds more than tensors and plain types "
                               f"(weights_only=True): it pickles {unsafe.group(1)}")
    if isinstance(err, pickle.UnpicklingError) and text:  # torch's first lines are its weights_only advice
        reason = (re.findall(r"WeightsUnpickler error: \s*([^\n]+)", text) or [text.splitlines()[0]])[-1]
    elif isinstance(err, (RuntimeError, OSError)) and text:
        reason = text.splitlines()[0]
    else:  # the unpickler reading a foreign file: IndexError, KeyError, struct.error, EOFError ...
        reason = f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__
    if len(reason) > 120:  # e.g. torch's zip reader: its first sentence says it
        reason = reason.split(". ")[0]
    return CheckpointError(f"{path}: not a readable checkpoint (truncated, corrupt or not a torch.save file?): "
                           f"{reason}")


def load_state_file(path: str | Path) -> dict:
    """torch.load(weights_only=True) with one-line errors for missing, truncated, foreign or unsafe files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        # DETR-family training checkpoints keep their flags as an argparse.Namespace; it is read as the
        # equivalent types.SimpleNamespace (plain attributes, no code run).
        with torch.serialization.safe_globals([(SimpleNamespace, "argparse.Namespace")]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a foreign file can fail anywhere in the unpickler
        raise _load_error(path, err) from None


MMDET_CONTAINER = {"meta", "state_dict", "optimizer"}  # what MMDetection 2.x (mmcv's save_checkpoint) writes


class InertObject:
    """Stand-in for a class that weights_only refuses: keeps its constructor arguments and pickled state as data and
    runs nothing. Each refused global gets its own subclass whose `qualname` names it."""

    qualname = ""

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.qualname}: not loaded>"


def _holds_inert(obj: Any) -> bool:
    if isinstance(obj, InertObject):
        return True
    if isinstance(obj, dict):
        return any(_holds_inert(k) or _holds_inert(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return any(_holds_inert(v) for v in obj)
    return False


def _load_with_inert_meta(path: Path) -> tuple[dict, list[str]] | None:
    """An MMDetection container whose `meta` pickles classes weights_only refuses: loads it with an `InertObject`
    stand-in for each refused global. Returns (container, refused names), or None if the file is not such a
    container, a stand-in would land outside `meta`, or it still cannot be read."""
    try:
        names = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        stand_ins = [(type(n.rsplit(".", 1)[-1], (InertObject,), {"qualname": n}), n) for n in names]
        with torch.serialization.safe_globals([(SimpleNamespace, "argparse.Namespace"), *stand_ins]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # blocked modules, dict/list subclasses the unpickler cannot fill, foreign files
        return None
    if not (names and isinstance(obj, dict) and "state_dict" in obj and "meta" in obj and set(obj) <= MMDET_CONTAINER):
        return None
    if _holds_inert({k: v for k, v in obj.items() if k != "meta"}):
        return None
    return obj, names


def _read_file(path: str | Path, inert_meta: bool) -> tuple[Any, list[str]]:
    """`load_state_file`, and with `inert_meta` the MMDetection fallback of `_load_with_inert_meta`; returns the
    loaded object and notes (one line each) on what was not loaded."""
    try:
        return load_state_file(path), []
    except CheckpointError as err:
        held = _load_with_inert_meta(Path(path)) if inert_meta and "refused" in str(err) else None
        if held is None:
            raise
        obj, names = held
        return obj, [f"{path}: its meta holds objects that weights_only refuses ({', '.join(names)}); they were "
                     "not loaded, the state dict was"]


def read_checkpoint(path: str | Path) -> tuple[Any, list[str]]:
    """A checkpoint file as `load_detr_checkpoint` reads it (weights_only; an MMDetection `meta` that pickles refused
    objects gets inert stand-ins): (the loaded object, one-line notes on what was not loaded)."""
    return _read_file(path, inert_meta=True)


def _state_dict_of(obj: Any, what: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what}: holds a {type(obj).__name__}, expected a state dict of tensors")
    for wrapper in ("model", "state_dict"):
        if wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
            break
    if not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{what}: expected a state dict of tensors")
    return obj


def _as_state_dict(path_or_state_dict, what: str) -> dict[str, torch.Tensor]:
    obj = path_or_state_dict if isinstance(path_or_state_dict, dict) else load_state_file(path_or_state_dict)
    return _state_dict_of(obj, what)


_OFFICIAL_PVT = [
    (re.compile(r"^patch_embed(\d)\.(.*)$"), lambda m: f"patch_embed.{int(m[1]) - 1}.{m[2]}"),
    (re.compile(r"^pos_embed(\d)$"), lambda m: f"pos_embed.{int(m[1]) - 1}"),
    (re.compile(r"^block(\d)\.(.*)$"), lambda m: f"blocks.{int(m[1]) - 1}.{m[2]}"),
]


def pvt_checkpoint_filter(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Official PVT v1 keys and layouts -> ours (timm's `checkpoint_filter_fn` idea). Our own keys pass through."""
    out = {}
    for key, value in state_dict.items():
        new_key = key
        for pattern, repl in _OFFICIAL_PVT:
            m = pattern.match(key)
            if m:
                new_key = repl(m)
                break
        if value.dim() == 4 and (new_key.endswith("proj.weight") or new_key.endswith("attn.sr.weight")):
            value = conv_weight_to_linear(value)  # stride-P conv (O, I, P, P) -> linear (O, P*P*I)
        if new_key == "pos_embed.3" and hasattr(model, "pos_embed") and value.dim() == 3:
            n, expected = value.shape[1], model.pos_embed[3].shape[1]
            if n == expected + 1 or (not _is_square(n) and _is_square(n - 1)):
                out["cls_pos_embed"] = value[:, :1]  # official stage-4 embedding: entry 0 belongs to the cls token
                value = value[:, 1:]
        out[new_key] = value
    return out


PVT_PARTS = ("blocks.", "patch_embed.", "pos_embed.")  # backbone tensors that depend on the PVT's depths


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def _resize_pos_embeds(sd: dict[str, torch.Tensor], backbone: nn.Module) -> dict[str, str]:
    """Positional embeddings stored for another square grid (a checkpoint trained at another image size) are
    resized in place in `sd` to the backbone's grids, bilinearly as at run time; returns {key: what was done}."""
    done = {}
    for i, own in enumerate(getattr(backbone, "pos_embed", [])):
        key, value = f"pos_embed.{i}", sd.get(f"pos_embed.{i}")
        if value is None or value.dim() != 3 or value.shape == own.shape or value.shape[2] != own.shape[2]:
            continue
        if not (_is_square(value.shape[1]) and _is_square(own.shape[1])):
            continue
        g, target = math.isqrt(value.shape[1]), math.isqrt(own.shape[1])
        grid = resize_pos_embed(value.float().contiguous(), (target, target))  # (1, target, target, C), as at run time
        sd[key] = grid.reshape(1, target * target, -1).to(value.dtype)  # (1, target^2, C)
        done[key] = f"resized from a {g} x {g} grid to {target} x {target}"
    return done


def _load_matching(model: nn.Module, state_dict: dict[str, torch.Tensor], what: str,
                   skippable: tuple[str, ...] = ()) -> LoadReport:
    """Copies tensors whose key and shape match; keys under `skippable` prefixes may differ in shape."""
    own = model.state_dict()
    report = LoadReport()
    to_load = {}
    for key, value in state_dict.items():
        if key not in own:
            report.unused.append(key)
        elif own[key].shape != value.shape:
            if key.startswith(skippable):
                report.skipped[key] = f"shape {tuple(value.shape)} in the checkpoint, {tuple(own[key].shape)} here"
            else:
                raise CheckpointError(f"{what}: {key} has shape {tuple(value.shape)} in the checkpoint but "
                                      f"{tuple(own[key].shape)} in this model (a different architecture?)")
        else:
            to_load[key] = value
    model.load_state_dict(to_load, strict=False)
    report.loaded = sorted(to_load)
    report.missing = sorted(k for k in own if k not in to_load and k not in report.skipped)
    return report


def load_pvt_checkpoint(backbone: nn.Module, path_or_state_dict) -> LoadReport:
    """Loads an official PVT v1 ImageNet checkpoint (or one of ours) into a PVT backbone.

    Every backbone tensor must be filled; for an official file the unused keys are `cls_token`, `norm.*`, `head.*`
    (classification parts a detection backbone does not have). Missing tensors and blocks this backbone does not
    have (a deeper PVT's checkpoint) are errors, checked before anything is loaded. The exception: optional local
    layers (`local.*`, not in PVT v1) that the checkpoint lacks keep their initialisation and are reported missing.
    """
    what = str(path_or_state_dict) if not isinstance(path_or_state_dict, dict) else "PVT state dict"
    sd = pvt_checkpoint_filter(_as_state_dict(path_or_state_dict, what), backbone)
    sd = {k: v for k, v in sd.items() if k != "cls_pos_embed" or hasattr(backbone, "cls_pos_embed")}
    own = backbone.state_dict()
    extra = [k for k in sd if k not in own and k.startswith(PVT_PARTS)]
    missing = sorted(k for k in own if k not in sd and not k.startswith("local."))
    if missing:
        raise CheckpointError(f"{what}: {len(missing)} backbone tensors missing from the checkpoint, e.g. "
                              f"{', '.join(missing[:3])} (not a PVT v1 checkpoint of this size?)")
    if extra:
        depths = getattr(backbone, "depths", None)
        raise CheckpointError(f"{what}: {len(extra)} backbone tensors have no place in this backbone, e.g. "
                              f"{', '.join(extra[:3])} (a deeper PVT's checkpoint? this backbone's depths are "
                              f"{list(depths) if depths else 'different'})")
    resized = _resize_pos_embeds(sd, backbone)
    report = _load_matching(backbone, sd, what)
    report.resized = resized
    return report


def load_detr_checkpoint(model: nn.Module, path_or_state_dict, *, label_map: LabelMap | None = None,
                         keep_label_map: bool = False, what: str | None = None) -> LoadReport:
    """Loads a DETR checkpoint into a DETR model: facebookresearch/detr's (`{'model': ...}`), one of ours, or an
    MMDetection 2.x DETR / PVT-DETR file; the format is told from the keys and named in `report.format`.

    facebookresearch/detr and ours: the transformer, queries, heads and (with `--position_embedding learned`) DETR's
    learned position embedding load; `input_proj` and `class_embed` are skipped with a message when their shapes
    differ (other channel or class counts); keys the model does not have (DETR's ResNet `backbone.*`) are reported
    as unused. Any other shape mismatch is an error, and so are transformer layers (or, in one of our checkpoints,
    PVT blocks) that one side has and the other not: nothing is loaded then.

    MMDetection 2.x (`{'meta', 'state_dict', 'optimizer'}` or its bare state dict; mmdet 2.13 or 2.8 key names):
    renamed to the names above, PVT backbone conv weights converted to our linear layout, the unused cls slot of
    `pos_embed4` dropped, the 1x1-conv `input_proj` flattened. A `meta` that pickles objects weights_only refuses
    is not loaded (a note says which) and the state dict is. The 80 + 1 class head (row i = the checkpoint's i-th
    class, background last) is remapped exactly to this model's rows: row of category `id_i` <- row i, no-object
    <- the background row, other rows weight 0 and bias -1e4, so softmax probabilities are unchanged. The ids come
    from matching the checkpoint's class names (`meta['CLASSES']`, else COCO's 80 in file order) by name with
    `label_map` (default: `model.label_map` if it has one, else COCO's categories in DETR's layout, row = id).
    With `keep_label_map=True` the head loads as it is (into a model with as many classes, else it is skipped) and
    `report.label_map` holds the checkpoint's own compact map. mmdet >= 2.17's converted PVT names
    (`backbone.layers.*`) and mmdet 3.x files are one-line errors. `what`: the name errors give a loaded dict.
    """
    if what is None:
        what = str(path_or_state_dict) if not isinstance(path_or_state_dict, dict) else "DETR state dict"
    if isinstance(path_or_state_dict, dict):
        obj, notes = path_or_state_dict, []
    else:
        obj, notes = _read_file(path_or_state_dict, inert_meta=True)
    sd = dict(_state_dict_of(obj, what))
    fmt = detect_checkpoint_format(sd, what)
    if fmt.startswith("mmdet"):
        meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else None
        return _load_mmdet(model, sd, meta, what, fmt, notes, label_map, keep_label_map)
    for name in ("weight", "bias"):  # DETR's single 1x1-conv input projection -> our first Linear projection
        value = sd.pop(f"input_proj.{name}", None)
        if value is not None:
            sd[f"input_proj.0.{name}"] = value.flatten(1) if value.dim() == 4 else value
    for name in ("row_embed", "col_embed"):  # DETR's learned positions live in its Joiner, backbone.1
        value = sd.pop(f"backbone.1.{name}.weight", None)
        if value is not None:
            sd[f"position_embedding.{name}.weight"] = value
    report = _load_detr_state(model, sd, what)
    report.format = FORMATS[fmt]
    report.notes = notes
    return report


FORMATS = {
    "detr": "facebookresearch/detr (or pvt-detr) keys",
    "mmdet-2.13": "MMDetection 2.x DETR, mmdet 2.13 key names (attentions / ffns / decoder.post_norm)",
    "mmdet-2.8": "MMDetection 2.x DETR, mmdet 2.8 key names (self_attn / multihead_attn / ffn / decoder.norm)",
}


def detect_checkpoint_format(sd: dict[str, torch.Tensor], what: str = "checkpoint") -> str:
    """A key of `FORMATS` for a DETR state dict; one-line CheckpointError for MMDetection formats we do not read."""
    if any(k.startswith("backbone.layers.") for k in sd):
        raise CheckpointError(f"{what}: an MMDetection >= 2.17 checkpoint with converted PVT names (backbone.layers.*)"
                              ": not supported; use an MMDetection 2.x PVT-DETR file of the PVT repository "
                              "(backbone.block1.*)")
    if any(k.startswith(("encoder.layers.", "decoder.layers.", "neck.convs.")) for k in sd):
        raise CheckpointError(f"{what}: an MMDetection 3.x checkpoint (top-level encoder.* / decoder.* / neck.*): "
                              "not supported; MMDetection 2.x DETR files (bbox_head.transformer.*) load")
    if not any(k.startswith("bbox_head.") for k in sd):
        return "detr"
    if any(".attentions." in k or ".ffns." in k or k.startswith("bbox_head.transformer.decoder.post_norm.")
           for k in sd):
        return "mmdet-2.13"
    if any(k.startswith("bbox_head.transformer.") and (".self_attn.attn." in k or ".ffn.layers." in k) for k in sd):
        return "mmdet-2.8"
    raise CheckpointError(f"{what}: an MMDetection checkpoint without a DETR transformer "
                          "(no bbox_head.transformer.*): not a DETR model")


def _load_detr_state(model: nn.Module, sd: dict[str, torch.Tensor], what: str) -> LoadReport:
    """Checks that the transformer (and a PVT backbone, if the checkpoint has one) fit, then loads what matches."""
    own = model.state_dict()
    prefixes = ["transformer."]
    if any(k.startswith(tuple("backbone." + part for part in PVT_PARTS)) for k in sd):
        prefixes.append("backbone.")  # a pvt-detr checkpoint: its backbone must fit too
    for prefix in prefixes:
        extra = sorted(k for k in sd if k.startswith(prefix) and k not in own)
        missing = sorted(k for k in own if k.startswith(prefix) and k not in sd)
        if extra or missing:
            example = f"e.g. {extra[0]} only in the checkpoint" if extra else f"e.g. {missing[0]} not in it"
            raise CheckpointError(f"{what}: its {prefix.rstrip('.')} does not fit this model ({len(extra)} tensors "
                                  f"only in the checkpoint, {len(missing)} only in the model; {example}): "
                                  "different layer counts or depths?")
    return _load_matching(model, sd, what, skippable=("input_proj.", "class_embed."))


def _mmdet_head_rules(dialect: str) -> list[tuple[re.Pattern, str]]:
    """(pattern, replacement) on `bbox_head.` keys without that prefix -> facebookresearch/detr names."""
    layer = r"^(transformer\.(?:encoder|decoder)\.layers\.\d+)\."
    if dialect == "mmdet-2.13":
        attn, cross, ffn, final = r"attentions\.0\.attn", r"attentions\.1\.attn", r"ffns\.0", "post_norm"
    else:
        attn, cross, ffn, final = r"self_attn\.attn", r"multihead_attn\.attn", "ffn", "norm"
    rules = [
        (layer + attn + r"\.", r"\1.self_attn."),
        (layer + cross + r"\.", r"\1.multihead_attn."),
        (layer + ffn + r"\.layers\.0\.0\.", r"\1.linear1."),
        (layer + ffn + r"\.layers\.1\.", r"\1.linear2."),
        (layer + r"norms\.0\.", r"\1.norm1."),
        (layer + r"norms\.1\.", r"\1.norm2."),
        (layer + r"norms\.2\.", r"\1.norm3."),
        (rf"^transformer\.decoder\.{final}\.", "transformer.decoder.norm."),
        (r"^query_embedding\.", "query_embed."),
        (r"^input_proj\.", "input_proj.0."),
        (r"^reg_ffn\.layers\.0\.0\.", "bbox_embed.layers.0."),
        (r"^reg_ffn\.layers\.1\.", "bbox_embed.layers.1."),
        (r"^fc_reg\.", "bbox_embed.layers.2."),
        (r"^fc_cls\.", "class_embed."),
    ]
    return [(re.compile(p), r) for p, r in rules]


def _load_mmdet(model: nn.Module, sd: dict[str, torch.Tensor], meta: dict | None, what: str, fmt: str,
                notes: list[str], label_map: LabelMap | None, keep_label_map: bool) -> LoadReport:
    """MMDetection 2.x DETR state dict -> ours (see `load_detr_checkpoint`)."""
    out: dict[str, torch.Tensor] = {}
    renamed: dict[str, str] = {}  # our key -> checkpoint key
    converted: dict[str, str] = {}
    unknown: list[str] = []
    rules = _mmdet_head_rules(fmt)
    backbone = getattr(model, "backbone", None)
    pvt = any(k.startswith(("backbone.block1.", "backbone.patch_embed1.")) for k in sd)
    for key, value in sd.items():
        if key.startswith("bbox_head."):
            name = key[len("bbox_head."):]
            for pattern, repl in rules:
                if pattern.match(name):
                    new = pattern.sub(repl, name, count=1)
                    break
            else:
                unknown.append(key)
                continue
            if new.startswith("input_proj.0.") and value.dim() == 4:
                value = value.flatten(1)  # (O, I, 1, 1) -> (O, I)
                converted[new] = "1x1 conv -> linear"
        elif key.startswith("backbone.") and pvt and backbone is not None:
            for sub, v in pvt_checkpoint_filter({key[len("backbone."):]: value}, backbone).items():
                if sub == "cls_pos_embed":
                    converted["backbone.pos_embed.3"] = "pos_embed4 without its unused first (cls) slot"
                    continue
                new, value = f"backbone.{sub}", v
                if v.dim() != sd[key].dim():
                    converted[new] = "conv (O, I, P, P) -> linear (O, P*P*I)"
        else:
            unknown.append(key)
            continue
        out[new] = value
        renamed[new] = key
    report_label_map, note = _mmdet_class_head(model, out, meta, what, label_map, keep_label_map, converted)
    report = _load_detr_state(model, out, what)
    report.unused = sorted(renamed.get(k, k) for k in report.unused) + sorted(unknown)
    other = ", backbone not loaded (not a PVT)" if any(k.startswith("backbone.") for k in sd) else ", no backbone"
    report.format = FORMATS[fmt] + (", PVT backbone" if pvt else other)
    report.converted = {k: how for k, how in converted.items() if k in report.loaded}
    report.renamed = {k: renamed[k] for k in report.loaded if k in renamed and renamed[k] != k}
    report.notes = notes + ([note] if note else [])
    report.label_map = report_label_map
    return report


def _checkpoint_classes(meta: dict | None, num_rows: int, what: str) -> tuple[list[str], str]:
    """The names of the checkpoint's class rows (background excluded) and where they come from."""
    classes = meta.get("CLASSES") if meta else None
    if isinstance(classes, (list, tuple)) and classes and all(isinstance(c, str) for c in classes):
        if len(classes) != num_rows:
            raise CheckpointError(f"{what}: meta['CLASSES'] names {len(classes)} classes but the class head has "
                                  f"{num_rows} + 1 rows")
        return list(classes), "meta['CLASSES']"
    if num_rows == len(COCO_CATEGORIES):
        return [n for _, n in COCO_CATEGORIES], "COCO's 80 classes (no class names in meta)"
    raise CheckpointError(f"{what}: its {num_rows} + 1-way class head names no classes (no meta['CLASSES'], not "
                          "COCO's 80), so its rows cannot be matched to categories")


def _mmdet_class_head(model: nn.Module, sd: dict[str, torch.Tensor], meta: dict | None, what: str,
                      label_map: LabelMap | None, keep_label_map: bool,
                      converted: dict[str, str]) -> tuple[LabelMap | None, str | None]:
    """Remaps `class_embed.*` in `sd` (mmdet: row i = i-th class, background last) to the model's rows in place.

    Returns the checkpoint's own label map when it is kept as is, and a note when the head is left out.
    """
    if "class_embed.weight" not in sd or "class_embed.bias" not in sd:
        return None, None
    weight, bias = sd["class_embed.weight"], sd["class_embed.bias"]  # (C + 1, d), (C + 1,)
    names, source = _checkpoint_classes(meta, weight.shape[0] - 1, what)
    target = label_map if label_map is not None else getattr(model, "label_map", None)
    by_name = {n: i for i, n in (target.categories if target is not None else COCO_CATEGORIES)}
    if keep_label_map:
        lost = [n for n in names if n not in by_name]
        if lost:
            raise CheckpointError(f"{what}: the category ids of its classes are unknown ({lost[0]!r} is not "
                                  f"{'in the given label map' if target is not None else 'a COCO class'}); pass "
                                  "the label map of the dataset it was trained on")
        kept = LabelMap(tuple((by_name[n], n) for n in names))
        return kept, (f"class_embed kept as the checkpoint's {len(names)} + 1 rows ({source}); report.label_map "
                      "holds the (category id, name) of each row")
    if getattr(model, "focal", False):
        raise CheckpointError(f"{what}: its softmax class head cannot be remapped to this model's sigmoid (focal) "
                              "class head")
    rows_here = model.class_embed.out_features - 1  # no-object row excluded
    if target is None:  # COCO's categories in DETR's layout: row = category id
        lost = [n for n in names if n not in by_name]
        if lost:
            raise CheckpointError(f"{what}: its class {lost[0]!r} ({source}) is not a COCO class; pass the model's "
                                  "label_map or keep_label_map=True")
        needed = max(by_name[n] for n in names)
        if needed >= rows_here:
            raise CheckpointError(f"{what}: this model's class head has {rows_here} classes, no room for COCO "
                                  f"category id {needed} (DETR layout, row = id: build it with --num_classes "
                                  f"{needed + 1}), or load with keep_label_map=True for {len(names)} classes")
        rows = [by_name[n] for n in names]
    else:
        if target.num_classes != rows_here:
            raise CheckpointError(f"{what}: the label map has {target.num_classes} rows but this model's class head "
                                  f"{rows_here}")
        lost = [n for n in names if n not in by_name]
        if lost:  # fine-tuning on other classes: the class head starts afresh, as for a DETR head of other size
            del sd["class_embed.weight"], sd["class_embed.bias"]
            return None, (f"class_embed not loaded: {len(lost)} of the checkpoint's {len(names)} classes ({source}) "
                          f"are not in the label map, e.g. {lost[0]!r}")
        rows = [target.row_of(by_name[n]) for n in names]
    C = len(names)
    new_weight = weight.new_zeros(rows_here + 1, weight.shape[1])  # (K + 1, d)
    new_bias = bias.new_full((rows_here + 1,), -1e4)  # (K + 1,)
    index = torch.tensor(rows + [rows_here])  # (C + 1,) our row of each checkpoint row; background -> no-object
    new_weight[index] = weight
    new_bias[index] = bias
    sd["class_embed.weight"], sd["class_embed.bias"] = new_weight, new_bias
    how = f"{C} + 1-way head ({source}) -> rows by category id, others weight 0 / bias -1e4"
    converted["class_embed.weight"] = converted["class_embed.bias"] = how
    return None, None


def checkpoint_label_map(state: Any) -> LabelMap | None:
    """The label map a checkpoint's class outputs stand for: pvt-detr's stored `label_map` ([[id, name], ...]), or
    an older pvt-detr checkpoint's `categories` ({id: name}, DETR's layout over `config['num_classes']` rows); None
    for a checkpoint that names no categories (facebookresearch/detr's, MMDetection's: see load_detr_checkpoint)."""
    if not isinstance(state, dict):
        return None
    try:
        if isinstance(state.get("label_map"), list):
            return LabelMap.from_list(state["label_map"])
        categories, config = state.get("categories"), state.get("config")
        if isinstance(categories, dict) and categories and isinstance(config, dict):
            names = {int(k): str(v) for k, v in categories.items()}
            rows = config.get("num_classes") or max(names) + 1
            return LabelMap(tuple((r, names.get(r)) for r in range(int(rows))))
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"its stored label map is invalid: {err}") from None
    return None


def fit_class_heads(state_dict: dict[str, torch.Tensor], source: LabelMap, target: LabelMap,
                    what: str) -> tuple[dict[str, torch.Tensor], str]:
    """The class heads of a checkpoint trained on `source`'s categories, fitted to a model for `target`'s (for
    fine-tuning): kept when both name the same ids the same way; rows moved by category name when the same names
    stand under other ids (rows of `target` no source row names get weight 0 and bias -1e4: never predicted); left
    out (the model keeps its fresh heads) when the category sets differ. Returns the new state dict (the input is
    not changed) and one line saying what was done."""
    heads = [name for name in ("class_embed", "enc_class_embed") if f"{name}.weight" in state_dict]
    diff = source.diff(target)
    if not heads or diff.same_rows:
        return state_dict, "class head kept: the checkpoint's categories are the dataset's"
    sd = dict(state_dict)
    if not (diff.same_categories or diff.same_names):
        for name in heads:
            del sd[f"{name}.weight"], sd[f"{name}.bias"]
        return sd, f"class head not loaded (it starts afresh): {what}'s categories differ from the dataset's: {diff}"
    source_rows = {name: row for row, (_, name) in enumerate(source.rows) if name is not None}
    for name in heads:
        weight, bias = sd[f"{name}.weight"], sd[f"{name}.bias"]  # (K_src (+ 1), d), (K_src (+ 1),)
        no_object = weight.shape[0] == source.num_classes + 1  # softmax heads have a last no-object row
        if weight.shape[0] != source.num_classes + int(no_object):
            raise CheckpointError(f"{what}: {name} has {weight.shape[0]} rows for a label map of "
                                  f"{source.num_classes} classes")
        rows = [source_rows.get(n) if n is not None else None for _, n in target.rows]  # (K_tgt,) source row or None
        new_weight = weight.new_zeros(target.num_classes + int(no_object), weight.shape[1])
        new_bias = bias.new_full((target.num_classes + int(no_object),), -1e4)
        for r, s in enumerate(rows):
            if s is not None:
                new_weight[r], new_bias[r] = weight[s], bias[s]
        if no_object:
            new_weight[-1], new_bias[-1] = weight[-1], bias[-1]
        sd[f"{name}.weight"], sd[f"{name}.bias"] = new_weight, new_bias
    return sd, f"class head rows moved by category name: {diff}"
