"""`train_one_epoch` and `evaluate` as plain functions (the role of DETR's and torchvision's engine.py).

A training step waits for the device only where it must: once for the step's counts and flags (one all-reduce of
the global box count, the cross-entropy's class-weight sum, unreadable images, empty batches and stop requests),
once per Hungarian matching (scipy runs on the CPU) and once for the gradient norm that decides whether the
update is applied. Logged losses are summed on the device and read at the end of the epoch, at progress lines
and for TensorBoard (every `TB_EVERY` steps).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from datasets.coco_eval import STAT_NAMES, CocoEvaluator
from datasets.errors import DatasetError
from pvt_detr.matcher import NonFinitePredictionError
from training import distributed as dist_utils

TB_EVERY = 10  # steps between TensorBoard points of the step loss
PROGRESS_SECONDS = 60.0  # without a terminal and --print_freq 0: about one progress line this often


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


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to `dtype` (bf16 or fp16) on the device; a no-op for None."""
    return torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def to_device(samples, targets, device: torch.device):
    samples = samples.to(device, non_blocking=True)
    targets = [{k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
               for t in targets]
    return samples, targets


def _fmt_losses(loss_dict: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in sorted(loss_dict.items()) if not k[-1].isdigit())


def new_epoch_totals() -> dict:
    """Running sums of an epoch (plain types, so a mid-epoch checkpoint can carry them and resume them)."""
    return {"sums": {}, "count": 0, "nonfinite_steps": 0, "amp_skipped_steps": 0, "bad_images": 0, "empty_steps": 0}


@dataclass
class StepSettings:
    """What every optimisation step of an epoch shares."""

    clip_max_norm: float = 0.1
    amp_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    max_nonfinite_steps: int = 0
    num_queries: int = 100
    sums: dict = field(default_factory=dict)  # loss name -> device tensor (this epoch's good steps)


class _Progress:
    """Progress lines without a terminal (SLURM logs, nohup): one every `every` steps, or about once a minute."""

    def __init__(self, epoch: int, total: int, every: int, images_per_step: int, enabled: bool):
        self.epoch, self.total, self.every, self.enabled = epoch, total, every, enabled
        self.images_per_step = images_per_step
        self.start = self.last = time.time()
        self.steps = 0  # steps run since the start

    def due(self, step: int) -> bool:
        if not self.enabled:
            return False
        if self.every:
            return (step + 1) % self.every == 0
        return time.time() - self.last >= PROGRESS_SECONDS

    def line(self, step: int, loss: float, lr: float) -> None:
        self.last = now = time.time()
        rate = self.images_per_step * self.steps / max(now - self.start, 1e-9)
        print(f"epoch {self.epoch} step {step + 1}/{self.total}: loss {loss:.4f}, lr {lr:.2e}, {rate:.1f} images/s",
              flush=True)


def train_one_epoch(model: nn.Module, criterion: nn.Module, data_loader: Iterable, optimizer: torch.optim.Optimizer,
                    lr_scheduler, device: torch.device, epoch: int, *, clip_max_norm: float = 0.1,
                    amp_dtype: torch.dtype | None = None, scaler: torch.amp.GradScaler | None = None,
                    start_step: int = 0, max_nonfinite_steps: int = 0, max_bad_images: int | None = None,
                    totals: dict | None = None, progress: bool = False, print_freq: int | None = None,
                    batch_size: int = 1, num_queries: int | None = None,
                    stop_requested: Callable[[], bool] | None = None,
                    on_stop: Callable[[int, dict], None] | None = None,
                    on_step: Callable[[int, dict], None] | None = None) -> dict[str, float]:
    """One pass over `data_loader` (which starts at `start_step` when resuming mid-epoch).

    Returns the epoch's mean of every logged loss over its applied steps (weighted `loss` and `grad_norm`
    included), `lr`, and counts: `steps`, `nonfinite_steps` (skipped for a non-finite loss, prediction or gradient),
    `amp_skipped_steps` (fp16 steps GradScaler skipped: not errors), `bad_images` (unreadable images skipped, all
    processes) and `empty_steps` (steps skipped because a batch had no readable image; every process skips them
    together, the LR schedule still advances). More than `max_bad_images` unreadable images in the epoch raise
    DatasetError. `totals` continues the running sums of a partly done epoch (see `new_epoch_totals`).
    `stop_requested()` (this process's stop signal) is combined over processes with the step's counts; when any
    process asked, `on_stop(steps_done, totals)` is called at that step boundary (it checkpoints and exits). A stop
    asked during the last step is left to the caller, after its end-of-epoch checkpoint.
    `print_freq`: None = no progress lines; 0 = about one a minute; N = every N steps (rank 0).
    `num_queries`: the decoder's queries per image (default: the model's `num_queries`), for the class-weight sum.
    """
    model.train()
    criterion.train()
    totals = {**new_epoch_totals(), **(totals or {})}
    settings = StepSettings(clip_max_norm=clip_max_norm, amp_dtype=amp_dtype, scaler=scaler,
                            max_nonfinite_steps=max_nonfinite_steps,
                            num_queries=num_queries or getattr(getattr(model, "module", model), "num_queries", 0),
                            sums={k: torch.tensor(v, dtype=torch.float64, device=device)
                                  for k, v in totals["sums"].items()})
    total = start_step + len(data_loader)
    start = time.time()
    lines = _Progress(epoch, total, print_freq or 0, batch_size * dist_utils.get_world_size(),
                      enabled=print_freq is not None and not progress and dist_utils.is_main_process())
    bar = _progress(data_loader, len(data_loader), f"epoch {epoch}", progress)
    step, lr = start_step - 1, optimizer.param_groups[0]["lr"]
    for step, batch in enumerate(bar, start=start_step):
        samples, targets = batch
        stop = stop_requested is not None and step > start_step and stop_requested()
        # One collective per step: the global box count and class-weight sum (they normalise the losses, as in
        # DETR), the images skipped as unreadable, whether a process got a batch with no readable image, and stops.
        ce_weight_sum = criterion.ce_weight_sum(targets, settings.num_queries) if samples is not None else 0.0
        counts = torch.tensor([float(sum(len(t["labels"]) for t in targets)), ce_weight_sum,
                               float(getattr(batch, "skipped", 0)), float(samples is None), float(stop)],
                              dtype=torch.float64)
        boxes, ce_weight_sum, bad_images, empty, stop = dist_utils.all_reduce_sum(
            counts.to(device, non_blocking=True)).tolist()
        if stop:
            on_stop(step, _plain_totals(totals, settings))
            return {}
        totals["bad_images"] += int(bad_images)
        if max_bad_images is not None and totals["bad_images"] > max_bad_images:
            raise DatasetError(f"{totals['bad_images']} unreadable training images in epoch {epoch} by step {step}, "
                               f"more than the {max_bad_images} that --max_bad_images allows (see the warnings above)")
        loss = None
        if empty:
            totals["empty_steps"] += 1
            print(f"warning: skipping step {step} of epoch {epoch}: a batch has no readable image", file=sys.stderr)
        else:
            samples, targets = to_device(samples, targets, device)
            world = dist_utils.get_world_size()
            loss = _optimisation_step(model, criterion, samples, targets, optimizer, device, settings,
                                      num_boxes=max(boxes / world, 1.0), ce_weight_sum=ce_weight_sum / world,
                                      epoch=epoch, step=step, total=total, totals=totals)
        lr = optimizer.param_groups[0]["lr"]  # the rate this step used
        with warnings.catch_warnings():  # a skipped first step still advances the schedule, by design
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            lr_scheduler.step()
        lines.steps += 1
        if loss is not None and (progress or lines.due(step) or (on_step is not None and step % TB_EVERY == 0)):
            loss_value = float(loss)
            if progress:
                bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}")
            if lines.due(step):
                lines.line(step, loss_value, lr)
            if on_step is not None and step % TB_EVERY == 0:
                on_step(step, {"loss": loss_value, "lr": lr})
    plain = _plain_totals(totals, settings, reduce=True)
    stats = {k: v / max(plain["count"], 1) for k, v in plain["sums"].items()}
    stats["lr"] = lr  # the last step's
    stats.update({k: plain[k] for k in ("nonfinite_steps", "amp_skipped_steps", "bad_images", "empty_steps")})
    stats["steps"] = step + 1  # of the whole epoch, including those done before a resume
    stats["time"] = time.time() - start
    return stats


