"""Device settings of a run: mixed-precision dtype, TF32, and the check that each process has a GPU of its own."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch


class DeviceSetupError(RuntimeError):
    """The processes and GPUs of a node do not fit together; the message is one line."""


def amp_dtype(args, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `--amp` (None without it): `--amp_dtype auto` takes bfloat16 where the device computes
    it natively (the CPU, Ampere and newer GPUs: no gradient scaler needed) and float16 elsewhere."""
    if not args.amp:
        return None
    choice = getattr(args, "amp_dtype", "auto")
    if choice == "auto":
        bf16 = device.type == "cpu" or torch.cuda.is_bf16_supported(including_emulation=False)
        choice = "bf16" if bf16 else "fp16"
    return torch.bfloat16 if choice == "bf16" else torch.float16


def grad_scaler(dtype: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler | None:
    """A GradScaler for float16 on a GPU (its small exponent range needs loss scaling); None otherwise."""
    if dtype == torch.float16 and device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None


def configure_tf32(enabled: bool, device: torch.device) -> str | None:
    """On CUDA: float32 matmuls and convolutions on TF32 tensor cores (PyTorch's advice for Ampere and newer) or
    IEEE float32; returns the line to print, None on the CPU."""
    if device.type != "cuda":
        return None
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    if enabled:
        return "CUDA float32 matmuls use TF32 (--no_tf32 for IEEE float32)"
    return "CUDA float32 matmuls in IEEE float32 (--no_tf32)"


def local_world_size(environ: Mapping[str, str] | None = None) -> int | None:
    """Processes of this job on this node, from torchrun (LOCAL_WORLD_SIZE) or SLURM (SLURM_NTASKS_PER_NODE /
    SLURM_STEP_TASKS_PER_NODE, first number); None when neither says."""
    env = os.environ if environ is None else environ
    for name in ("LOCAL_WORLD_SIZE", "SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"):
        value = env.get(name, "")
        digits = value.split("(")[0].split(",")[0]
        if digits.isdigit():
            return int(digits)
    return None


def check_gpu_layout(local_processes: int | None, visible_gpus: int, environ: Mapping[str, str] | None = None) -> None:
    """Raises DeviceSetupError when more processes run on a node than it shows GPUs, which would make some share a
    GPU (NCCL then fails with "Duplicate GPU detected"). SLURM's per-task GPU binding (`--gpus-per-task`, each task
    sees its own single GPU) is fine."""
    env = os.environ if environ is None else environ
    if local_processes is None or local_processes <= visible_gpus:
        return
    if visible_gpus == 1 and env.get("SLURM_GPUS_PER_TASK"):
        return
    raise DeviceSetupError(f"{local_processes} processes on this node but {visible_gpus} visible GPU(s) "
                           f"(CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '<unset>')}): start one process "
                           "per GPU (torchrun --nproc_per_node, or submit.py --ngpus)")
