"""Training checkpoints: atomic writes (temp file, flush, fsync, rename), safe loads, full RNG state.

A checkpoint holds only tensors and plain Python types (the config as a dict), so it loads with
`torch.load(weights_only=True)`: model, optimizer, lr_scheduler, epoch, step (batches done in that epoch),
config, and the RNG states of torch (CPU and CUDA), Python's `random` and NumPy.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from pvt_detr.checkpoints import CheckpointError, load_state_file


def rng_state() -> dict:
    """All RNG states as tensors and plain types."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": _to_plain(random.getstate()),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restores what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_plain(value):
    return [_to_plain(v) for v in value] if isinstance(value, (tuple, list)) else value


def _to_tuple(value):
    return tuple(_to_tuple(v) for v in value) if isinstance(value, list) else value


TEMP_NAME = re.compile(r"^\..+\.tmp-\d+$")  # `.checkpoint.pth.tmp-<pid>`: never matches `checkpoint*.pth`


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Writes `state` to `path` atomically: a reader (or a crash at any moment) sees the old file or the new one.

    The data goes to a hidden temporary file in the same folder (flushed and fsynced), which is then renamed
    over `path`. A process killed mid-write leaves that temporary file behind; `remove_stale_temp_files` deletes it.
    A failed write (disk full, ...) raises a one-line CheckpointError naming `path` and leaves `path` as it was.
    """
    path = Path(path)
    tmp = _temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except (OSError, RuntimeError) as e:  # disk full (torch's zip writer raises RuntimeError), quota, read-only...
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0]
        raise CheckpointError(f"{path}: cannot write the checkpoint: {reason}{_free_space(path.parent)}; the previous "
                              "one, if any, is unchanged") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def _free_space(folder: Path) -> str:
    try:
        return f" ({shutil.disk_usage(folder).free / 2**20:.1f} MiB free there)"
    except OSError:
        return ""


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Deletes the temporary files of checkpoint writes that were killed before their rename; returns them.

    Call it only when no other process writes checkpoints into `folder` (at the start of a run)."""
    removed = []
    for candidate in Path(folder).glob(".*.tmp-*"):
        if TEMP_NAME.match(candidate.name) and candidate.is_file():
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def load_checkpoint(path: str | Path) -> dict:
    """Loads a training checkpoint with weights_only=True; one-line CheckpointError if unreadable or foreign."""
    state = load_state_file(path)
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path}: not a pvt-detr training checkpoint (no 'model' entry)")
    return state


def describe_mismatch(state: dict, args) -> str | None:
    """A one-line explanation when a checkpoint's architecture or class count differs from the current config."""
    cfg = state.get("config") or {}
    keys = ("backbone", "hidden_dim", "enc_layers", "dec_layers", "num_queries", "num_classes", "backbone_stages",
            "dim_feedforward", "nheads", "local_layers")
    diffs = [f"{k}={cfg[k]!r} there vs {getattr(args, k)!r} here" for k in keys
             if k in cfg and getattr(args, k, None) is not None and cfg[k] != getattr(args, k)]
    return "; ".join(diffs) if diffs else None
