"""Train and evaluate PVT + DETR on COCO (or the built-in demo dataset).

The paper's recipe (PVT-Small + DETR, 34.7 AP on COCO val2017) is the default:
    python main.py --backbone pvt_small --coco_path /data/coco --pretrained_backbone pvt_small.pth
8 GPUs x 2 images:
    torchrun --nproc_per_node 8 main.py --backbone pvt_small --coco_path /data/coco --output_dir out/pvt_s
Evaluate a checkpoint:
    python main.py --eval --resume out/pvt_s/checkpoint.pth --coco_path /data/coco
The built-in demo (generates a small synthetic COCO-format dataset, trains on CPU in minutes):
    python main.py --config configs/demo.yaml
"""

from __future__ import annotations

import argparse
import sys

from pvt_detr.backbone.registry import list_backbones
from pvt_detr.detr import POSITION_EMBEDDINGS


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _add_switch(parser: argparse.ArgumentParser, dest: str, on: str, off: str, default: bool, help_on: str,
                help_off: str | None = None) -> None:
    """An on/off setting with a flag for each state, so a command line can override a --config file either way."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(on, dest=dest, action="store_true", default=default, help=help_on)
    group.add_argument(off, dest=dest, action="store_false", default=default,
                       help=help_off or f"turn {on} off (e.g. where a --config file turns it on)")


def get_args_parser() -> argparse.ArgumentParser:
    """DETR-style parser; defaults are the paper's PVT-Small + DETR recipe."""
    parser = argparse.ArgumentParser("pvt-detr training and evaluation", add_help=False)
    parser.add_argument("--config", default=None, help="YAML file of flag values (only what differs); CLI wins")

    # Optimisation: the paper's recipe.
    parser.add_argument("--lr", default=1e-4, type=float, help="AdamW learning rate (transformer and heads)")
    parser.add_argument("--lr_backbone", default=1e-5, type=float, help="learning rate of the PVT backbone")
    parser.add_argument("--batch_size", default=2, type=int, help="images per process")
    parser.add_argument("--weight_decay", default=1e-4, type=float, help="AdamW weight decay")
    parser.add_argument("--epochs", default=50, type=int, help="number of training epochs")
    parser.add_argument("--lr_drop", default=33, type=int, help="epoch at which the LR is divided by 10")
    parser.add_argument("--warmup_iters", default=0, type=int, help="linear LR warm-up steps (0 = none, the paper)")
    parser.add_argument("--clip_max_norm", default=0.1, type=float, help="gradient clipping max L2 norm (0 = off)")

    # Backbone.
    parser.add_argument("--backbone", default="pvt_small", choices=list_backbones(), help="PVT variant")
    parser.add_argument("--pretrained_backbone", default=None, help="official PVT ImageNet checkpoint (.pth)")
    parser.add_argument("--drop_path", default=0.1, type=float, help="stochastic depth rate of the backbone")
    parser.add_argument("--backbone_stages", default="4", type=_int_list,
                        help="backbone stages feeding DETR (comma-separated, 1-4); the paper uses stage 4 only")
    parser.add_argument("--sr_ratios", default=None, type=_int_list,
                        help="spatial-reduction ratio of each of the 4 stages (comma-separated; default: the "
                             "variant's 8,4,2,1); smaller ones give small images more keys; checkpoints keep theirs")
    parser.add_argument("--local_layers", default=None, type=_int_list,
                        help="neighbourhood-attention layers after the patch embedding of each of the 4 stages "
                             "(comma-separated; default 0,0,0,0 = PVT v1); not in the paper, used by the demo")

    # Transformer.
    parser.add_argument("--enc_layers", default=6, type=int, help="encoder layers")
    parser.add_argument("--dec_layers", default=6, type=int, help="decoder layers")
    parser.add_argument("--dim_feedforward", default=2048, type=int, help="FFN hidden size")
    parser.add_argument("--hidden_dim", default=256, type=int, help="transformer width d_model")
    parser.add_argument("--dropout", default=0.1, type=float, help="transformer dropout")
    parser.add_argument("--nheads", default=8, type=int, help="attention heads")
    parser.add_argument("--num_queries", default=100, type=int, help="object queries")
    parser.add_argument("--position_embedding", default="sine", choices=tuple(POSITION_EMBEDDINGS),
                        help="encoder token positions: DETR's sine encoding (v2) or learned row/column embeddings "
                             "(v3; at most 50 x 50 feature cells)")
    _add_switch(parser, "pre_norm", "--pre_norm", "--no_pre_norm", False, "pre-norm transformer layers")
    _add_switch(parser, "aux_loss", "--aux_loss", "--no_aux_loss", True, "per-layer aux losses (the default)",
                "disable per-layer aux losses")
    # Opt-in convergence aids (not in the paper's recipe; off by default).
    _add_switch(parser, "anchor_queries", "--anchor_queries", "--no_anchor_queries", False,
                "queries own learned reference boxes (DAB-DETR style): query position = MLP(sine(box)), "
                "boxes predicted as offsets to them; off = DETR's learned query embeddings")
    parser.add_argument("--anchor_size", default=0.25, type=float,
                        help="initial width/height of the reference boxes (fraction of the image), --anchor_queries")
    parser.add_argument("--num_groups", default=1, type=int,
                        help="Group DETR: train with this many independent query groups, each matched one-to-one "
                             "(evaluation uses the first); 1 = plain DETR")
    parser.add_argument("--dn_groups", default=0, type=int,
                        help="DN-DETR denoising training (needs --anchor_queries): this many noised copies of the "
                             "ground-truth boxes per image are decoded as extra queries that must reconstruct them; "
                             "0 = off")
    _add_switch(parser, "two_stage", "--two_stage", "--no_two_stage", False,
                "Deformable DETR two-stage (needs --anchor_queries): encoder tokens predict boxes with "
                "the set loss; the --num_queries best become the decoder's reference boxes")
    parser.add_argument("--two_stage_repeat", default=1, type=int,
                        help="--two_stage: match each target to this many encoder tokens (H-DETR one-to-many); "
                             "1 = one-to-one as in Deformable DETR")
    parser.add_argument("--dn_box_noise", default=0.4, type=float, help="box noise scale of --dn_groups")
    parser.add_argument("--dn_label_noise", default=0.2, type=float, help="label flip probability of --dn_groups")

    # Matcher and loss.
    parser.add_argument("--set_cost_class", default=1.0, type=float, help="matching cost: class")
    parser.add_argument("--set_cost_bbox", default=5.0, type=float, help="matching cost: L1 box")
    parser.add_argument("--set_cost_giou", default=2.0, type=float, help="matching cost: GIoU")
    parser.add_argument("--bbox_loss_coef", default=5.0, type=float, help="loss weight: L1 box")
    parser.add_argument("--giou_loss_coef", default=2.0, type=float, help="loss weight: GIoU")
    parser.add_argument("--eos_coef", default=0.1, type=float, help="relative weight of the no-object class")
    parser.add_argument("--cls_loss_coef", default=1.0, type=float, help="loss weight: classification")
    _add_switch(parser, "focal_loss", "--focal_loss", "--no_focal_loss", False,
                "sigmoid focal classification loss (Deformable DETR) with a K-way sigmoid head and "
                "top-100 (query, class) post-processing instead of softmax CE with no-object")
    parser.add_argument("--focal_alpha", default=0.25, type=float, help="alpha of --focal_loss")
    parser.add_argument("--num_classes", default=None, type=int,
                        help="max category id + 1; default: derived from the annotation file")

    # Data.
    parser.add_argument("--dataset_file", default="coco", choices=["coco", "demo"], help="dataset kind")
    parser.add_argument("--coco_path", default=None, help="COCO root with train2017/, val2017/, annotations/")
    parser.add_argument("--aug", default="pvt", choices=["pvt", "detr"],
                        help="pvt: short side 640..800, flip, no crop (the paper); detr: DETR's with crop")
    parser.add_argument("--train_sizes", default="640,672,704,736,768,800", type=_int_list,
                        help="comma-separated training short sides")
    parser.add_argument("--max_size", default=1333, type=int, help="longest side after resizing")
    parser.add_argument("--test_size", default=800, type=int, help="evaluation short side")
    parser.add_argument("--demo_train_images", default=1200, type=int, help="demo: generated training images")
    parser.add_argument("--demo_val_images", default=100, type=int, help="demo: generated validation images")
    parser.add_argument("--demo_image_size", default=128, type=int, help="demo: generated image side (pixels)")
    parser.add_argument("--max_bad_images", default=0.01, type=float,
                        help="fraction of unreadable images tolerated per epoch before the run stops")

    # Run.
    parser.add_argument("--output_dir", default="", help="where checkpoints, logs and results go")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto = cuda if available")
    _add_switch(parser, "amp", "--amp", "--no_amp", False, "mixed precision (fp16 on CUDA, bf16 autocast on CPU)")
    parser.add_argument("--seed", default=42, type=int, help="random seed (each rank adds its rank)")
    parser.add_argument("--resume", default="", help="checkpoint to resume from, or 'auto' (output_dir/checkpoint.pth)")
    parser.add_argument("--finetune", default="", help="DETR or pvt-detr checkpoint to start from (new run)")
    parser.add_argument("--start_epoch", default=0, type=int, help="first epoch (overridden by --resume)")
    parser.add_argument("--eval", action="store_true", help="evaluate only")
    parser.add_argument("--num_workers", default=2, type=int, help="data loader workers")
    parser.add_argument("--num_threads", default=0, type=int,
                        help="torch intra-op CPU threads (torch.set_num_threads); 0 = torch's default")
    _add_switch(parser, "no_progress", "--no_progress", "--progress", False, "no progress bars",
                "progress bars on a terminal (the default; overrides no_progress in a --config file)")
    parser.add_argument("--max_nonfinite_steps", default=0, type=int,
                        help="non-finite loss/grad steps skipped before the run stops (0 = stop at the first)")
    parser.add_argument("--plot_threshold", default=0.5, type=float,
                        help="score threshold of the detections drawn by --plot_predictions")
    parser.add_argument("--eval_every", default=1, type=int,
                        help="evaluate on the validation split every this many epochs (and after the last one)")
    parser.add_argument("--plot_predictions", default=0, type=int,
                        help="draw predictions of this many validation images into output_dir after training")

    # Distributed (filled from the environment: torchrun, SLURM or single process).
    parser.add_argument("--dist_url", default="env://", help="torch.distributed init URL")
    parser.add_argument("--dist_timeout", default=1800, type=int, help="process-group timeout in seconds")
    parser.add_argument("--local-rank", "--local_rank", dest="local_rank", default=None, type=int,
                        help="passed by the legacy `python -m torch.distributed.launch` (without --use-env); the "
                             "ranks themselves are read from the environment it also sets (LOCAL_RANK)")
    return parser


def build_cli_parser() -> argparse.ArgumentParser:
    """main.py's command line: `get_args_parser()`'s flags plus -h/--help."""
    return argparse.ArgumentParser("pvt-detr", parents=[get_args_parser()])


def main(args: argparse.Namespace) -> dict:
    """Runs training and/or evaluation; returns the final stats."""
    from training.run import run

    return run(args)


if __name__ == "__main__":
    from training.config import parse_args

    sys.exit(0 if main(parse_args(build_cli_parser())) is not None else 1)
