"""`train_one_epoch` and `evaluate` as plain functions (the role of DETR's and torchvision's engine.py)."""

from __future__ import annotations

import math
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable

import torch
from torch import nn

from datasets.coco_eval import STAT_NAMES, CocoEvaluator
from training import distributed as dist_utils


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss or gradient more often than allowed; the message names step and losses."""


def _progress(iterable: Iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, leave=False)


def progress_enabled(args) -> bool:
    """Progress bars on rank 0 when stderr is a terminal, unless --no_progress."""
    return not getattr(args, "no_progress", False) and sys.stderr.isatty() and dist_utils.is_main_process()


def autocast(device: torch.device, enabled: bool):
    """fp16 autocast on CUDA, bf16 on CPU; a no-op when disabled."""
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


def to_device(samples, targets, device: torch.device):
    samples = samples.to(device, non_blocking=True)
    targets = [{k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
               for t in targets]
    return samples, targets


def _fmt_losses(loss_dict: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in sorted(loss_dict.items()) if not k[-1].isdigit())


def train_one_epoch(model: nn.Module, criterion: nn.Module, data_loader: Iterable, optimizer: torch.optim.Optimizer,
                    lr_scheduler, device: torch.device, epoch: int, *, clip_max_norm: float = 0.1, amp: bool = False,
                    scaler: torch.amp.GradScaler | None = None, start_step: int = 0, max_nonfinite_steps: int = 0,
                    progress: bool = False, should_stop: Callable[[], bool] | None = None,
                    on_stop: Callable[[int], None] | None = None, on_step: Callable[[int, dict], None] | None = None,
                    ) -> dict[str, float]:
    """One pass over `data_loader` (which starts at `start_step` when resuming mid-epoch).

    Returns the epoch's mean of every logged loss (weighted `loss` included), `lr`, and counts. At a step boundary
    where `should_stop()` is true, calls `on_stop(steps_done)` (which checkpoints and exits).
    """
    model.train()
    criterion.train()
    weight_dict = criterion.weight_dict
    sums: dict[str, float] = defaultdict(float)
    count = 0
    nonfinite = 0
    total = start_step + len(data_loader)
    start = time.time()
    bar = _progress(data_loader, len(data_loader), f"epoch {epoch}", progress)
    step = start_step
    for step, (samples, targets) in enumerate(bar, start=start_step):
        samples, targets = to_device(samples, targets, device)
        # The global box count (all processes) normalises the box losses, as in DETR.
        num_boxes = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        num_boxes = max(dist_utils.all_reduce_sum(num_boxes).item() / dist_utils.get_world_size(), 1.0)
        with autocast(device, amp):
            outputs = model(samples)
            loss_dict = criterion(outputs, targets, num_boxes=num_boxes)
        loss = sum(loss_dict[k] * weight_dict[k] for k in loss_dict if k in weight_dict)

        reduced = {k: v.detach().float() for k, v in dist_utils.reduce_dict(loss_dict).items()}
        loss_value = sum(reduced[k].item() * weight_dict[k] for k in reduced if k in weight_dict)
        grad_norm = None
        finite = math.isfinite(loss_value)
        if finite:
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            max_norm = clip_max_norm if clip_max_norm > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
            finite = math.isfinite(grad_norm) or scaler is not None  # the AMP scaler skips inf steps itself
        if not finite:
            nonfinite += 1
            what = "loss" if not math.isfinite(loss_value) else f"gradient (norm {grad_norm})"
            message = (f"non-finite {what} at epoch {epoch} step {step}/{total}: loss={loss_value:.4g}, "
                       f"{_fmt_losses({k: v.item() for k, v in reduced.items()})}")
            optimizer.zero_grad(set_to_none=True)
            if nonfinite > max_nonfinite_steps:
                raise NonFiniteLossError(message + (f" (skipped {nonfinite - 1} such steps, --max_nonfinite_steps "
                                                    f"{max_nonfinite_steps})" if max_nonfinite_steps else ""))
            print(f"warning: skipping step: {message}", file=sys.stderr)
        else:
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            for k, v in reduced.items():
                sums[k] += v.item()
            sums["loss"] += loss_value
            sums["grad_norm"] += grad_norm
            count += 1
        lr_scheduler.step()
        if progress:
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        if on_step is not None:
            on_step(step, {"loss": loss_value, "lr": optimizer.param_groups[0]["lr"]})
        if should_stop is not None and should_stop():
            on_stop(step + 1)
            return {}
    stats = {k: v / max(count, 1) for k, v in sums.items()}
    stats["lr"] = optimizer.param_groups[0]["lr"]
    stats["nonfinite_steps"] = nonfinite
    stats["steps"] = step + 1 - start_step
    stats["time"] = time.time() - start
    return stats


@torch.no_grad()
def predict_dataset(model: nn.Module, postprocessors: dict, data_loader: Iterable, device: torch.device,
                    criterion: nn.Module | None = None, amp: bool = False, progress: bool = False,
                    ) -> tuple[dict[int, dict], dict[str, float]]:
    """Runs the model over a loader -> ({image_id: {scores, labels, boxes (abs xyxy)}}, mean losses)."""
    model.eval()
    if criterion is not None:
        criterion.eval()
    detections: dict[int, dict] = {}
    sums: dict[str, float] = defaultdict(float)
    batches = 0
    for samples, targets in _progress(data_loader, len(data_loader), "eval", progress):
        samples, targets = to_device(samples, targets, device)
        with autocast(device, amp):
            outputs = model(samples)
        outputs = {k: v.float() for k, v in outputs.items() if isinstance(v, torch.Tensor)}
        if criterion is not None:
            loss_dict = criterion(outputs, targets)
            weighted = sum(loss_dict[k].item() * criterion.weight_dict[k] for k in loss_dict if k in
                           criterion.weight_dict)
            for k, v in loss_dict.items():
                if not k[-1].isdigit():
                    sums[k] += v.item()
            sums["loss"] += weighted
            batches += 1
        orig_sizes = torch.stack([t["orig_size"] for t in targets])  # (B, 2)
        for t, r in zip(targets, postprocessors["bbox"](outputs, orig_sizes)):
            detections[int(t["image_id"])] = {k: v.cpu() for k, v in r.items()}
    return detections, {k: v / max(batches, 1) for k, v in sums.items()}


def evaluate(model: nn.Module, criterion: nn.Module, postprocessors: dict, data_loader: Iterable, coco_gt,
             device: torch.device, *, amp: bool = False, progress: bool = False, results_path=None,
             ) -> tuple[dict[str, float], CocoEvaluator]:
    """COCO box evaluation. Detections are gathered from all processes and scored once (rank 0).

    Returns ({test_loss..., 'coco_eval_bbox': [12 stats]}, evaluator); writes the results JSON on rank 0.
    """
    detections, losses = predict_dataset(model, postprocessors, data_loader, device, criterion, amp, progress)
    evaluator = CocoEvaluator(coco_gt)
    evaluator.update(detections)
    gathered = dist_utils.all_gather_object((evaluator.results, evaluator.image_ids, losses))
    stats: list[float] | None = None
    if dist_utils.is_main_process():
        merged = CocoEvaluator(coco_gt)
        for results, image_ids, _ in gathered:
            merged.extend(results, image_ids)
        evaluator = merged
        stats = evaluator.summarize()
        if results_path is not None:
            evaluator.write_results(results_path)
    stats = dist_utils.all_gather_object(stats)[0]
    mean_losses = {k: sum(g[2].get(k, 0.0) for g in gathered) / len(gathered) for k in losses}
    out = dict(mean_losses)
    out["coco_eval_bbox"] = stats
    out.update({name: value for name, value in zip(STAT_NAMES, stats)})
    return out, evaluator
