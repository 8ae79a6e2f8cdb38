"""main.py's configuration: the training settings (`TrainConfig`) beside the model's (`pvt_detr.ModelConfig`), the
command line generated from both, and named experiment files (`--config configs/NAME.yaml`: defaults, CLI wins).

Every value is checked once, where it is parsed (flag or YAML key): a wrong type, NaN, inf or a value out of its
range is one `error:` line and exit code 1. The resolved configuration is what every run writes to
`output_dir/config.yaml` and stores in its checkpoints (as a plain dict, so checkpoints load with
`weights_only=True`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from pvt_detr.backbone.registry import list_backbones
from pvt_detr.cli import OneLineParser, expand_path
from pvt_detr.config import ModelConfig, check_value, coerce, setting
from pvt_detr.position_encoding import LEARNED_MAX_CELLS

MAX_CONFIG_BYTES = 1 << 20  # a --config file larger than this is refused


def path_setting(help: str, default: str | None = None):
    """A file or folder setting: `~` and environment variables are expanded."""
    return setting(default, help, path=True)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation (the paper's recipe), data and run settings of main.py."""

    # Optimisation: the paper's recipe.
    lr: float = setting(1e-4, "AdamW learning rate (transformer and heads)", low=0, high=10, low_open=True)
    lr_backbone: float = setting(1e-5, "learning rate of the PVT backbone (0 = frozen)", low=0, high=10)
    batch_size: int = setting(2, "images per process", low=1, high=4096)
    weight_decay: float = setting(1e-4, "AdamW weight decay", low=0, high=10)
    epochs: int = setting(50, "number of training epochs", low=1, high=100000)
    lr_drop: int = setting(33, "epoch at which the LR is divided by 10", low=1, high=100000)
    warmup_iters: int = setting(0, "linear LR warm-up steps (0 = none, the paper)", low=0, high=10**8)
    clip_max_norm: float = setting(0.1, "gradient clipping max L2 norm (0 = off)", low=0, high=1e6)
    pretrained_backbone: str | None = path_setting("official PVT ImageNet checkpoint (.pth)")

    # Data.
    dataset_file: str = setting("coco", "dataset kind: coco (COCO layout under --coco_path) or demo (generated)",
                                choices=("coco", "demo"))
    coco_path: str | None = path_setting("COCO root with train2017/, val2017/, annotations/")
    aug: str = setting("pvt", "pvt: short side 640..800, flip, no crop (the paper); detr: DETR's with crop",
                       choices=("pvt", "detr"))
    train_sizes: tuple[int, ...] = setting((640, 672, 704, 736, 768, 800), "comma-separated training short sides",
                                           low=1, high=8192)
    demo_train_images: int = setting(1200, "demo: generated training images", low=1, high=10**6)
    demo_val_images: int = setting(100, "demo: generated validation images", low=1, high=10**6)
    demo_image_size: int = setting(128, "demo: generated image side (pixels)", low=32, high=4096)
    max_bad_images: float = setting(0.01, "fraction of unreadable images tolerated per epoch before the run stops",
                                    low=0, high=1, high_open=True)
    evaluator: str = setting("pycocotools", "COCO box evaluation: pycocotools (the reference) or faster "
                             "(faster-coco-eval, same numbers)", choices=("pycocotools", "faster"))

    # Run.
    output_dir: str = path_setting("where checkpoints, logs and results go", "")
    overwrite: bool = setting(False, "start a new run in an --output_dir that holds one (its files are replaced)")
    device: str = setting("auto", "auto = cuda if available", choices=("auto", "cpu", "cuda"))
    amp: bool = setting(False, "mixed precision: bf16 autocast where supported (CPU, Ampere+ GPUs), else fp16 with "
                        "a gradient scaler")
    amp_dtype: str = setting("auto", "--amp precision: auto, bf16 or fp16", choices=("auto", "bf16", "fp16"))
    tf32: bool = setting(True, "CUDA: TF32 matmuls and convolutions in float32 (Ampere and newer)")
    compile: bool = setting(False, "torch.compile the model (training and evaluation); compiling takes minutes")
    seed: int = setting(42, "random seed (each rank adds its rank)", low=0, high=2**62)
    resume: str = path_setting("checkpoint to resume from, or 'auto' (output_dir/checkpoint.pth if it exists)", "")
    finetune: str = path_setting("DETR or pvt-detr checkpoint to start a new run from", "")
    start_epoch: int = setting(0, "first epoch (overridden by --resume)", low=0, high=100000)
    eval: bool = setting(False, "evaluate only (needs --resume or --finetune)")
    num_workers: int = setting(2, "data loader workers", low=0, high=256)
    num_threads: int = setting(0, "torch intra-op CPU threads (0 = torch's default)", low=0, high=4096)
    no_progress: bool = setting(False, "no progress bars")
    print_freq: int = setting(0, "without a terminal, a progress line every this many steps (0 = about one a minute)",
                              low=0, high=10**8)
    max_nonfinite_steps: int = setting(0, "non-finite steps skipped before the run stops (0 = stop at the first)",
                                       low=0, high=10**8)
    eval_every: int = setting(1, "evaluate every this many epochs (and after the last one)", low=1, high=100000)
    plot_predictions: int = setting(0, "draw predictions of this many validation images after training", low=0,
                                    high=100000)
    plot_threshold: float = setting(0.5, "score threshold of the drawn detections", low=0, high=1)
    dist_url: str = setting("env://", "torch.distributed init URL")
    dist_timeout: int = setting(1800, "process-group timeout in seconds", low=1, high=10**7)


