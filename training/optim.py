"""AdamW with a separate backbone learning rate, and the step-decay schedule with optional linear warm-up."""

from __future__ import annotations

import torch
from torch import nn


def freeze_backbone_if_asked(model: nn.Module, args) -> None:
    """`--lr_backbone 0` freezes the backbone (DETR's convention). Call it before wrapping the model in DDP, which
    must know which parameters get gradients."""
    if args.lr_backbone == 0:
        for name, p in model.named_parameters():
            if name.startswith("backbone."):
                p.requires_grad_(False)


def build_optimizer(model: nn.Module, args) -> torch.optim.AdamW:
    """AdamW(lr, weight_decay) over the transformer and heads; the backbone at lr_backbone (DETR's groups).
    Parameters that do not require gradients (a frozen backbone) are left out."""
    backbone = [p for n, p in model.named_parameters() if n.startswith("backbone.") and p.requires_grad]
    rest = [p for n, p in model.named_parameters() if not n.startswith("backbone.") and p.requires_grad]
    groups = [{"params": rest, "lr": args.lr}]
    if backbone:
        groups.append({"params": backbone, "lr": args.lr_backbone})
    # The fused kernel (one pass over every parameter per step; CPU and CUDA) instead of the per-tensor loop that
    # PyTorch uses by default on the CPU. Same update up to float rounding.
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay, fused=fused)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, args, iters_per_epoch: int,
                       start_iteration: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per iteration: LR x 0.1 from epoch `lr_drop` on (DETR's StepLR), times a linear warm-up over the
    first `warmup_iters` iterations (0 = none, the paper's recipe).

    `start_iteration`: the steps already done (a resumed run: epoch * iters_per_epoch + step of this run). The
    schedule is rebuilt from this run's flags (--lr, --lr_backbone, --weight_decay, --lr_drop, --warmup_iters) rather
    than loaded: a loaded optimizer keeps the rates of the run that saved it, and a loaded LambdaLR counts that run's
    steps, which after a change of world size or batch size would put the LR drop at the wrong epoch. With
    unchanged flags and step counts this gives exactly the saved schedule.
    """
    iters_per_epoch = max(iters_per_epoch, 1)

    def factor(it: int) -> float:
        warm = min(1.0, (it + 1) / args.warmup_iters) if args.warmup_iters > 0 else 1.0
        return warm * (0.1 if it // iters_per_epoch >= args.lr_drop else 1.0)

    base = [args.lr, args.lr_backbone][: len(optimizer.param_groups)]  # the groups of `build_optimizer`
    for group, lr in zip(optimizer.param_groups, base):
        group["initial_lr"] = lr  # what LambdaLR scales; set for a schedule that starts after step 0
        group["weight_decay"] = args.weight_decay
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=start_iteration - 1)