def _plain_totals(totals: dict, settings: StepSettings, reduce: bool = False) -> dict:
    """The epoch's totals as plain numbers; with `reduce`, the loss sums averaged over processes (one all-reduce)."""
    names = sorted(settings.sums)
    sums = {}
    if names:
        values = torch.stack([settings.sums[k] for k in names])
        if reduce:
            values = dist_utils.all_reduce_sum(values) / dist_utils.get_world_size()
        sums = dict(zip(names, values.tolist()))
    return {**totals, "sums": sums}


def _poisoned_loss(model: nn.Module) -> torch.Tensor:
    """NaN times one element of every trainable parameter: its backward gives every parameter a NaN gradient, which
    DDP's gradient all-reduce passes to every process, so all of them skip the step together."""
    return sum(p.view(-1)[0] for p in model.parameters() if p.requires_grad) * float("nan")


def _optimisation_step(model: nn.Module, criterion: nn.Module, samples, targets, optimizer, device: torch.device,
                       settings: StepSettings, *, num_boxes: float, ce_weight_sum: float, epoch: int, step: int,
                       total: int, totals: dict) -> torch.Tensor | None:
    """Forward, backward, clip, step. Non-finite predictions (caught before the matcher) or a non-finite loss or
    gradient skip the update on every process (raising NonFiniteLossError after `max_nonfinite_steps` of them); a
    step GradScaler skips (fp16 overflow) is counted apart. Adds the step's losses to the epoch sums and returns
    the weighted loss (a device tensor), or None for a skipped step."""
    weight_dict = criterion.weight_dict
    problem = None
    with autocast(device, settings.amp_dtype):
        outputs = model(samples)
    try:
        loss_dict = criterion(outputs, targets, num_boxes=num_boxes, ce_weight_sum=ce_weight_sum or None)
        loss = sum(loss_dict[k] * weight_dict[k] for k in loss_dict if k in weight_dict)
    except NonFinitePredictionError as err:
        problem, loss_dict, loss = str(err), {}, _poisoned_loss(model)
    optimizer.zero_grad(set_to_none=True)
    scaler = settings.scaler
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    max_norm = settings.clip_max_norm if settings.clip_max_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    grad_norm_value = float(grad_norm)  # the step's one wait for the gradients: same on every process under DDP
    overflow = problem is None and not math.isfinite(grad_norm_value) and scaler is not None
    if overflow and math.isfinite(float(loss.detach())):
        scaler.step(optimizer)  # an fp16 overflow: GradScaler skips the update and lowers its scale; not an error
        scaler.update()
        totals["amp_skipped_steps"] += 1
        return None
    if problem is not None or not math.isfinite(grad_norm_value):
        totals["nonfinite_steps"] += 1
        losses = {k: float(v.detach()) for k, v in loss_dict.items()}
        loss_value = float(loss.detach()) if problem is None else float("nan")
        what = problem or ("loss" if not math.isfinite(loss_value) else f"gradient (norm {grad_norm_value})")
        message = f"non-finite {what} at epoch {epoch} step {step}/{total}: loss={loss_value:.4g}"
        message += f", {_fmt_losses(losses)}" if losses else ""
        if scaler is not None:  # the scaler sees the non-finite gradients and skips the update too
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        nonfinite = totals["nonfinite_steps"]
        if nonfinite > settings.max_nonfinite_steps:
            raise NonFiniteLossError(message + (f" (skipped {nonfinite - 1} such steps, --max_nonfinite_steps "
                                                f"{settings.max_nonfinite_steps})" if settings.max_nonfinite_steps
                                                else ""))
        print(f"warning: skipping step: {message}", file=sys.stderr)
        return None
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    sums = settings.sums
    with torch.no_grad():
        for k, v in [*loss_dict.items(), ("loss", loss), ("grad_norm", grad_norm)]:
            v = v.detach().to(torch.float64)
            sums[k] = sums[k] + v if k in sums else v
    totals["count"] += 1
    return loss.detach()


