"""A whole run, in named steps: set up the process, load the data, claim the output folder, build the model and
optimiser, resume, train epoch by epoch (evaluating and checkpointing), and finish.

`main.main(args)` calls `run(args)`; so does the SLURM launcher. Expected failures (bad flags, data or
checkpoints, non-finite losses, too many unreadable images, a collective failing because another process died
or timed out) end with one line on stderr and exit code 1, never a deep traceback. A stop signal (SIGTERM,
SIGUSR1, SIGUSR2, and Ctrl-C's SIGINT) checkpoints at the next step boundary and exits with code 0 (130 for
Ctrl-C).
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed
from torch import nn
from torch.utils.data import BatchSampler, DataLoader

from datasets import DatasetError, build_dataset, collate_fn, get_coco_api_from_dataset
from pvt_detr import build_model, load_detr_checkpoint, load_pvt_checkpoint
from pvt_detr.checkpoints import CheckpointError, checkpoint_label_map, fit_class_heads, read_checkpoint
from pvt_detr.config import MAX_NUM_CLASSES, ModelConfig
from pvt_detr.label_map import LabelMap
from training import distributed as dist_utils
from training.checkpoint import (
    architecture_mismatch,
    load_checkpoint,
    remove_stale_temp_files,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from training.config import config_dict, save_config
from training.devices import (
    DeviceSetupError,
    amp_dtype,
    check_gpu_layout,
    configure_tf32,
    grad_scaler,
    local_world_size,
)
from training.engine import NonFiniteLossError, evaluate, progress_enabled, train_one_epoch
from training.logs import TensorBoardLogger, append_log, plot_curves, read_log, truncate_log
from training.optim import build_lr_scheduler, build_optimizer, freeze_backbone_if_asked
from training.preemption import PreemptionHandler, ignore_stop_signals
from training.sampling import EpochSeededDataset, ResumableSampler

# Files and folders a training run writes into --output_dir (what --overwrite replaces).
RUN_OUTPUTS = ("checkpoint.pth", "log.txt", "config.yaml", "results_val.json", "final_stats.json", "curves.png",
               "per_class_ap.txt", "tensorboard", "predictions")
SUBFOLDERS = ("tensorboard", "predictions")


class RunError(RuntimeError):
    """A run cannot go on; the message is one line."""


# ---------------------------------------------------------------------------------------------------------------
# Errors


# Lower-case fragments of the errors gloo / NCCL raise when a peer died or hung. Some carry no backend name, e.g.
# gloo's "Application timeout caused pair closure" from DDP's gradient all-reduce inside backward().
COLLECTIVE_FAILURE_MARKERS = ("gloo", "nccl", "connection closed", "connection reset", "broken pipe", "pair closure",
                              "timed out")
# Failures of the storage rather than of the code (disk full, quota, read-only, permissions, a file or folder in the
# way): reported in one line naming the file.
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR}


def _collective_failure(error: BaseException) -> bool:
    """True for an error raised by torch.distributed because another process died, hung or is unreachable."""
    if isinstance(error, torch.distributed.DistError):
        return True
    text = str(error).lower()
    return dist_utils.is_dist_avail_and_initialized() and any(m in text for m in COLLECTIVE_FAILURE_MARKERS)


def _fail(message: str, code: int = 1):
    print(f"error: {message}", file=sys.stderr, flush=True)
    dist_utils.cleanup()
    raise SystemExit(code) from None


def run(args) -> dict:
    """Runs training (or evaluation with --eval); returns the last evaluation stats. Exits 1 with one line on
    expected errors, 130 after Ctrl-C."""
    preemption = PreemptionHandler()
    try:
        return _run(args, preemption)
    except (DatasetError, CheckpointError, NonFiniteLossError, RunError, dist_utils.DistributedSetupError,
            DeviceSetupError) as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _fail("interrupted (Ctrl-C); the last complete checkpoint, if any, is intact: --resume auto continues", 130)
    except OSError as e:
        if e.errno not in _STORAGE_ERRNOS:
            raise
        what = f"{e.filename}: cannot write or read it" if e.filename else "a file could not be written or read"
        _fail(f"{what}: {e.strerror or e}")
    except RuntimeError as e:
        if not _collective_failure(e):
            raise
        # Every rank reports (print is silenced on ranks > 0); the first line of gloo/NCCL errors says it all.
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        sys.stderr.write(f"error: rank {getattr(args, 'rank', 0)}: a distributed operation failed, another process "
                         f"probably died or timed out (--dist_timeout {getattr(args, 'dist_timeout', '?')} s): "
                         f"{first}\n")
        sys.stderr.flush()
        dist_utils.cleanup()
        raise SystemExit(1) from None
    finally:
        preemption.uninstall()


def _run(args, preemption: PreemptionHandler) -> dict:
    device = setup_process(args)
    output_dir = claim_output_dir(args)
    data = load_data(args)
    if output_dir is not None and dist_utils.is_main_process():
        save_config(args, output_dir / "config.yaml")  # with the derived --num_classes
    parts = build_parts(args, data, device)
    if args.eval:
        return evaluate_only(args, parts, data, device, output_dir)
    return train(args, parts, data, device, output_dir, preemption)


# ---------------------------------------------------------------------------------------------------------------
# Set-up


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup_process(args) -> torch.device:
    """Joins the process group (if several processes), picks the device, seeds, threads and float32 matmul mode."""
    if args.device != "cpu" and torch.cuda.is_available():
        check_gpu_layout(local_world_size(), torch.cuda.device_count())
    device = dist_utils.init_distributed_mode(args)
    seed_everything(args.seed + dist_utils.get_rank())
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    note = configure_tf32(args.tf32, device)
    if note:
        print(note)
    if args.amp:
        dtype = amp_dtype(args, device)
        print(f"mixed precision: {str(dtype).removeprefix('torch.')} autocast on {device.type}"
              + (" with a gradient scaler" if grad_scaler(dtype, device) is not None else ""))
    return device


@dataclass
class Data:
    """The datasets of a run and what its class outputs stand for: DETR's layout, row = category id (label_map)."""

    train: torch.utils.data.Dataset | None
    val: torch.utils.data.Dataset
    coco_val: object  # pycocotools COCO of the validation split
    label_map: LabelMap

    @property
    def category_ids(self) -> torch.Tensor:
        """(K,) the category id of each class output row."""
        return torch.tensor(self.label_map.category_ids, dtype=torch.int64)


