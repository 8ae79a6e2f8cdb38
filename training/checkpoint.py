"""Training checkpoints: atomic writes (temp file, flush, fsync, rename), safe loads, full RNG state.

A checkpoint holds only tensors and plain Python types (the config as a dict), so it loads with
`torch.load(weights_only=True)`: model, optimizer, lr_scheduler, epoch, step (batches done in that epoch),
config, and per process the RNG states of torch (CPU, and the process's own GPU), Python's `random` and NumPy.
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
from pvt_detr.config import ModelConfig, stored_config


def rng_state(device: torch.device) -> dict:
    """This process's RNG states as tensors and plain types: torch's CPU generator, the generator of `device` if it
    is a GPU (this process's own, not every visible one), Python's `random` and NumPy."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": _to_plain(random.getstate()),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> str | None:
    """Restores what `rng_state` captured; the GPU generator only onto a GPU `device`. Returns a note when the saved
    GPU state cannot apply (saved on the CPU, or by another version's all-GPU list), else None."""
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if device.type != "cuda":
        return None
    saved = state.get("cuda")
    if isinstance(saved, torch.Tensor):
        torch.cuda.set_rng_state(saved, device)
        return None
    return "the checkpoint holds no GPU random state for this process: the GPU generator starts from the seed"


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


def architecture_mismatch(state: dict, config: ModelConfig, path: str | Path,
                          ignore: tuple[str, ...] = ()) -> str | None:
    """One line naming every architecture field (`ModelConfig.architecture_fields()`, except `ignore`) whose value in
    the checkpoint's stored configuration differs from `config`'s, with both values; None when they agree.
    Raises CheckpointError when the stored configuration is missing, incomplete or of the wrong types."""
    saved = stored_model_config(state, path)
    diffs = []
    for name in ModelConfig.architecture_fields():
        here, there = getattr(config, name), getattr(saved, name)
        if name not in ignore and here != there:
            diffs.append(f"--{name} {_show(here)} here but {_show(there)} in {path}")
    return "; ".join(diffs) if diffs else None


def stored_model_config(state: dict, path: str | Path) -> ModelConfig:
    """The ModelConfig a pvt-detr checkpoint was trained with (CheckpointError, one line, if it cannot be read)."""
    try:
        return stored_config(state, str(path))
    except ValueError as err:
        raise CheckpointError(str(err)) from None


def _show(value) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return str(value)