CONFIGS = (ModelConfig, TrainConfig)
# Flags of on/off settings whose names are not `--x` / `--no_x`.
SWITCH_FLAGS = {"no_progress": ("--no_progress", "--progress"), "eval": ("--eval", "--no_eval"),
                "aux_loss": ("--aux_loss", "--no_aux_loss"), "tf32": ("--tf32", "--no_tf32")}
PER_PROCESS_FLAGS = ("local_rank",)  # differ between the processes of one run: not part of its configuration


def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for cls in CONFIGS for f in dataclasses.fields(cls)}


def _flag_type(f: dataclasses.Field):
    """argparse type of a field: converts with `coerce`, checks with `check_value` (one-line errors)."""
    def parse(text: str):
        try:
            value = coerce(f.name, text, f.default if f.default is not None else _none_default_kind(f))
            if f.metadata.get("path") and isinstance(value, str):
                value = expand_path(value)
            check_value(f.name, value, f.metadata)
        except ValueError as err:  # argparse names the flag itself
            message = str(err).removeprefix(f"--{f.name}").removeprefix(":").strip()
            raise argparse.ArgumentTypeError(message) from None
        return value

    parse.__name__ = type(f.default).__name__
    return parse


def _none_default_kind(f: dataclasses.Field):
    return None if f.name == "num_classes" else ""


def get_args_parser() -> argparse.ArgumentParser:
    """Every flag of main.py (no -h), generated from ModelConfig and TrainConfig; defaults are the paper's recipe."""
    parser = OneLineParser("pvt-detr training and evaluation", add_help=False)
    parser.add_argument("--config", default=None, type=expand_path,
                        help="YAML file of flag values (only what differs); CLI wins")
    for cls in CONFIGS:
        group = parser.add_argument_group(cls.__name__)
        for f in dataclasses.fields(cls):
            help_text = f.metadata["help"].replace("%", "%%")  # argparse formats help with %
            if isinstance(f.default, bool):
                on, off = SWITCH_FLAGS.get(f.name, (f"--{f.name}", f"--no_{f.name}"))
                switch = group.add_mutually_exclusive_group()
                switch.add_argument(on, dest=f.name, action="store_true", default=f.default,
                                    help=help_text + (" (the default)" if f.default else ""))
                switch.add_argument(off, dest=f.name, action="store_false", default=f.default,
                                    help=f"turn {on} off" + (" (the default)" if not f.default else ""))
                continue
            default = f.default
            choices = list_backbones() if f.name == "backbone" else None
            group.add_argument(f"--{f.name}", default=default, type=_flag_type(f), choices=choices,
                               metavar=None if choices else f.name.upper(),
                               help=f"{help_text} (default: {_show(default)})")
    parser.add_argument("--local-rank", "--local_rank", dest="local_rank", default=None, type=int,
                        help="passed by the legacy `python -m torch.distributed.launch` (without --use-env); the "
                             "ranks themselves are read from the environment it also sets (LOCAL_RANK)")
    return parser


