"""A real pvt-detr checkpoint for the inference, predict and export tests: main.py trains a tiny model (as in
tests/test_main_cli.py) once per test session; every module's fixture reuses it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# 80 px demo images (evaluated at 64), pvt_nano stage 3, a 1 + 2 layer transformer of width 32, 6 queries:
# seconds on a CPU.
TINY = ["--dataset_file", "demo", "--demo_train_images", "8", "--demo_val_images", "5", "--demo_image_size", "80",
        "--backbone", "pvt_nano", "--backbone_stages", "3", "--hidden_dim", "32", "--nheads", "2", "--enc_layers", "1",
        "--dec_layers", "2", "--dim_feedforward", "64", "--num_queries", "6", "--train_sizes", "64", "--max_size", "96",
        "--test_size", "64", "--batch_size", "4", "--num_workers", "0", "--lr_drop", "1", "--seed", "3",
        "--lr", "5e-4", "--epochs", "1", "--no_progress", "--device", "cpu"]


def tiny_checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint.pth, demo dataset root) of the session's tiny model, trained on first use."""
    base = tmp_path_factory.getbasetemp() / "tiny_detector"
    checkpoint, data = base / "run" / "checkpoint.pth", base / "data"
    if not checkpoint.is_file():
        proc = subprocess.run([sys.executable, str(ROOT / "main.py"), *TINY, "--coco_path", str(data),
                               "--output_dir", str(base / "run")], cwd=ROOT, capture_output=True, text=True,
                              timeout=600)
        if proc.returncode != 0 or not checkpoint.is_file():
            raise AssertionError(f"main.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return checkpoint, data