def _usable_boxes(dataset) -> int:
    """Non-crowd annotations with a box in a dataset's (validated) annotations: what training and AP can use."""
    return sum(1 for a in dataset.coco.dataset["annotations"] if not a.get("iscrowd", 0))


def _check_split_has_boxes(dataset, split: str) -> None:
    """DatasetError naming the split and why when it has no usable box (all crowd, no boxes, or no annotations)."""
    if _usable_boxes(dataset):
        return
    annotations = dataset.coco.dataset["annotations"]
    report = getattr(dataset, "report", None)
    dropped = sum(report.fix_counts().values()) if report is not None else 0
    if annotations:
        why = f"all {len(annotations)} kept annotations are crowd regions (iscrowd=1)"
    elif dropped:
        why = f"none of its annotations has a usable bbox ({dropped} dropped, see the data: line above)"
    else:
        why = "it has no annotations"
    path = report.ann_file if report is not None else split
    raise DatasetError(f"{path}: the {split} split has no usable box to train or evaluate on: {why}")


def load_data(args) -> Data:
    """Builds the splits (rank 0 first, so that a demo dataset is generated once), checks they hold boxes, merges
    their categories (reporting ids found in only one) and derives --num_classes (max category id + 1)."""
    if args.distributed and not dist_utils.is_main_process():
        dist_utils.barrier()
    dataset_val = build_dataset("val", args)
    dataset_train = None if args.eval else build_dataset("train", args)
    if args.distributed and dist_utils.is_main_process():
        dist_utils.barrier()
    coco_val = get_coco_api_from_dataset(dataset_val)
    _check_split_has_boxes(dataset_val, "val")
    val_categories = {c["id"]: c["name"] for c in coco_val.loadCats(coco_val.getCatIds())}
    categories = dict(val_categories)
    if dataset_train is not None:
        _check_split_has_boxes(dataset_train, "train")
        coco_train = dataset_train.coco
        train_categories = {c["id"]: c["name"] for c in coco_train.loadCats(coco_train.getCatIds())}
        only_train = sorted(set(train_categories) - set(val_categories))
        only_val = sorted(set(val_categories) - set(train_categories))
        renamed = sorted(i for i in set(train_categories) & set(val_categories)
                         if train_categories[i] != val_categories[i])
        if only_train or only_val or renamed:
            parts = [f"ids only in the training file: {only_train}" if only_train else "",
                     f"ids only in the validation file: {only_val}" if only_val else "",
                     f"ids named differently (the training file's names are kept): {renamed}" if renamed else ""]
            print("warning: the training and validation files have different categories: "
                  + "; ".join(p for p in parts if p), file=sys.stderr)
        categories = {**val_categories, **train_categories}
    max_id = max(categories)
    if args.num_classes is None:
        needed = max_id + 1
        if needed > MAX_NUM_CLASSES or (needed > 10 * len(categories) and needed > 1000):
            raise DatasetError(f"category ids up to {max_id} for {len(categories)} categories would need a "
                               f"{needed}-way class head: renumber the category ids (e.g. 1..{len(categories)}) in "
                               "the annotation files")
        args.num_classes = needed
        print(f"num_classes = {args.num_classes} (max category id + 1, from the annotation files)")
    elif max_id >= args.num_classes:
        raise RunError(f"--num_classes {args.num_classes} is too small for category id {max_id} of the annotation "
                       f"files (it must be at least {max_id + 1}; leave it unset to derive it)")
    label_map = LabelMap(tuple((row, categories.get(row)) for row in range(args.num_classes)))
    return Data(dataset_train, dataset_val, coco_val, label_map)


