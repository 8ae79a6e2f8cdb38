"""A whole run: data, model, optimiser, resume, the epoch loop, evaluation and every output file.

`main.main(args)` calls `run(args)`; so does the SLURM launcher. Expected failures (bad flags, data or
checkpoints, non-finite losses, too many unreadable images, a collective failing because another process died
or timed out) end with one line on stderr and exit code 1, never a deep traceback. A stop signal (SIGTERM,
SIGUSR1, SIGUSR2) checkpoints at the next step boundary and exits with code 0.
"""

from __future__ import annotations

import errno
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed
from torch.utils.data import BatchSampler, DataLoader

from datasets import DatasetError, build_dataset, collate_fn, get_coco_api_from_dataset, num_classes_from_coco
from pvt_detr import build_model, load_detr_checkpoint, load_pvt_checkpoint
from pvt_detr.checkpoints import CheckpointError
from pvt_detr.criterion import SetCriterion
from training import distributed as dist_utils
from training.checkpoint import (
    describe_mismatch,
    load_checkpoint,
    remove_stale_temp_files,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from training.config import config_dict, save_config
from training.engine import NonFiniteLossError, evaluate, progress_enabled, train_one_epoch
from training.logs import TensorBoardLogger, append_log, plot_curves, read_log, truncate_log
from training.optim import build_lr_scheduler, build_optimizer, restore_lr_schedule
from training.preemption import PreemptionHandler, ignore_stop_signals
from training.sampling import EpochSeededDataset, ResumableSampler


class RunError(RuntimeError):
    """A run cannot go on; the message is one line."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _loader(dataset, sampler, batch_size: int, train: bool, num_workers: int, seed: int) -> DataLoader:
    # The loader draws its worker seeds from its own generator, so the global RNG (dropout, drop path) is touched
    # by the model alone and a checkpoint's RNG state resumes the exact same run.
    batches = BatchSampler(sampler, batch_size, drop_last=train and len(sampler) >= batch_size)
    # Workers ignore stop signals sent to the whole job (SLURM, timeout): the main process checkpoints and stops.
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collate_fn, num_workers=num_workers,
                      persistent_workers=False, pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator().manual_seed(seed),
                      worker_init_fn=ignore_stop_signals if num_workers > 0 else None)


def _prepare_output_dir(output_dir: Path) -> None:
    """Creates --output_dir and checks that files can be written there, before any training (one-line RunError)."""
    probe = output_dir / f".write-test-{os.getpid()}"
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise RunError(f"--output_dir {output_dir}: cannot write there: {e.strerror or e}") from None


def _resolve_resume(args) -> Path | None:
    if args.resume == "auto":
        candidate = Path(args.output_dir) / "checkpoint.pth" if args.output_dir else None
        return candidate if candidate is not None and candidate.is_file() else None
    return Path(args.resume) if args.resume else None


def _build_datasets(args):
    """Train/val datasets; rank 0 first so that a demo dataset is generated once."""
    if args.distributed and not dist_utils.is_main_process():
        dist_utils.barrier()
    dataset_val = build_dataset("val", args)
    dataset_train = None if args.eval else build_dataset("train", args)
    if args.distributed and dist_utils.is_main_process():
        dist_utils.barrier()
    return dataset_train, dataset_val


# Lower-case fragments of the errors gloo / NCCL raise when a peer died or hung. Some carry no backend name, e.g.
# gloo's "Application timeout caused pair closure" from DDP's gradient all-reduce inside backward().
COLLECTIVE_FAILURE_MARKERS = ("gloo", "nccl", "connection closed", "connection reset", "broken pipe", "pair closure",
                              "timed out")


def _collective_failure(error: BaseException) -> bool:
    """True for an error raised by torch.distributed because another process died, hung or is unreachable."""
    if isinstance(error, torch.distributed.DistError):
        return True
    text = str(error).lower()
    return dist_utils.is_dist_avail_and_initialized() and any(m in text for m in COLLECTIVE_FAILURE_MARKERS)


# Failures of the storage rather than of the code (disk full, quota, read-only, permissions, a file or folder in the
# way): reported in one line naming the file.
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR}


def run(args) -> dict:
    """Runs training (or evaluation with --eval); returns the last evaluation stats. Exits 1 with one line on
    expected errors."""
    preemption = PreemptionHandler()
    try:
        return _run(args, preemption)
    except (DatasetError, CheckpointError, NonFiniteLossError, RunError, dist_utils.DistributedSetupError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        dist_utils.cleanup()
        raise SystemExit(1) from None
    except OSError as e:
        if e.errno not in _STORAGE_ERRNOS:
            raise
        what = f"{e.filename}: cannot write or read it" if e.filename else "a file could not be written or read"
        print(f"error: {what}: {e.strerror or e}", file=sys.stderr, flush=True)
        dist_utils.cleanup()
        raise SystemExit(1) from None
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
    device = dist_utils.init_distributed_mode(args)
    rank, world = dist_utils.get_rank(), dist_utils.get_world_size()
    seed_everything(args.seed + rank)
    if getattr(args, "num_threads", 0) > 0:
        torch.set_num_threads(args.num_threads)
    output_dir = Path(args.output_dir) if args.output_dir else None
    main_process = dist_utils.is_main_process()
    if output_dir is not None and main_process:
        _prepare_output_dir(output_dir)
    if args.amp and device.type == "cpu":
        print("note: --amp on CPU uses bfloat16 autocast")

    dataset_train, dataset_val = _build_datasets(args)
    coco_val = get_coco_api_from_dataset(dataset_val)
    if args.num_classes is None:
        args.num_classes = num_classes_from_coco(coco_val if dataset_train is None else dataset_train.coco)
        print(f"num_classes = {args.num_classes} (max category id + 1, from the annotation file)")
    names = {c["id"]: c["name"] for c in coco_val.loadCats(coco_val.getCatIds())}
    max_id = max([*names, *(dataset_train.coco.getCatIds() if dataset_train is not None else [])])
    if max_id >= args.num_classes:
        raise RunError(f"--num_classes {args.num_classes} is too small for category id {max_id}")
    if output_dir is not None and main_process:
        save_config(args, output_dir / "config.yaml")

    model, criterion, postprocessors = build_model(args)
    if args.pretrained_backbone:
        report = load_pvt_checkpoint(model.backbone, args.pretrained_backbone)
        print(f"backbone from {args.pretrained_backbone}: {report}".replace("\n", "; "))
    if args.finetune:
        report = load_detr_checkpoint(model, args.finetune)
        print(f"fine-tuning from {args.finetune}: {report}".replace("\n", "; "))
    model.to(device)
    criterion.to(device)
    if args.distributed:  # the class-weighted CE normalised over the global batch, as in one process
        for module in criterion.modules():
            if isinstance(module, SetCriterion):
                module.process_mean = dist_utils.mean_over_processes
    model_without_ddp = model
    if args.distributed:
        # Backbone stages after the last one DETR reads (e.g. --backbone_stages 3) exist for checkpoint
        # compatibility but get no gradient; DDP must then be told to expect unused parameters.
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=max(args.backbone_stages) < 4)
    n_params = sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad)
    print(f"model {args.backbone} + DETR: {n_params / 1e6:.2f} M trainable parameters, device {device}, "
          f"{world} process(es)")

    sampler_val = ResumableSampler(dataset_val, world, rank, shuffle=False)
    loader_val = _loader(dataset_val, sampler_val, args.batch_size, train=False, num_workers=args.num_workers,
                         seed=args.seed)
    progress = progress_enabled(args)

    resume_path = _resolve_resume(args)
    if args.eval:
        if resume_path is not None:
            state = _load_resume_state(resume_path, args)
            model_without_ddp.load_state_dict(state["model"])
        stats, _ = evaluate(model, criterion, postprocessors, loader_val, coco_val, device, amp=args.amp,
                            progress=progress, results_path=output_dir / "results_val.json" if output_dir else None,
                            image_ids=dataset_val.ids)
        if output_dir is not None and dist_utils.is_main_process():
            (output_dir / "final_stats.json").write_text(json.dumps(stats, indent=1))
        _draw_predictions(args, model_without_ddp, postprocessors, dataset_val, names, device, output_dir)
        dist_utils.cleanup()
        return stats

    train_set = EpochSeededDataset(dataset_train, args.seed)
    sampler_train = ResumableSampler(train_set, world, rank, shuffle=True, seed=args.seed)
    loader_train = _loader(train_set, sampler_train, args.batch_size, train=True, num_workers=args.num_workers,
                           seed=args.seed + rank)
    iters_per_epoch = len(loader_train)
    optimizer = build_optimizer(model_without_ddp, args)
    lr_scheduler = build_lr_scheduler(optimizer, args, iters_per_epoch)
    scaler = torch.amp.GradScaler("cuda") if args.amp and device.type == "cuda" else None

    start_epoch, start_step, start_totals = args.start_epoch, 0, None
    if resume_path is not None:
        state = _load_resume_state(resume_path, args)
        model_without_ddp.load_state_dict(state["model"])
        saved_groups = len(state["optimizer"]["param_groups"])
        if saved_groups != len(optimizer.param_groups):  # --lr_backbone 0 (frozen backbone) drops the backbone group
            was_frozen = saved_groups == 1
            raise CheckpointError(
                f"{resume_path} {'froze' if was_frozen else 'trained'} its backbone (--lr_backbone "
                f"{'0' if was_frozen else '> 0'}) but this run {'trains' if was_frozen else 'freezes'} it "
                f"(--lr_backbone {'> 0' if was_frozen else '0'}): resume with the run's --lr_backbone, or start a "
                "new run from its weights with --finetune")
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        start_epoch, start_step = state["epoch"], state["step"]
        start_totals = state.get("epoch_totals") if start_step > 0 else None  # sums of the interrupted epoch
        saved = state.get("config") or {}
        before = (saved.get("world_size", world), saved.get("batch_size", args.batch_size))
        if before != (world, args.batch_size):
            print(f"note: {resume_path} was trained with {before[0]} process(es) x {before[1]} images per step, this "
                  f"run uses {world} x {args.batch_size}: the LR schedule follows this run's {iters_per_epoch} "
                  "steps per epoch" + (f", and epoch {start_epoch}, interrupted at step {start_step}, restarts from "
                                       "its first step" if start_step > 0 else ""))
            start_step, start_totals = 0, None  # this run's shards and steps do not continue the saved ones
        if start_step >= iters_per_epoch:
            start_epoch, start_step, start_totals = start_epoch + 1, 0, None
        changed = [f"--{k} {getattr(args, k):g} (was {saved[k]:g})" for k in ("lr", "lr_backbone", "weight_decay")
                   if k in saved and saved[k] != getattr(args, k)]
        if changed:
            print(f"note: this run's {', '.join(changed)} apply from epoch {start_epoch}, step {start_step} on")
        restore_lr_schedule(lr_scheduler, args, start_epoch * iters_per_epoch + start_step)
        rng = state.get("rng", {}).get(str(rank))
        if rng is not None:
            set_rng_state(rng)
        print(f"resumed from {resume_path}: epoch {start_epoch}, step {start_step}")
        if output_dir is not None and main_process:
            truncate_log(output_dir, start_epoch - 1)

    if output_dir is not None and main_process:
        for stale in remove_stale_temp_files(output_dir):
            print(f"removed {stale.name}, a checkpoint write interrupted by an earlier crash")
    tb = TensorBoardLogger(output_dir if main_process else None)
    preemption.install()

    def checkpoint_state(epoch: int, step: int, totals: dict | None) -> dict:
        rngs = dist_utils.all_gather_object(rng_state())
        return {"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_scheduler.state_dict(), "epoch": epoch, "step": step,
                "config": config_dict(args), "rng": {str(r): s for r, s in enumerate(rngs)},
                "categories": {int(k): v for k, v in names.items()},
                **({"epoch_totals": totals} if totals is not None else {}),
                **({"scaler": scaler.state_dict()} if scaler is not None else {})}

    def save(epoch: int, step: int, extra_name: str | None = None, totals: dict | None = None,
             finished: dict | None = None) -> None:
        state = checkpoint_state(epoch, step, totals)  # collective: every rank takes part
        if finished is not None:  # the finished epoch's train stats, to log it on resume if a crash came first
            state["finished_epoch_stats"] = finished
        if output_dir is not None and main_process:
            save_checkpoint(state, output_dir / "checkpoint.pth")
            if extra_name:
                save_checkpoint(state, output_dir / extra_name)
        dist_utils.barrier()

    def should_stop() -> bool:
        flag = torch.tensor([1.0 if preemption.requested else 0.0])
        if args.distributed and device.type == "cuda":
            flag = flag.to(device)
        return dist_utils.all_reduce_sum(flag).item() > 0

    def on_stop(epoch: int, steps_done: int, totals: dict | None) -> None:
        if totals is not None:  # mid-epoch; at an epoch end the checkpoint is already written
            save(epoch, steps_done, totals=totals)
        print(f"received {preemption.name or 'a stop signal'}: saved checkpoint at epoch {epoch} step "
              f"{steps_done}; resume with --resume auto", flush=True)
        tb.close()
        dist_utils.cleanup()
        preemption.finish()

    eval_every = getattr(args, "eval_every", 1)
    if eval_every < 1:
        raise RunError(f"--eval_every must be >= 1, got {eval_every}")

    def finish_epoch(epoch: int, train_stats: dict) -> dict:
        """Evaluates if due, appends the epoch's log.txt entry and prints it; returns the COCO stats or {}."""
        # Evaluate every --eval_every epochs and after the last one.
        evaluated = (epoch + 1) % eval_every == 0 or epoch + 1 == args.epochs
        test_stats = {}
        if evaluated:
            test_stats, _ = evaluate(model, criterion, postprocessors, loader_val, coco_val, device, amp=args.amp,
                                     progress=progress,
                                     results_path=output_dir / "results_val.json" if output_dir else None,
                                     image_ids=dataset_val.ids)
        entry = {**{f"train_{k}": v for k, v in train_stats.items()},
                 **{f"test_{k}": v for k, v in test_stats.items()
                    if k in ("coco_eval_bbox", "bad_images") or k.startswith("loss")},
                 "epoch": epoch, "n_parameters": n_params, "elapsed_s": round(time.time() - run_start, 1)}
        if output_dir is not None and main_process:
            append_log(output_dir, entry)
            tb.epoch({"epoch": epoch, **{k: v for k, v in entry.items() if not isinstance(v, list)},
                      **({"test_AP": test_stats["AP"], "test_AP50": test_stats["AP50"]} if evaluated else {})})
            if evaluated:
                plot_curves(output_dir)
        ap = f", AP {test_stats['AP']:.3f}, AP50 {test_stats['AP50']:.3f}" if evaluated else ""
        bad = f", {train_stats['bad_images']} unreadable images skipped" if train_stats.get("bad_images") else ""
        print(f"epoch {epoch}: train loss {train_stats.get('loss', float('nan')):.4f}{ap}{bad} "
              f"({time.time() - run_start:.0f} s)", flush=True)
        return test_stats

    stats: dict = {}
    run_start = time.time()
    if resume_path is not None and start_step == 0 and "finished_epoch_stats" in state:
        # A crash between the epoch-end checkpoint and its log entry (e.g. during evaluation) would otherwise
        # leave the epoch out of log.txt: finish it now. Rank 0's log decides, so every rank evaluates or none.
        done = int(main_process and output_dir is not None
                   and any(e.get("epoch") == start_epoch - 1 for e in read_log(output_dir)))
        if not dist_utils.all_gather_object(done)[0]:  # the checkpoint of epoch E's end holds epoch E + 1 >= 1
            stats = finish_epoch(start_epoch - 1, state["finished_epoch_stats"])
    if start_epoch >= args.epochs:  # e.g. a finished run resumed with the same --epochs
        print(f"nothing to train: the run is at epoch {start_epoch} and --epochs is {args.epochs} "
              "(a larger --epochs trains on)")
    else:
        print(f"training {args.epochs} epochs from epoch {start_epoch} ({iters_per_epoch} steps/epoch)")
    for epoch in range(start_epoch, args.epochs):
        train_set.set_epoch(epoch)
        sampler_train.set_epoch(epoch, start=start_step * args.batch_size)
        base_step = epoch * iters_per_epoch + start_step
        train_stats = train_one_epoch(
            model, criterion, loader_train, optimizer, lr_scheduler, device, epoch,
            clip_max_norm=args.clip_max_norm, amp=args.amp, scaler=scaler, start_step=start_step,
            max_nonfinite_steps=args.max_nonfinite_steps, max_bad_images=int(args.max_bad_images * len(train_set)),
            totals=start_totals, progress=progress, should_stop=should_stop,
            on_stop=lambda steps, totals, e=epoch: on_stop(e, steps, totals),
            on_step=lambda s, v, b=base_step - start_step: tb.step(b + s, v))
        start_step, start_totals = 0, None
        # DETR's convention: checkpoint.pth every epoch, and a numbered copy before the LR drop.
        extra = f"checkpoint{epoch:04}.pth" if epoch + 1 == args.lr_drop else None
        save(epoch + 1, 0, extra, finished=train_stats)
        stats = finish_epoch(epoch, train_stats) or stats
        if epoch + 1 < args.epochs and should_stop():  # a signal during the epoch's last step or its evaluation
            on_stop(epoch + 1, 0, None)
    preemption.uninstall()
    tb.close()
    if output_dir is not None and main_process and stats:  # a resumed, already finished run keeps its stats
        (output_dir / "final_stats.json").write_text(json.dumps(stats, indent=1))
    _draw_predictions(args, model_without_ddp, postprocessors, dataset_val, names, device, output_dir)
    dist_utils.cleanup()
    return stats


def _load_resume_state(path: Path, args) -> dict:
    state = load_checkpoint(path)
    mismatch = describe_mismatch(state, args)
    if mismatch:
        raise CheckpointError(f"{path} was trained with a different model: {mismatch}")
    return state


def _draw_predictions(args, model, postprocessors, dataset_val, names, device, output_dir: Path | None) -> None:
    """Draws the detections (score >= --plot_threshold) of the first `--plot_predictions` validation images into PNG
    files."""
    if not args.plot_predictions or output_dir is None or not dist_utils.is_main_process():
        return
    from PIL import Image

    from datasets.coco import load_rgb
    from pvt_detr.nested_tensor import nested_tensor_from_tensor_list
    from pvt_detr.visualize import draw_detections

    model.eval()
    folder = output_dir / "predictions"
    folder.mkdir(exist_ok=True)
    coco = dataset_val.coco
    for index in range(min(args.plot_predictions, len(dataset_val))):
        item = dataset_val[index]
        if item is None:  # unreadable (the dataset warned)
            continue
        image, target = item
        with torch.no_grad():
            outputs = model(nested_tensor_from_tensor_list([image]).to(device))
        (det,) = postprocessors["bbox"](outputs, target["orig_size"][None].to(device))
        keep = det["scores"] >= getattr(args, "plot_threshold", 0.5)
        info = coco.loadImgs(int(target["image_id"]))[0]
        pil = load_rgb(str(Path(dataset_val.root) / info["file_name"]), (info["width"], info["height"]))
        pixels = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)  # (3, H, W) uint8
        drawn = draw_detections(pixels, det["boxes"][keep].cpu(), det["labels"][keep].cpu(),
                                det["scores"][keep].cpu(), names)
        Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(folder / f"{Path(info['file_name']).stem}.png")
    print(f"predictions drawn into {folder}")