def _show(value) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return "none" if value is None or value == "" else str(value)


def build_cli_parser() -> argparse.ArgumentParser:
    """main.py's command line: `get_args_parser()`'s flags plus -h/--help."""
    return OneLineParser("python main.py", parents=[get_args_parser()],
                         description="Train and evaluate PVT + DETR (defaults: the paper's recipe).")


def _reject_aliases(text: str, path: Path) -> None:
    """YAML anchors and aliases are refused: a few hundred bytes of nested aliases can expand to gigabytes."""
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise ValueError(f"--config {path}: YAML anchors and aliases (&, *) are not accepted")
    except yaml.YAMLError:
        return  # safe_load reports the syntax error


def load_config_file(path: str | Path, parser: argparse.ArgumentParser) -> dict:
    """Reads a YAML experiment file; unknown keys and bad values are one-line errors naming the file and key."""
    path = Path(path)
    if not path.is_file():
        parser.error(f"--config {path}: no such file")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        parser.error(f"--config {path}: larger than {MAX_CONFIG_BYTES // 1024} KiB, not an experiment file")
    try:
        text = path.read_text(encoding="utf-8")
        _reject_aliases(text, path)
        values = yaml.safe_load(text) or {}
    except (UnicodeDecodeError, OSError) as e:
        parser.error(f"--config {path}: not a readable UTF-8 text file ({e})")
    except ValueError as e:
        parser.error(str(e))
    except yaml.YAMLError as e:
        parser.error(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})")
    if not isinstance(values, dict):
        parser.error(f"--config {path}: expected a mapping of flag names to values")
    fields = _fields()
    unknown = sorted(str(k) for k in values if k not in fields)
    if unknown:
        parser.error(f"--config {path}: unknown keys {', '.join(unknown)}")
    for key, value in values.items():
        f = fields[key]
        try:
            if value is None and f.default is not None:
                raise ValueError(f"--{key}: needs a value (its default is {_show(f.default)})")
            value = coerce(key, value, f.default if f.default is not None else _none_default_kind(f))
            if f.metadata.get("path") and isinstance(value, str):
                value = expand_path(value)
            check_value(key, value, f.metadata)
            if key == "backbone" and value not in list_backbones():
                raise ValueError(f"--backbone {value!r} is not one of {', '.join(list_backbones())}")
        except ValueError as e:
            parser.error(f"--config {path}: {str(e).removeprefix('--')}")
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
    """Checks across flags, and of the files they name; each failure is a one-line error."""
    try:
        model = ModelConfig.from_any(args)
    except ValueError as err:
        parser.error(str(err))
    if model.position_embedding == "learned":  # every registered PVT has strides 4, 8, 16, 32
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
    if args.resume and args.resume != "auto" and not Path(args.resume).is_file():
        parser.error(f"--resume {args.resume}: no such file (use --resume auto to resume only if one exists)")
    if args.resume and args.finetune:
        parser.error("--resume continues a run and --finetune starts one from weights: give one of them")
    if not args.resume and not args.eval and args.start_epoch >= args.epochs:
        parser.error(f"--start_epoch {args.start_epoch} leaves nothing to train with --epochs {args.epochs}")
    if args.amp_dtype != "auto" and not args.amp:
        parser.error(f"--amp_dtype {args.amp_dtype} needs --amp")
    if args.output_dir and Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        parser.error(f"--output_dir {args.output_dir}: a file, not a folder")
    local_rank = getattr(args, "local_rank", None)
    if local_rank is not None and os.environ.get("LOCAL_RANK", str(local_rank)) != str(local_rank):
        parser.error(f"--local-rank {local_rank} disagrees with the environment's LOCAL_RANK "
                     f"{os.environ['LOCAL_RANK']}")


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