@torch.no_grad()
def predict_dataset(model: nn.Module, postprocessors: dict, data_loader: Iterable, device: torch.device,
                    criterion: nn.Module | None = None, amp_dtype: torch.dtype | None = None, progress: bool = False,
                    category_ids: torch.Tensor | None = None) -> tuple[dict[int, dict], dict[str, float]]:
    """Runs the model over a loader -> ({image_id: {scores, labels (category ids), boxes (abs xyxy)}}, mean losses).

    category_ids: (K,) the category id of each class output row (the label map); None: rows are ids."""
    model.eval()
    if criterion is not None:
        criterion.eval()
    detections: dict[int, dict] = {}
    sums: dict[str, torch.Tensor] = {}
    batches = 0
    for samples, targets in _progress(data_loader, len(data_loader), "eval", progress):
        if samples is None:  # no readable image in this batch (the dataset warned about each)
            continue
        samples, targets = to_device(samples, targets, device)
        with autocast(device, amp_dtype):
            outputs = model(samples)
        if criterion is not None:
            try:
                loss_dict = criterion(outputs, targets)
            except NonFinitePredictionError:
                loss_dict = {k: torch.tensor(float("nan"), device=device) for k in criterion.weight_dict}
            weighted = sum(loss_dict[k] * criterion.weight_dict[k] for k in loss_dict if k in criterion.weight_dict)
            for k, v in [*loss_dict.items(), ("loss", weighted)]:
                if not k[-1].isdigit():
                    sums[k] = sums[k] + v.detach().double() if k in sums else v.detach().double()
            batches += 1
        orig_sizes = torch.stack([t["orig_size"] for t in targets])  # (B, 2)
        for t, r in zip(targets, postprocessors["bbox"](outputs, orig_sizes)):
            r = {k: v.cpu() for k, v in r.items()}
            if category_ids is not None:
                r["labels"] = category_ids[r["labels"]]  # class rows -> dataset category ids
            detections[int(t["image_id"])] = r
    return detections, {k: float(v) / max(batches, 1) for k, v in sums.items()}