def _resolve_resume(args) -> Path | None:
    if args.resume == "auto":
        candidate = Path(args.output_dir) / "checkpoint.pth" if args.output_dir else None
        return candidate if candidate is not None and candidate.is_file() else None
    return Path(args.resume) if args.resume else None


def claim_output_dir(args) -> Path | None:
    """Checks --output_dir before anything is written: it can be written, its subfolder names are free, and it
    holds no other run unless this one continues it (--resume) or replaces it (--overwrite, which names what it
    removes). Returns the folder (None without --output_dir)."""
    if args.eval and not (_resolve_resume(args) or args.finetune):
        raise RunError("--eval needs weights to evaluate: --resume CHECKPOINT (or --resume auto with a checkpoint.pth "
                       f"in --output_dir{' ' + args.output_dir if args.output_dir else ''}) or --finetune CHECKPOINT")
    if not args.output_dir:
        return None
    output_dir = Path(args.output_dir)
    for name in SUBFOLDERS:
        if (output_dir / name).exists() and not (output_dir / name).is_dir():
            raise RunError(f"--output_dir {output_dir}: {output_dir / name} is a file, but the run writes a folder "
                           "of that name: move it away")
    existing = [name for name in ("checkpoint.pth", "log.txt") if (output_dir / name).is_file()]
    if not args.eval and args.resume == "auto" and _resolve_resume(args) is None:
        print(f"--resume auto: no checkpoint.pth in {output_dir}: starting a new run")
        if existing:  # a run that never finished an epoch: nothing to continue
            _replace_run(output_dir, "a run without a checkpoint")
    elif not args.eval and not args.resume and existing:
        if not args.overwrite:
            raise RunError(f"--output_dir {output_dir} already holds a run ({', '.join(existing)}): pass --resume "
                           "auto to continue it, or --overwrite to start over")
        _replace_run(output_dir, "--overwrite")
    if dist_utils.is_main_process():
        probe = output_dir / f".write-test-{os.getpid()}"
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise RunError(f"--output_dir {output_dir}: cannot write there: {e.strerror or e}") from None
    return output_dir


