"""AdamW with a separate backbone learning rate, and the step-decay schedule with optional linear warm-up."""

from __future__ import annotations

import torch
from torch import nn


def build_optimizer(model: nn.Module, args) -> torch.optim.AdamW:
    """AdamW(lr, weight_decay) over the transformer and heads; the backbone at lr_backbone (DETR's groups)."""
    backbone = [p for n, p in model.named_parameters() if n.startswith("backbone.") and p.requires_grad]
    rest = [p for n, p in model.named_parameters() if not n.startswith("backbone.") and p.requires_grad]
    groups = [{"params": rest, "lr": args.lr}]
    if args.lr_backbone > 0:
        groups.append({"params": backbone, "lr": args.lr_backbone})
    else:
        for p in backbone:  # lr_backbone 0 freezes the backbone, as in DETR
            p.requires_grad_(False)
    # The fused kernel (one pass over every parameter per step; CPU and CUDA) instead of the per-tensor loop that
    # PyTorch uses by default on the CPU: ~4x faster on pvt_small. Same update up to float rounding.
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay, fused=fused)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, args, iters_per_epoch: int):
    """Stepped once per iteration: LR x 0.1 from epoch `lr_drop` on (DETR's StepLR), times a linear warm-up over the
    first `warmup_iters` iterations (0 = none, the paper's recipe)."""
    iters_per_epoch = max(iters_per_epoch, 1)

    def factor(it: int) -> float:
        warm = min(1.0, (it + 1) / args.warmup_iters) if args.warmup_iters > 0 else 1.0
        return warm * (0.1 if it // iters_per_epoch >= args.lr_drop else 1.0)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def restore_lr_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, args, iteration: int) -> None:
    """Puts the schedule of a resumed run at `iteration` steps done (epoch * iters_per_epoch + step of this run), with
    this run's --lr, --lr_backbone and --weight_decay.

    The schedule is rebuilt from the flags rather than loaded: a loaded optimizer keeps the learning rates and weight
    decay of the run that saved it, and a loaded LambdaLR counts that run's steps, which after a change of world size
    or batch size would put the LR drop and the warm-up at the wrong epoch. With unchanged flags and step counts this
    gives exactly the saved schedule.
    """
    base = [args.lr, args.lr_backbone][: len(scheduler.optimizer.param_groups)]  # the groups of `build_optimizer`
    lrs = [lr * fn(iteration) for lr, fn in zip(base, scheduler.lr_lambdas)]
    for group, initial, lr in zip(scheduler.optimizer.param_groups, base, lrs):
        group["initial_lr"] = initial
        group["weight_decay"] = args.weight_decay
        group["lr"] = lr
    scheduler.base_lrs = list(base)
    scheduler.last_epoch = iteration
    scheduler._last_lr = lrs