def evaluate(model: nn.Module, criterion: nn.Module, postprocessors: dict, data_loader: Iterable, coco_gt,
             device: torch.device, *, amp_dtype: torch.dtype | None = None, progress: bool = False,
             results_path=None, image_ids: Iterable[int] | None = None, category_ids: torch.Tensor | None = None,
             evaluator: str = "pycocotools") -> tuple[dict[str, float], CocoEvaluator]:
    """COCO box evaluation with `evaluator` (pycocotools or faster-coco-eval). Detections are gathered from all
    processes and scored once (rank 0), which also prints the per-class AP table.

    image_ids: every image of the evaluated set. Those the loader did not return (unreadable images, skipped by
    the dataset) are scored as images without detections and counted in `bad_images`. category_ids: see
    `predict_dataset`. Returns ({test_loss..., 'coco_eval_bbox': [12 stats], 'per_class_ap': [{category_id, name,
    ap, ap50, num_gt}], 'bad_images' if image_ids}, evaluator); writes the results JSON on rank 0.
    """
    detections, losses = predict_dataset(model, postprocessors, data_loader, device, criterion, amp_dtype, progress,
                                         category_ids)
    coco_evaluator = CocoEvaluator(coco_gt, evaluator)
    coco_evaluator.update(detections)
    gathered = dist_utils.all_gather_object((coco_evaluator.results, coco_evaluator.image_ids, losses))
    stats: list[float] | None = None
    per_class: list[dict] = []
    bad_images = 0
    if dist_utils.is_main_process():
        merged = CocoEvaluator(coco_gt, evaluator)
        for results, returned_ids, _ in gathered:
            merged.extend(results, returned_ids)
        coco_evaluator = merged
        if image_ids is not None:
            unread = sorted({int(i) for i in image_ids} - set(coco_evaluator.image_ids))
            if unread:
                print(f"warning: {len(unread)} unreadable validation images scored without detections",
                      file=sys.stderr)
            coco_evaluator.extend([], unread)
            bad_images = len(unread)
        stats = coco_evaluator.summarize()
        print(coco_evaluator.per_class_table())
        per_class = [dataclasses.asdict(row) for row in coco_evaluator.per_class_ap()]
        if results_path is not None:
            coco_evaluator.write_results(results_path)
    stats, per_class, bad_images = dist_utils.all_gather_object((stats, per_class, bad_images))[0]
    mean_losses = {k: sum(g[2].get(k, 0.0) for g in gathered) / len(gathered) for k in losses}
    out = dict(mean_losses)
    out["coco_eval_bbox"] = stats
    out["per_class_ap"] = per_class
    out.update({name: value for name, value in zip(STAT_NAMES, stats)})
    if image_ids is not None:
        out["bad_images"] = bad_images
    return out, coco_evaluator