def _replace_run(output_dir: Path, why: str) -> None:
    """Removes a previous run's outputs from output_dir (rank 0), saying which."""
    names = sorted({p.name for p in output_dir.glob("checkpoint*.pth")}
                   | {n for n in RUN_OUTPUTS if (output_dir / n).exists()})
    print(f"{why}: replacing the run in {output_dir}: {', '.join(names)}")
    if not dist_utils.is_main_process():
        return
    for name in names:
        path = output_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


@dataclass
class Parts:
    """The trainable parts of a run. `model` is what runs (DDP-wrapped and/or compiled); `module` the DETR itself."""

    model: nn.Module
    module: nn.Module
    criterion: nn.Module
    postprocessors: dict
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None
    optimizer: torch.optim.Optimizer | None
    n_params: int


def build_parts(args, data: Data, device: torch.device) -> Parts:
    """Model, criterion and post-processor from the flags; pretrained or fine-tuning weights; the frozen backbone
    and the optimiser (both before DDP, which must know the trainable parameters); DDP and torch.compile."""
    model, criterion, postprocessors = build_model(args)
    if args.pretrained_backbone:
        report = load_pvt_checkpoint(model.backbone, args.pretrained_backbone)
        print(f"backbone from {args.pretrained_backbone}: {report}".replace("\n", "; "))
    if args.finetune:
        _finetune_from(args.finetune, model, args, data.label_map)
    model.to(device)
    criterion.to(device)
    freeze_backbone_if_asked(model, args)
    optimizer = None if args.eval else build_optimizer(model, args)
    module = model
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)
        print("torch.compile: the model compiles on its first training and evaluation steps")
    dtype = amp_dtype(args, device)
    n_params = sum(p.numel() for p in module.parameters() if p.requires_grad)
    print(f"model {args.backbone} + DETR: {n_params / 1e6:.2f} M trainable parameters, device {device}, "
          f"{dist_utils.get_world_size()} process(es)")
    return Parts(model, module, criterion, postprocessors, dtype, grad_scaler(dtype, device), optimizer, n_params)


def _finetune_from(path: str, model: nn.Module, args, label_map: LabelMap) -> None:
    """Loads --finetune's weights: a pvt-detr checkpoint must have this run's architecture (any class count); its
    class head is kept, moved by category name or left out, by how its label map compares with the dataset's
    (facebookresearch/detr's 91-class heads are COCO's; MMDetection's are matched by class name)."""
    state, notes = read_checkpoint(path)
    for note in notes:
        print(note)
    _check_architecture(state, args, path, "fine-tune from it with the same architecture flags",
                        ignore=("num_classes",))
    source = checkpoint_label_map(state)
    weights = state.get("model") if isinstance(state, dict) else None
    if source is None and isinstance(weights, dict) and getattr(weights.get("class_embed.weight"), "shape", (0,))[0] \
            == LabelMap.coco().num_classes + 1 and not any(k.startswith("bbox_head.") for k in weights):
        source = LabelMap.coco()  # facebookresearch/detr's COCO models: 91 classes + no-object, row = id
    note = None
    if source is not None and isinstance(weights, dict):
        weights, note = fit_class_heads(weights, source, label_map, path)
        state = {**state, "model": weights}
    report = load_detr_checkpoint(model, state, label_map=label_map, what=path)
    print(f"fine-tuning from {path}: {report}".replace("\n", "; "))
    if note:
        print(f"fine-tuning from {path}: {note}")


def _check_architecture(state: dict, args, path, advice: str, ignore: tuple[str, ...] = ()) -> None:
    """CheckpointError naming every architecture flag that differs between a pvt-detr checkpoint and this run
    (checkpoints of other projects, e.g. facebookresearch/detr's, carry no pvt-detr configuration: skipped)."""
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        return
    mismatch = architecture_mismatch(state, ModelConfig.from_any(args), path, ignore=ignore)
    if mismatch:
        raise CheckpointError(f"{mismatch} (the checkpoint's architecture): {advice}")


