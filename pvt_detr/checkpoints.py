"""Loading official PVT ImageNet checkpoints and facebookresearch/detr checkpoints into our modules.

Every file is read with `torch.load(weights_only=True)`: tensors and plain Python types only (a pickled
`argparse.Namespace`, in which DETR-family training checkpoints keep their flags, is read as a
`SimpleNamespace`). Official conv weights (patch embedding, spatial reduction) are converted to our linear
layout; keys are remapped (`block{s}.{j}` -> `blocks.{s-1}.{j}`, `patch_embed{s}` -> `patch_embed.{s-1}`,
`pos_embed{s}` -> `pos_embed.{s-1}`).
"""

from __future__ import annotations

import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from pvt_detr.backbone.patch_embed import conv_weight_to_linear
from pvt_detr.backbone.pvt import resize_pos_embed


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message is one line."""


@dataclass
class LoadReport:
    """What a load did: keys loaded, checkpoint keys not used, model keys not filled, keys skipped and why,
    positional embeddings resized from another grid."""

    loaded: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    resized: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors"]
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


def _as_state_dict(path_or_state_dict, what: str) -> dict[str, torch.Tensor]:
    sd = path_or_state_dict if isinstance(path_or_state_dict, dict) else load_state_file(path_or_state_dict)
    if not isinstance(sd, dict):
        raise CheckpointError(f"{what}: holds a {type(sd).__name__}, expected a state dict of tensors")
    for wrapper in ("model", "state_dict"):
        if wrapper in sd and isinstance(sd[wrapper], dict):
            sd = sd[wrapper]
            break
    if not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{what}: expected a state dict of tensors")
    return sd


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


def load_detr_checkpoint(model: nn.Module, path_or_state_dict) -> LoadReport:
    """Loads a facebookresearch/detr checkpoint (`{'model': ...}`) or one of ours into a DETR model.

    The transformer, queries, heads and (with `--position_embedding learned`) DETR's learned position embedding
    load; `input_proj` and `class_embed` are skipped with a message when their shapes differ (other channel or
    class counts); keys the model does not have (DETR's ResNet `backbone.*`) are reported as unused. Any other
    shape mismatch is an error, and so are transformer layers (or, in one of our checkpoints, PVT blocks) that one
    side has and the other not: nothing is loaded then.
    """
    what = str(path_or_state_dict) if not isinstance(path_or_state_dict, dict) else "DETR state dict"
    sd = dict(_as_state_dict(path_or_state_dict, what))
    for name in ("weight", "bias"):  # DETR's single 1x1-conv input projection -> our first Linear projection
        value = sd.pop(f"input_proj.{name}", None)
        if value is not None:
            sd[f"input_proj.0.{name}"] = value.flatten(1) if value.dim() == 4 else value
    for name in ("row_embed", "col_embed"):  # DETR's learned positions live in its Joiner, backbone.1
        value = sd.pop(f"backbone.1.{name}.weight", None)
        if value is not None:
            sd[f"position_embedding.{name}.weight"] = value
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
