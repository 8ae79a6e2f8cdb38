"""`train_one_epoch` and `evaluate` as plain functions (the role of DETR's and torchvision's engine.py)."""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable

import torch
from torch import nn

from datasets.coco_eval import STAT_NAMES, CocoEvaluator
from datasets.errors import DatasetError
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


def new_epoch_totals() -> dict:
    """Running sums of an epoch (plain types, so a mid-epoch checkpoint can carry them and resume them)."""
    return {"sums": {}, "count": 0, "nonfinite_steps": 0, "bad_images": 0, "empty_steps": 0}


def train_one_epoch(model: nn.Module, criterion: nn.Module, data_loader: Iterable, optimizer: torch.optim.Optimizer,
                    lr_scheduler, device: torch.device, epoch: int, *, clip_max_norm: float = 0.1, amp: bool = False,
                    scaler: torch.amp.GradScaler | None = None, start_step: int = 0, max_nonfinite_steps: int = 0,
                    max_bad_images: int | None = None, totals: dict | None = None, progress: bool = False,
                    should_stop: Callable[[], bool] | None = None, on_stop: Callable[[int, dict], None] | None = None,
                    on_step: Callable[[int, dict], None] | None = None) -> dict[str, float]:
    """One pass over `data_loader` (which starts at `start_step` when resuming mid-epoch).

    Returns the epoch's mean of every logged loss (weighted `loss` included), `lr`, and counts: `steps`,
    `nonfinite_steps`, `bad_images` (unreadable images skipped, all processes) and `empty_steps` (steps skipped
    because a batch had no readable image; every process skips them together, the LR schedule still advances).
    More than `max_bad_images` unreadable images in the epoch raise DatasetError. `totals` continues the running
    sums of a partly done epoch (see `new_epoch_totals`). At a step boundary before the last step where
    `should_stop()` is true, calls `on_stop(steps_done, totals)` (which checkpoints and exits); a stop requested
    during the last step is left to the caller, after its end-of-epoch checkpoint.
    """
    model.train()
    criterion.train()
    totals = {**(new_epoch_totals() if totals is None else totals)}
    sums: dict[str, float] = defaultdict(float, totals["sums"])
    totals["sums"] = sums
    total = start_step + len(data_loader)
    start = time.time()
    bar = _progress(data_loader, len(data_loader), f"epoch {epoch}", progress)
    step = start_step - 1
    for step, batch in enumerate(bar, start=start_step):
        samples, targets = batch
        # One collective per step: the global box count (it normalises the box losses, as in DETR), the images
        # skipped as unreadable, and whether some process got a batch with no readable image at all.
        counts = torch.tensor([float(sum(len(t["labels"]) for t in targets)), float(getattr(batch, "skipped", 0)),
                               float(samples is None)], device=device)
        boxes, bad_images, empty = dist_utils.all_reduce_sum(counts).tolist()
        totals["bad_images"] += int(bad_images)
        if max_bad_images is not None and totals["bad_images"] > max_bad_images:
            raise DatasetError(f"{totals['bad_images']} unreadable training images in epoch {epoch} by step {step}, "
                               f"more than the {max_bad_images} that --max_bad_images allows (see the warnings above)")
        loss_value = float("nan")
        if empty:
            totals["empty_steps"] += 1
            print(f"warning: skipping step {step} of epoch {epoch}: a batch has no readable image", file=sys.stderr)
        else:
            samples, targets = to_device(samples, targets, device)
            num_boxes = max(boxes / dist_utils.get_world_size(), 1.0)
            loss_value = _optimisation_step(model, criterion, samples, targets, num_boxes, optimizer, device,
                                            epoch=epoch, step=step, total=total, clip_max_norm=clip_max_norm,
                                            amp=amp, scaler=scaler, max_nonfinite_steps=max_nonfinite_steps,
                                            totals=totals)
        with warnings.catch_warnings():  # a skipped first step still advances the schedule, by design
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            lr_scheduler.step()
        if progress:
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        if on_step is not None and not empty:
            on_step(step, {"loss": loss_value, "lr": optimizer.param_groups[0]["lr"]})
        if should_stop is not None and step + 1 < total and should_stop():
            on_stop(step + 1, {**totals, "sums": dict(sums)})
            return {}
    stats = {k: v / max(totals["count"], 1) for k, v in sums.items()}
    stats["lr"] = optimizer.param_groups[0]["lr"]
    stats.update({k: totals[k] for k in ("nonfinite_steps", "bad_images", "empty_steps")})
    stats["steps"] = step + 1  # of the whole epoch, including those done before a resume
    stats["time"] = time.time() - start
    return stats


