"""Run outputs: `log.txt` (one JSON object per epoch, DETR's keys), TensorBoard events, and a PNG of the curves."""

from __future__ import annotations

import json
import os
from pathlib import Path


def append_log(output_dir: Path, entry: dict) -> None:
    """Appends one JSON line to output_dir/log.txt and flushes it to disk."""
    with open(output_dir / "log.txt", "a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_log(output_dir: Path) -> list[dict]:
    path = Path(output_dir) / "log.txt"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_log(output_dir: Path, last_epoch: int) -> None:
    """Drops entries after `last_epoch` (a run resumed from an older checkpoint rewrites them)."""
    entries = [e for e in read_log(output_dir) if e.get("epoch", -1) <= last_epoch]
    path = Path(output_dir) / "log.txt"
    if path.is_file():
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(e) + "\n" for e in entries))
        tmp.replace(path)


class TensorBoardLogger:
    """Scalars per epoch (and per step for the loss) into output_dir/tensorboard; a no-op without output_dir."""

    def __init__(self, output_dir: Path | None):
        self.writer = None
        if output_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))

    def epoch(self, entry: dict) -> None:
        if self.writer is None:
            return
        epoch = entry["epoch"]
        for key, value in entry.items():
            if isinstance(value, (int, float)) and key != "epoch":
                self.writer.add_scalar(key.replace("_", "/", 1), value, epoch)
        self.writer.flush()

    def step(self, global_step: int, values: dict) -> None:
        if self.writer is not None and global_step % 10 == 0:
            for key, value in values.items():
                self.writer.add_scalar(f"step/{key}", value, global_step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_curves(output_dir: Path) -> Path | None:
    """Writes output_dir/curves.png: the same loss for training and validation (the last decoder layer's weighted
    class + L1 + GIoU loss, with the run's coefficients from config.yaml) and COCO AP / AP50, per epoch."""
    entries = read_log(output_dir)
    if not entries:
        return None
    import matplotlib
    import yaml

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config_path = Path(output_dir) / "config.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    weights = {"loss_ce": config.get("cls_loss_coef", 1.0), "loss_bbox": config.get("bbox_loss_coef", 5.0),
               "loss_giou": config.get("giou_loss_coef", 2.0)}

    def last_layer_loss(entry: dict, split: str) -> float | None:
        values = [entry.get(f"{split}_{k}") for k in weights]
        return None if None in values else sum(w * v for w, v in zip(weights.values(), values))

    epochs = [e["epoch"] for e in entries]
    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(10, 4))
    for split in ("train", "test"):
        values = [last_layer_loss(e, split) for e in entries]
        if any(v is not None for v in values):
            ax_loss.plot(epochs, values, marker="o", label="train" if split == "train" else "validation")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("last decoder layer: " + " + ".join(f"{w:g} {k.removeprefix('loss_')}"
                                                           for k, w in weights.items()), fontsize=8)
    ax_loss.legend()
    for index, label in ((0, "AP"), (1, "AP50")):
        values = [e["test_coco_eval_bbox"][index] if e.get("test_coco_eval_bbox") else None for e in entries]
        if any(v is not None for v in values):
            ax_ap.plot(epochs, values, marker="o", label=label)
    ax_ap.set_xlabel("epoch")
    ax_ap.set_ylabel("COCO box AP, validation")
    ax_ap.set_ylim(0, 1)
    ax_ap.legend()
    fig.tight_layout()
    path = Path(output_dir) / "curves.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