def _loader(dataset, sampler, batch_size: int, train: bool, num_workers: int, seed: int,
            device: torch.device) -> DataLoader:
    # The loader draws its worker seeds from its own generator, so the global RNG (dropout, drop path) is touched
    # by the model alone and a checkpoint's RNG state resumes the exact same run.
    batches = BatchSampler(sampler, batch_size, drop_last=train and len(sampler) >= batch_size)
    # Workers ignore stop signals sent to the whole job (SLURM, timeout, Ctrl-C): the main process checkpoints.
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collate_fn, num_workers=num_workers,
                      persistent_workers=False, pin_memory=device.type == "cuda",
                      generator=torch.Generator().manual_seed(seed),
                      worker_init_fn=ignore_stop_signals if num_workers > 0 else None)


def _val_loader(args, data: Data, device: torch.device) -> DataLoader:
    sampler = ResumableSampler(data.val, dist_utils.get_world_size(), dist_utils.get_rank(), shuffle=False)
    return _loader(data.val, sampler, args.batch_size, train=False, num_workers=args.num_workers, seed=args.seed,
                   device=device)


def _evaluate(args, parts: Parts, data: Data, loader, device: torch.device, output_dir: Path | None) -> dict:
    stats, evaluator = evaluate(parts.model, parts.criterion, parts.postprocessors, loader, data.coco_val, device,
                                amp_dtype=parts.amp_dtype, progress=progress_enabled(args),
                                results_path=output_dir / "results_val.json" if output_dir else None,
                                image_ids=data.val.ids, category_ids=data.category_ids, evaluator=args.evaluator)
    if output_dir is not None and dist_utils.is_main_process():
        (output_dir / "per_class_ap.txt").write_text(evaluator.per_class_table() + "\n")
    return stats


def evaluate_only(args, parts: Parts, data: Data, device: torch.device, output_dir: Path | None) -> dict:
    """--eval: the weights of --resume (or --finetune) scored on the validation split."""
    resume_path = _resolve_resume(args)
    if resume_path is not None:
        state = load_checkpoint(resume_path)
        _check_architecture(state, args, resume_path, "evaluate it with the flags it was trained with")
        parts.module.load_state_dict(state["model"])
    stats = _evaluate(args, parts, data, _val_loader(args, data, device), device, output_dir)
    if output_dir is not None and dist_utils.is_main_process():
        (output_dir / "final_stats.json").write_text(json.dumps(stats, indent=1))
    _draw_predictions(args, parts, data, device, output_dir)
    dist_utils.cleanup()
    return stats


# ---------------------------------------------------------------------------------------------------------------
# Resume


@dataclass
class Position:
    """Where training starts: epoch, batches of it already done, that epoch's running sums, and the train stats of
    the epoch before when its checkpoint was written but its log entry may be missing."""

    epoch: int
    step: int = 0
    totals: dict | None = None
    finished_stats: dict | None = None