def _optimisation_step(model: nn.Module, criterion: nn.Module, samples, targets, num_boxes: float, optimizer,
                       device: torch.device, *, epoch: int, step: int, total: int, clip_max_norm: float, amp: bool,
                       scaler, max_nonfinite_steps: int, totals: dict) -> float:
    """Forward, backward, clip, step; a non-finite loss or gradient skips the update (raising NonFiniteLossError
    after `max_nonfinite_steps` of them). Adds the step's losses to `totals`; returns the weighted loss."""
    weight_dict = criterion.weight_dict
    with autocast(device, amp):
        # Denoising training (--dn_groups) builds extra queries from the targets.
        takes_targets = getattr(getattr(model, "module", model), "takes_targets", False)
        outputs = model(samples, targets) if takes_targets else model(samples)
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
        totals["nonfinite_steps"] += 1
        nonfinite = totals["nonfinite_steps"]
        what = "loss" if not math.isfinite(loss_value) else f"gradient (norm {grad_norm})"
        message = (f"non-finite {what} at epoch {epoch} step {step}/{total}: loss={loss_value:.4g}, "
                   f"{_fmt_losses({k: v.item() for k, v in reduced.items()})}")
        optimizer.zero_grad(set_to_none=True)
        if nonfinite > max_nonfinite_steps:
            raise NonFiniteLossError(message + (f" (skipped {nonfinite - 1} such steps, --max_nonfinite_steps "
                                                f"{max_nonfinite_steps})" if max_nonfinite_steps else ""))
        print(f"warning: skipping step: {message}", file=sys.stderr)
        return loss_value
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    sums = totals["sums"]
    for k, v in reduced.items():
        sums[k] += v.item()
    sums["loss"] += loss_value
    sums["grad_norm"] += grad_norm
    totals["count"] += 1
    return loss_value


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
        if samples is None:  # no readable image in this batch (the dataset warned about each)
            continue
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
             image_ids: Iterable[int] | None = None) -> tuple[dict[str, float], CocoEvaluator]:
    """COCO box evaluation. Detections are gathered from all processes and scored once (rank 0).

    image_ids: every image of the evaluated set. Those the loader did not return (unreadable images, skipped by
    the dataset) are scored as images without detections and counted in `bad_images`.
    Returns ({test_loss..., 'coco_eval_bbox': [12 stats], 'bad_images' if image_ids}, evaluator); writes the
    results JSON on rank 0.
    """
    detections, losses = predict_dataset(model, postprocessors, data_loader, device, criterion, amp, progress)
    evaluator = CocoEvaluator(coco_gt)
    evaluator.update(detections)
    gathered = dist_utils.all_gather_object((evaluator.results, evaluator.image_ids, losses))
    stats: list[float] | None = None
    bad_images = 0
    if dist_utils.is_main_process():
        merged = CocoEvaluator(coco_gt)
        for results, returned_ids, _ in gathered:
            merged.extend(results, returned_ids)
        evaluator = merged
        if image_ids is not None:
            unread = sorted({int(i) for i in image_ids} - set(evaluator.image_ids))
            if unread:
                print(f"warning: {len(unread)} unreadable validation images scored without detections",
                      file=sys.stderr)
            evaluator.extend([], unread)
            bad_images = len(unread)
        stats = evaluator.summarize()
        if results_path is not None:
            evaluator.write_results(results_path)
    stats, bad_images = dist_utils.all_gather_object((stats, bad_images))[0]
    mean_losses = {k: sum(g[2].get(k, 0.0) for g in gathered) / len(gathered) for k in losses}
    out = dict(mean_losses)
    out["coco_eval_bbox"] = stats
    out.update({name: value for name, value in zip(STAT_NAMES, stats)})
    if image_ids is not None:
        out["bad_images"] = bad_images
    return out, evaluator
