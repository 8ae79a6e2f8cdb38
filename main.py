"""Train and evaluate PVT + DETR on COCO (or the built-in demo dataset).

The paper's recipe (PVT-Small + DETR, 34.7 AP on COCO val2017) is the default:
    python main.py --backbone pvt_small --coco_path /data/coco --pretrained_backbone pvt_small.pth
8 GPUs x 2 images:
    torchrun --nproc_per_node 8 main.py --backbone pvt_small --coco_path /data/coco --output_dir out/pvt_s
Evaluate a checkpoint:
    python main.py --eval --resume out/pvt_s/checkpoint.pth --coco_path /data/coco
The built-in demo (generates a small synthetic COCO-format dataset, trains on CPU in minutes):
    python main.py --config configs/demo.yaml

Flags and their defaults: `pvt_detr.config.ModelConfig` (model, matcher, loss) and `training.config.TrainConfig`
(optimisation, data, run).
"""

from __future__ import annotations

import argparse
import sys

from training.config import build_cli_parser, get_args_parser

__all__ = ["build_cli_parser", "get_args_parser", "main"]


def main(args: argparse.Namespace) -> dict:
    """Runs training and/or evaluation; returns the final stats."""
    from training.run import run

    return run(args)


if __name__ == "__main__":
    from training.config import parse_args

    sys.exit(0 if main(parse_args(build_cli_parser())) is not None else 1)