def resume(args, parts: Parts, iters_per_epoch: int, device: torch.device, output_dir: Path | None) -> Position:
    """Loads --resume's model, optimiser, scaler, position and RNG state (checking that the architecture is this
    run's); returns where to start. `iters_per_epoch`: steps per epoch of this run."""
    path = _resolve_resume(args)
    if path is None:
        return Position(args.start_epoch)
    state = load_checkpoint(path)
    _check_architecture(state, args, path, "resume with the flags it was trained with, or start a new run from its "
                                           "weights with --finetune")
    world = dist_utils.get_world_size()
    parts.module.load_state_dict(state["model"])
    saved_groups = len(state["optimizer"]["param_groups"])
    if saved_groups != len(parts.optimizer.param_groups):  # --lr_backbone 0 (frozen backbone) drops the backbone group
        was_frozen = saved_groups == 1
        raise CheckpointError(
            f"{path} {'froze' if was_frozen else 'trained'} its backbone (--lr_backbone "
            f"{'0' if was_frozen else '> 0'}) but this run {'trains' if was_frozen else 'freezes'} it "
            f"(--lr_backbone {'> 0' if was_frozen else '0'}): resume with the run's --lr_backbone, or start a "
            "new run from its weights with --finetune")
    parts.optimizer.load_state_dict(state["optimizer"])
    if parts.scaler is not None and "scaler" in state:
        parts.scaler.load_state_dict(state["scaler"])
    position = Position(state["epoch"], state["step"], state.get("epoch_totals") if state["step"] > 0 else None)
    saved = state.get("config") or {}
    before = (saved.get("world_size", world), saved.get("batch_size", args.batch_size))
    if before != (world, args.batch_size):
        print(f"note: {path} was trained with {before[0]} process(es) x {before[1]} images per step, this run uses "
              f"{world} x {args.batch_size}: the LR schedule follows this run's {iters_per_epoch} steps per epoch"
              + (f", and epoch {position.epoch}, interrupted at step {position.step}, restarts from its first step"
                 if position.step > 0 else ""))
        position.step, position.totals = 0, None  # this run's shards and steps do not continue the saved ones
    if position.step >= iters_per_epoch:
        position = Position(position.epoch + 1)
    changed = [f"--{k} {getattr(args, k):g} (was {saved[k]:g})" for k in ("lr", "lr_backbone", "weight_decay")
               if k in saved and saved[k] != getattr(args, k)]
    if changed:
        print(f"note: this run's {', '.join(changed)} apply from epoch {position.epoch}, step {position.step} on")
    rng = state.get("rng", {}).get(str(dist_utils.get_rank()))
    note = set_rng_state(rng, device) if rng is not None else None
    if rng is None or note:  # every rank says it for itself
        sys.stderr.write(f"note: rank {dist_utils.get_rank()}: "
                         f"{note or 'the checkpoint holds no random state for this process (another world size)'}\n")
    print(f"resumed from {path}: epoch {position.epoch}, step {position.step}")
    if output_dir is not None and dist_utils.is_main_process():
        truncate_log(output_dir, position.epoch - 1)
    if position.step == 0 and "finished_epoch_stats" in state:
        position.finished_stats = state["finished_epoch_stats"]
    return position


# ---------------------------------------------------------------------------------------------------------------
# Training


