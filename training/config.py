"""Flag parsing with named experiment files: `--config configs/NAME.yaml` sets defaults, CLI flags win.

The resolved configuration is what every run writes to `output_dir/config.yaml` and stores in its checkpoints
(as a plain dict, so checkpoints load with `weights_only=True`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from pvt_detr.detr import POSITION_EMBEDDINGS, check_model_args
from pvt_detr.position_encoding import LEARNED_MAX_CELLS


def load_config_file(path: str | Path, parser: argparse.ArgumentParser) -> dict:
    """Reads a YAML experiment file with `yaml.safe_load`; unknown keys are errors naming the file."""
    path = Path(path)
    if not path.is_file():
        parser.error(f"--config {path}: no such file")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        parser.error(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})")
    except (UnicodeDecodeError, OSError) as e:
        parser.error(f"--config {path}: not a readable UTF-8 text file ({e})")
    if not isinstance(values, dict):
        parser.error(f"--config {path}: expected a mapping of flag names to values")
    known = {a.dest for a in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        parser.error(f"--config {path}: unknown keys {', '.join(unknown)}")
    # Values go through each flag's own type (e.g. "640,672" or a YAML list for --train_sizes).
    actions = {a.dest: a for a in parser._actions}
    for key, value in values.items():
        action = actions[key]
        if action.nargs == 0:  # an on/off flag (store_true / store_false): YAML true or false only
            if not isinstance(value, bool):
                parser.error(f"--config {path}: {key}: expected true or false, got {value!r}")
            values[key] = value
            continue
        if value is None and action.default is not None:
            parser.error(f"--config {path}: {key}: needs a value (its default is {action.default!r})")
        if isinstance(value, bool) and action.type is not None:
            parser.error(f"--config {path}: {key}: expected a {getattr(action.type, '__name__', 'typed')} value, "
                         f"got {str(value).lower()}")
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        if action.type is not None and value is not None:
            try:
                value = action.type(value) if isinstance(value, str) else action.type(str(value))
            except (argparse.ArgumentTypeError, ValueError) as e:
                parser.error(f"--config {path}: {key}: {e}")
        if action.choices is not None and value not in action.choices:
            parser.error(f"--config {path}: {key}={value!r} is not one of {', '.join(map(str, action.choices))}")
        values[key] = value
    return values


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parses argv (default sys.argv[1:]) on top of the defaults of `--config` if given, then checks values."""
    argv = sys.argv[1:] if argv is None else argv
    first, _ = parser.parse_known_args(argv)
    if getattr(first, "config", None):
        parser.set_defaults(**load_config_file(first.config, parser))
    args = parser.parse_args(argv)
    check_args(args, parser)
    return args


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Value checks argparse cannot express; each failure is a one-line argparse error."""
    positive = ["batch_size", "epochs", "max_size", "test_size", "hidden_dim", "nheads", "num_queries",
                "dim_feedforward", "dec_layers"]
    for name in positive:
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("lr", "lr_backbone", "weight_decay", "clip_max_norm", "eos_coef", "warmup_iters", "num_workers",
                 "enc_layers", "start_epoch", "max_nonfinite_steps", "plot_predictions"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    if not 0 <= args.max_bad_images < 1:
        parser.error(f"--max_bad_images must be a fraction in [0, 1), got {args.max_bad_images}")
    if any(s <= 0 for s in args.train_sizes):
        parser.error(f"--train_sizes must be positive, got {args.train_sizes}")
    try:  # the model's own checks (backbone stages, SR ratios, widths, convergence aids, ...) as argparse errors
        check_model_args(args)
    except ValueError as err:
        parser.error(str(err))
    if POSITION_EMBEDDINGS[args.position_embedding] == "learned":  # every registered PVT has strides 4, 8, 16, 32
        stride = 4 * 2 ** (min(args.backbone_stages) - 1)
        cells = -(-args.max_size // 32) * 32 // stride  # images are at most max_size, padded to multiples of 32
        if cells > LEARNED_MAX_CELLS:
            parser.error(f"--position_embedding learned covers at most {LEARNED_MAX_CELLS} x {LEARNED_MAX_CELLS} "
                         f"feature cells, but --max_size {args.max_size} gives up to {cells} at stride {stride}: "
                         "use --position_embedding sine or a smaller --max_size")
    if args.dataset_file == "coco" and not args.coco_path:
        parser.error("--coco_path is required with --dataset_file coco (or use --dataset_file demo)")
    if args.coco_path and args.dataset_file == "coco" and not Path(args.coco_path).is_dir():
        parser.error(f"--coco_path {args.coco_path}: no such folder")
    for name in ("pretrained_backbone", "finetune", "resume"):
        value = getattr(args, name)
        if value and "://" in value:  # facebookresearch/detr downloads an https --resume; nothing is downloaded here
            parser.error(f"--{name} {value}: a URL; pvt-detr never downloads, so download the file and pass its path")
    for name in ("pretrained_backbone", "finetune"):
        value = getattr(args, name)
        if value and not Path(value).is_file():
            parser.error(f"--{name} {value}: no such file")
    if not args.resume and not args.eval and args.start_epoch >= args.epochs:
        parser.error(f"--start_epoch {args.start_epoch} leaves nothing to train with --epochs {args.epochs}")
    if args.resume and args.resume != "auto" and not Path(args.resume).is_file():
        parser.error(f"--resume {args.resume}: no such file (use --resume auto to resume only if one exists)")
    local_rank = getattr(args, "local_rank", None)
    if local_rank is not None and os.environ.get("LOCAL_RANK", str(local_rank)) != str(local_rank):
        parser.error(f"--local-rank {local_rank} disagrees with the environment's LOCAL_RANK "
                     f"{os.environ['LOCAL_RANK']}")
    if args.eval and not (args.resume or args.finetune):
        print("warning: --eval without --resume/--finetune evaluates an untrained model", file=sys.stderr)


PER_PROCESS_FLAGS = ("local_rank",)  # differ between the processes of one run: not part of its configuration


def config_dict(args: argparse.Namespace) -> dict:
    """The resolved configuration as plain Python types (for config.yaml and checkpoints)."""
    plain = {}
    for key, value in sorted(vars(args).items()):
        if key in PER_PROCESS_FLAGS:
            continue
        if isinstance(value, Path):
            value = str(value)
        if isinstance(value, tuple):
            value = list(value)
        if value is None or isinstance(value, (bool, int, float, str, list)):
            plain[key] = value
    return plain


def save_config(args: argparse.Namespace, path: str | Path) -> None:
    """Writes the resolved configuration as YAML (atomically)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(config_dict(args), sort_keys=True))
    tmp.replace(path)