def train(args, parts: Parts, data: Data, device: torch.device, output_dir: Path | None,
          preemption: PreemptionHandler) -> dict:
    """The epoch loop: train, checkpoint (every epoch, and a numbered copy before the LR drop), evaluate every
    --eval_every epochs and after the last, log; stop signals checkpoint at the next step boundary."""
    rank, world, main_process = dist_utils.get_rank(), dist_utils.get_world_size(), dist_utils.is_main_process()
    train_set = EpochSeededDataset(data.train, args.seed)
    sampler_train = ResumableSampler(train_set, world, rank, shuffle=True, seed=args.seed)
    loader_train = _loader(train_set, sampler_train, args.batch_size, train=True, num_workers=args.num_workers,
                           seed=args.seed + rank, device=device)
    loader_val = _val_loader(args, data, device)
    iters_per_epoch = len(loader_train)
    position = resume(args, parts, iters_per_epoch, device, output_dir)
    lr_scheduler = build_lr_scheduler(parts.optimizer, args, iters_per_epoch,
                                      start_iteration=position.epoch * iters_per_epoch + position.step)
    if output_dir is not None and main_process:
        for stale in remove_stale_temp_files(output_dir):
            print(f"removed {stale.name}, a checkpoint write interrupted by an earlier crash")
    tb = TensorBoardLogger(output_dir if main_process else None)
    progress = progress_enabled(args)
    run_start = time.time()

    def save(epoch: int, step: int, extra_name: str | None = None, totals: dict | None = None,
             finished: dict | None = None) -> None:
        rngs = dist_utils.all_gather_object(rng_state(device))  # collective: every rank takes part
        state = {"model": parts.module.state_dict(), "optimizer": parts.optimizer.state_dict(),
                 "lr_scheduler": lr_scheduler.state_dict(), "epoch": epoch, "step": step,
                 "config": config_dict(args), "rng": {str(r): s for r, s in enumerate(rngs)},
                 "label_map": data.label_map.to_list()}
        if totals is not None:
            state["epoch_totals"] = totals
        if parts.scaler is not None:
            state["scaler"] = parts.scaler.state_dict()
        if finished is not None:  # the finished epoch's train stats, to log it on resume if a crash came first
            state["finished_epoch_stats"] = finished
        if output_dir is not None and main_process:
            save_checkpoint(state, output_dir / "checkpoint.pth")
            if extra_name:
                save_checkpoint(state, output_dir / extra_name)
        dist_utils.barrier()

    def stop_now(epoch: int, steps_done: int, totals: dict | None) -> None:
        if totals is not None:  # mid-epoch; at an epoch end the checkpoint is already written
            save(epoch, steps_done, totals=totals)
        print(f"received {preemption.name or 'a stop signal'}: saved checkpoint at epoch {epoch} step "
              f"{steps_done}; resume with --resume auto", flush=True)
        tb.close()
        dist_utils.cleanup()
        preemption.finish()

    def finish_epoch(epoch: int, train_stats: dict) -> dict:
        """Evaluates if due, appends the epoch's log.txt entry and prints it; returns the COCO stats or {}."""
        evaluated = (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs
        test_stats = _evaluate(args, parts, data, loader_val, device, output_dir) if evaluated else {}
        entry = {**{f"train_{k}": v for k, v in train_stats.items()},
                 **{f"test_{k}": v for k, v in test_stats.items()
                    if k in ("coco_eval_bbox", "per_class_ap", "bad_images") or k.startswith("loss")},
                 "epoch": epoch, "n_parameters": parts.n_params, "elapsed_s": round(time.time() - run_start, 1)}
        if output_dir is not None and main_process:
            append_log(output_dir, entry)
            per_class = {f"test_AP/{row['name']}": row["ap"] for row in test_stats.get("per_class_ap", [])
                         if row["ap"] is not None}
            tb.epoch({"epoch": epoch, **{k: v for k, v in entry.items() if not isinstance(v, list)},
                      **({"test_AP": test_stats["AP"], "test_AP50": test_stats["AP50"]} if evaluated else {}),
                      **per_class})
            if evaluated:
                plot_curves(output_dir)
        ap = f", AP {test_stats['AP']:.3f}, AP50 {test_stats['AP50']:.3f}" if evaluated else ""
        bad = f", {train_stats['bad_images']} unreadable images skipped" if train_stats.get("bad_images") else ""
        print(f"epoch {epoch}: train loss {train_stats.get('loss', float('nan')):.4f}{ap}{bad} "
              f"({time.time() - run_start:.0f} s)", flush=True)
        return test_stats

    def stop_requested() -> bool:
        return preemption.requested is not None

    def any_stop_requested() -> bool:  # one collective: every process stops if one was signalled
        flag = torch.tensor([1.0 if stop_requested() else 0.0], device=device)
        return dist_utils.all_reduce_sum(flag).item() > 0

    stats: dict = {}
    if position.finished_stats is not None:
        # A crash between the epoch-end checkpoint and its log entry (e.g. during evaluation) would otherwise
        # leave the epoch out of log.txt: finish it now. Rank 0's log decides, so every rank evaluates or none.
        done = int(main_process and output_dir is not None
                   and any(e.get("epoch") == position.epoch - 1 for e in read_log(output_dir)))
        if not dist_utils.all_gather_object(done)[0]:  # the checkpoint of epoch E's end holds epoch E + 1 >= 1
            stats = finish_epoch(position.epoch - 1, position.finished_stats)
    if position.epoch >= args.epochs:  # e.g. a finished run resumed with the same --epochs
        print(f"nothing to train: the run is at epoch {position.epoch} and --epochs is {args.epochs} "
              "(a larger --epochs trains on)")
    else:
        print(f"training {args.epochs} epochs from epoch {position.epoch} ({iters_per_epoch} steps/epoch)")
    preemption.install()
    start_step, start_totals = position.step, position.totals
    for epoch in range(position.epoch, args.epochs):
        train_set.set_epoch(epoch)
        sampler_train.set_epoch(epoch, start=start_step * args.batch_size)
        base_step = epoch * iters_per_epoch
        train_stats = train_one_epoch(
            parts.model, parts.criterion, loader_train, parts.optimizer, lr_scheduler, device, epoch,
            clip_max_norm=args.clip_max_norm, amp_dtype=parts.amp_dtype, scaler=parts.scaler, start_step=start_step,
            max_nonfinite_steps=args.max_nonfinite_steps, max_bad_images=int(args.max_bad_images * len(train_set)),
            totals=start_totals, progress=progress, print_freq=None if progress else args.print_freq,
            batch_size=args.batch_size, num_queries=parts.module.num_queries, stop_requested=stop_requested,
            on_stop=lambda steps, totals, e=epoch: stop_now(e, steps, totals),
            on_step=lambda s, v, b=base_step: tb.step(b + s, v))
        start_step, start_totals = 0, None
        # DETR's convention: checkpoint.pth every epoch, and a numbered copy before the LR drop.
        extra = f"checkpoint{epoch:04}.pth" if epoch + 1 == args.lr_drop else None
        save(epoch + 1, 0, extra, finished=train_stats)
        stats = finish_epoch(epoch, train_stats) or stats
        if epoch + 1 < args.epochs and any_stop_requested():  # a signal during the epoch's last step or evaluation
            stop_now(epoch + 1, 0, None)
    preemption.uninstall()
    tb.close()
    finish(args, parts, data, device, output_dir, stats)
    return stats


def finish(args, parts: Parts, data: Data, device: torch.device, output_dir: Path | None, stats: dict) -> None:
    """After the last epoch: final_stats.json, the drawn predictions, and leaving the process group."""
    if output_dir is not None and dist_utils.is_main_process() and stats:  # a finished run resumed keeps its stats
        (output_dir / "final_stats.json").write_text(json.dumps(stats, indent=1))
    _draw_predictions(args, parts, data, device, output_dir)
    dist_utils.cleanup()


def _draw_predictions(args, parts: Parts, data: Data, device: torch.device, output_dir: Path | None) -> None:
    """Draws the detections (score >= --plot_threshold) of the first `--plot_predictions` validation images into PNG
    files, enlarged so that small images stay readable."""
    if not args.plot_predictions or output_dir is None or not dist_utils.is_main_process():
        return
    from datasets.coco import load_rgb
    from pvt_detr.nested_tensor import nested_tensor_from_tensor_list
    from pvt_detr.visualize import draw_on_image

    model = parts.module.eval()
    folder = output_dir / "predictions"
    folder.mkdir(exist_ok=True)
    coco = data.val.coco
    for index in range(min(args.plot_predictions, len(data.val))):
        item = data.val[index]
        if item is None:  # unreadable (the dataset warned)
            continue
        image, target = item
        with torch.no_grad():
            outputs = model(nested_tensor_from_tensor_list([image]).to(device))
        (det,) = parts.postprocessors["bbox"](outputs, target["orig_size"][None].to(device))
        keep = det["scores"] >= args.plot_threshold
        info = coco.loadImgs(int(target["image_id"]))[0]
        pil = load_rgb(str(Path(data.val.root) / info["file_name"]), (info["width"], info["height"]))
        labels = data.category_ids[det["labels"][keep].cpu()]
        drawn = draw_on_image(pil, det["boxes"][keep].cpu(), labels, det["scores"][keep].cpu(), data.label_map.names)
        drawn.save(folder / f"{Path(info['file_name']).stem}.png")
    print(f"predictions drawn into {folder}")
