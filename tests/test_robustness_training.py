"""Training faults: non-finite losses, unreadable batches, stop signals, kill -9, interrupted checkpoint writes,
unsafe or foreign checkpoints.

In-process tests drive `train_one_epoch` or `main.main` directly; the slow ones run main.py as a subprocess on the
tiny model of tests/test_main_cli.py and compare the final weights with an uninterrupted run's.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import main
from datasets import DatasetError, collate_fn
from pvt_detr import build_model
from pvt_detr.criterion import SetCriterion
from training.checkpoint import TEMP_NAME, remove_stale_temp_files, save_checkpoint
from training.config import config_dict, parse_args
from training.engine import NonFiniteLossError, train_one_epoch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_main_cli import TINY  # noqa: E402  (the tiny model and demo data of the CLI tests)

# Runs main.py after patching the engine so that the process sends itself a signal during one training step:
# SELF_SIGNAL="SIGTERM:1:0" signals during epoch 1, step 0. Everything else is the real signal path.
SELF_SIGNAL_WRAPPER = """
import os, runpy, signal, sys
root = sys.argv.pop(1)
sys.path.insert(0, root)
import training.engine as engine
name, epoch, step = os.environ["SELF_SIGNAL"].split(":")
original = engine._optimisation_step
def signalling_step(*args, **kwargs):
    if (kwargs["epoch"], kwargs["step"]) == (int(epoch), int(step)):
        os.kill(os.getpid(), getattr(signal, name))
    return original(*args, **kwargs)
engine._optimisation_step = signalling_step
sys.argv[0] = os.path.join(root, "main.py")
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _parse(*argv) -> argparse.Namespace:
    return parse_args(main.build_cli_parser(), [*TINY, *map(str, argv)])


def _run_main_in_process(capsys, *argv) -> tuple[int | None, str, str]:
    """main.main(args) in this process -> (exit code or None if it returned, stdout, stderr)."""
    code = None
    try:
        main.main(_parse(*argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    """The TINY demo dataset, generated once for the in-process tests."""
    from datasets import generate_demo_dataset

    path = tmp_path_factory.mktemp("demo") / "data"
    generate_demo_dataset(path, 12, 6, 64)
    return path


# ---------------------------------------------------------------------------------------------------------------
# The engine in process: non-finite losses and gradients, unreadable images, empty batches


def _tiny_model():
    args = _parse("--num_classes", "8", "--dropout", "0")
    return build_model(args)


def _item(seed: int):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(3, 32, 32, generator=g)
    target = {"boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.3, 0.6, 0.2, 0.2]]), "labels": torch.tensor([1, 7]),
              "image_id": torch.tensor(seed), "orig_size": torch.tensor([32, 32]), "size": torch.tensor([32, 32]),
              "area": torch.tensor([100.0, 50.0]), "iscrowd": torch.tensor([0, 0])}
    return image, target


def _loader(n_batches: int = 3, unreadable: dict[int, int] | None = None) -> list:
    """Batches of 2 items; `unreadable` {batch: how many of its items the dataset returned None for}."""
    unreadable = unreadable or {}
    return [collate_fn([None if j < unreadable.get(b, 0) else _item(2 * b + j) for j in range(2)])
            for b in range(n_batches)]


class NaNLossAt(nn.Module):
    """Wraps a criterion; `loss_bbox` becomes NaN on the given calls (0-based)."""

    def __init__(self, criterion: nn.Module, calls: set[int]):
        super().__init__()
        self.criterion, self.calls, self.n = criterion, calls, 0
        self.weight_dict = criterion.weight_dict

    def ce_weight_sum(self, targets, num_queries):
        return self.criterion.ce_weight_sum(targets, num_queries)

    def forward(self, outputs, targets, num_boxes=None, ce_weight_sum=None):
        losses = self.criterion(outputs, targets, num_boxes=num_boxes, ce_weight_sum=ce_weight_sum)
        if self.n in self.calls:
            losses["loss_bbox"] = losses["loss_bbox"] * float("nan")
        self.n += 1
        return losses


def _epoch(model, criterion, loader, **kwargs):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)
    stats = train_one_epoch(model, criterion, loader, optimizer, scheduler, torch.device("cpu"), 0, **kwargs)
    return stats, scheduler


def test_nonfinite_loss_stops_naming_the_step_and_the_losses():
    model, criterion, _ = _tiny_model()
    with pytest.raises(NonFiniteLossError) as info:
        _epoch(model, NaNLossAt(criterion, {1}), _loader())
    message = str(info.value)
    assert message.startswith("non-finite loss at epoch 0 step 1/3: loss=nan") and "loss_bbox=nan" in message
    assert "loss_ce=" in message and "\n" not in message


def test_nonfinite_steps_are_skipped_up_to_the_limit_without_touching_the_weights():
    model, criterion, _ = _tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats, scheduler = _epoch(model, NaNLossAt(criterion, {0, 2}), _loader(), max_nonfinite_steps=2)
    assert stats["nonfinite_steps"] == 2 and stats["steps"] == 3 and scheduler.last_epoch == 3
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # step 1 trained
    model, criterion, _ = _tiny_model()
    with pytest.raises(NonFiniteLossError, match=r"step 2/3.*\(skipped 1 such steps, --max_nonfinite_steps 1\)"):
        _epoch(model, NaNLossAt(criterion, {0, 2}), _loader(), max_nonfinite_steps=1)


def test_nonfinite_gradient_stops_the_run():
    model, criterion, _ = _tiny_model()
    model.class_embed.weight.register_hook(lambda grad: grad * float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"^non-finite gradient \(norm nan\) at epoch 0 step 0/3: loss="):
        _epoch(model, criterion, _loader())


def test_unreadable_images_are_counted_empty_batches_skipped_and_too_many_stop_the_epoch(capsys):
    model, criterion, _ = _tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats, scheduler = _epoch(model, criterion, _loader(3, unreadable={0: 2}), max_bad_images=2)
    assert stats["bad_images"] == 2 and stats["empty_steps"] == 1 and stats["steps"] == 3
    assert scheduler.last_epoch == 3  # the skipped step still advances the schedule (resume stays aligned)
    assert "warning: skipping step 0 of epoch 0: a batch has no readable image" in capsys.readouterr().err
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())

    with pytest.raises(DatasetError, match=r"^3 unreadable training images in epoch 0 by step 2, more than the 2 "):
        _epoch(model, criterion, _loader(3, unreadable={0: 1, 1: 1, 2: 1}), max_bad_images=2)


def test_stop_request_calls_on_stop_with_the_epoch_sums_and_resuming_them_gives_the_same_stats():
    model, criterion, _ = _tiny_model()
    state, rng = {k: v.clone() for k, v in model.state_dict().items()}, torch.get_rng_state()
    loader, cpu = _loader(3, unreadable={1: 1}), torch.device("cpu")

    def fresh_start():
        model.load_state_dict(state)
        torch.set_rng_state(rng)  # drop path draws random numbers
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)

    full = train_one_epoch(model, criterion, loader, *fresh_start(), cpu, 0)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer, scheduler = fresh_start()
    stops = []
    part = train_one_epoch(model, criterion, loader, optimizer, scheduler, cpu, 0, stop_requested=lambda: True,
                           on_stop=lambda steps, totals: stops.append((steps, totals)))
    assert part == {} and len(stops) == 1 and stops[0][0] == 1
    steps, totals = stops[0]
    checks = []
    rest = train_one_epoch(model, criterion, loader[steps:], optimizer, scheduler, cpu, 0, start_step=steps,
                           totals=totals, stop_requested=lambda: checks.append(1) is None and False)
    assert len(checks) == 1  # before step 2 only: a stop during the last step is left to the epoch's end
    assert rest["steps"] == 3 and rest["bad_images"] == 1 and rest["empty_steps"] == 0
    for key, value in weights.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)
    for key in full:
        if key != "time":
            assert rest[key] == pytest.approx(full[key], rel=1e-6), key


def test_nonfinite_loss_through_main_is_one_line_and_exit_1(demo_data, capsys, monkeypatch):
    original = SetCriterion.forward

    def nan_forward(self, outputs, targets, num_boxes=None, ce_weight_sum=None):
        losses = original(self, outputs, targets, num_boxes=num_boxes, ce_weight_sum=ce_weight_sum)
        return {k: v * float("nan") if k == "loss_giou" else v for k, v in losses.items()}

    monkeypatch.setattr(SetCriterion, "forward", nan_forward)
    code, _, err = _run_main_in_process(capsys, "--coco_path", demo_data, "--epochs", "1")
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: non-finite loss at epoch 0 step 0/3: loss=nan")


# ---------------------------------------------------------------------------------------------------------------
# Safe loading


def _python_files() -> list[Path]:
    skip = {".venv", "data", "outputs", ".git"}
    return [p for p in ROOT.rglob("*.py") if not skip & set(p.relative_to(ROOT).parts)]


def test_every_torch_load_uses_weights_only_and_yaml_is_read_safely():
    files = _python_files()
    assert len(files) > 30
    problems = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if (owner, node.func.attr) == ("torch", "load"):
                safe = [k for k in node.keywords if k.arg == "weights_only"]
                if not safe or not (isinstance(safe[0].value, ast.Constant) and safe[0].value.value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            if owner == "yaml" and node.func.attr in ("load", "unsafe_load", "full_load", "load_all"):
                problems.append(f"{where}: yaml.{node.func.attr} (use yaml.safe_load)")
    assert not problems, problems


class _RunsACommand:
    """Pickles as a call to os.system: what a malicious checkpoint would execute under weights_only=False."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_checkpoint_with_a_pickled_object_is_refused(demo_data, tmp_path, capsys):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pth"
    model, _, _ = _tiny_model()
    torch.save({"model": model.state_dict(), "epoch": 1, "step": 0, "payload": _RunsACommand(f"touch {marker}")},
               path)
    for flag in ("--resume", "--finetune"):
        code, _, err = _run_main_in_process(capsys, "--coco_path", demo_data, "--epochs", "1", flag, path)
        assert code == 1 and "Traceback" not in err
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"error: {path}: refused to load, it holds more than tensors and plain types"), last
        assert not marker.exists()


def _checkpoint(path: Path, *argv) -> None:
    args = _parse("--num_classes", "8", *argv)
    model, _, _ = build_model(args)
    save_checkpoint({"model": model.state_dict(), "config": config_dict(args), "epoch": 1, "step": 0}, path)


def test_foreign_checkpoints_are_one_line_explanations(demo_data, tmp_path, capsys):
    path = tmp_path / "small.pth"
    _checkpoint(path)  # hidden_dim 32, 8 classes
    cases = [(["--resume", path, "--hidden_dim", "64"], f"error: --hidden_dim 64 here but 32 in {path} (the "
              "checkpoint's architecture): evaluate it with the flags it was trained with"),
             (["--resume", path, "--num_classes", "12"], f"--num_classes 12 here but 8 in {path}"),
             (["--finetune", path, "--hidden_dim", "64"], f"--hidden_dim 64 here but 32 in {path}")]
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[:5000])
    cases.append((["--resume", truncated], f"error: {truncated}: not a readable checkpoint (truncated, corrupt"))
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    for flag in ("--resume", "--finetune", "--pretrained_backbone"):
        cases.append(([flag, text], f"error: {text}: not a readable checkpoint (truncated, corrupt or not a "
                                    "torch.save file?)"))
    for argv, message in cases:
        evaluate = [] if "--pretrained_backbone" in argv else ["--eval"]  # --eval needs a --resume or --finetune
        code, _, err = _run_main_in_process(capsys, "--coco_path", demo_data, "--epochs", "1", *evaluate, *argv)
        last = err.strip().splitlines()[-1]
        assert code == 1 and message in last and "Traceback" not in err, (argv, err[-2000:])


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint writes killed half-way

KILLED_WRITER = """
import io, os, sys, time, torch
root, path, stage = sys.argv[1:4]
sys.path.insert(0, root)
from training import checkpoint
checkpoint.save_checkpoint({"model": {"w": torch.zeros(1000)}, "epoch": 1, "step": 0}, path)
if stage == "mid-write":  # half of the new file's bytes written, then killed
    real_save = torch.save
    def half_save(obj, f):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        f.flush()
        print("killing point", flush=True)
        time.sleep(120)
    torch.save = half_save
else:  # the new file complete and synced, killed before the rename
    real_fsync = os.fsync
    def fsync_then_wait(fd):
        real_fsync(fd)
        print("killing point", flush=True)
        time.sleep(120)
    os.fsync = fsync_then_wait
checkpoint.save_checkpoint({"model": {"w": torch.ones(1000)}, "epoch": 2, "step": 0}, path)
"""


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["mid-write", "before-rename"])
def test_kill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, stage):
    path = tmp_path / "checkpoint.pth"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(ROOT), str(path), stage], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "killing point"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    state = torch.load(path, weights_only=True)
    assert state["epoch"] == 1 and torch.equal(state["model"]["w"], torch.zeros(1000))
    leftovers = [p for p in tmp_path.iterdir() if p != path]
    assert len(leftovers) == 1 and TEMP_NAME.match(leftovers[0].name)  # hidden, not `checkpoint*.pth`
    assert [p.name for p in tmp_path.glob("checkpoint*.pth")] == ["checkpoint.pth"]
    from training.run import _resolve_resume

    assert _resolve_resume(argparse.Namespace(resume="auto", output_dir=str(tmp_path))) == path
    assert remove_stale_temp_files(tmp_path) == leftovers and list(tmp_path.iterdir()) == [path]


def test_a_checkpoint_that_cannot_be_written_is_a_one_line_error_and_leaves_the_target_alone(tmp_path):
    """A real failing write: a folder sits where the checkpoint goes (the rename fails), as disk-full or read-only
    folders fail the write itself (torch.save then raises RuntimeError, also turned into a CheckpointError)."""
    from pvt_detr.checkpoints import CheckpointError

    path = tmp_path / "checkpoint.pth"
    (path / "inside").mkdir(parents=True)
    with pytest.raises(CheckpointError) as err:
        save_checkpoint({"model": {"w": torch.ones(3)}, "epoch": 0, "step": 0}, path)
    message = str(err.value)
    assert message.startswith(f"{path}: cannot write the checkpoint: Is a directory") and "\n" not in message
    assert message.endswith("MiB free there); the previous one, if any, is unchanged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth"] and (path / "inside").is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("blocked", ["checkpoint.pth", "log.txt"])
def test_the_cli_stops_with_one_line_when_an_output_cannot_be_written(tmp_path, blocked):
    """A folder where the checkpoint or the log goes: the run ends with one line naming that file, exit code 1."""
    out = tmp_path / "run"
    (out / blocked / "inside").mkdir(parents=True)
    proc = subprocess.run(_main_command(tmp_path / "data", out, "--epochs", "1"), cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {out / blocked}: cannot write") and "Is a directory" in last, last
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------------------------
# Stop signals and kill -9 during training, end to end


def _main_command(data: Path, out: Path, *extra) -> list[str]:
    return [sys.executable, str(ROOT / "main.py"), *TINY, "--coco_path", str(data), "--output_dir", str(out),
            "--epochs", "2", *map(str, extra)]


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", **extra}


def _only_plain_types(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and _only_plain_types(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_only_plain_types(v) for v in value)
    return value is None or isinstance(value, (torch.Tensor, bool, int, float, str))


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


def assert_same_run(out: Path, reference: Path) -> None:
    """Final weights, optimizer state and every logged number (but times) equal the uninterrupted run's."""
    final = torch.load(out / "checkpoint.pth", weights_only=True)
    expected = torch.load(reference / "checkpoint.pth", weights_only=True)
    assert (final["epoch"], final["step"]) == (expected["epoch"], expected["step"])
    assert final["model"].keys() == expected["model"].keys()
    for key in expected["model"]:
        torch.testing.assert_close(final["model"][key], expected["model"][key], rtol=1e-6, atol=1e-7, msg=key)
    exp_avg = [s["exp_avg"] for s in expected["optimizer"]["state"].values()]
    for got, want in zip([s["exp_avg"] for s in final["optimizer"]["state"].values()], exp_avg):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    log, expected_log = _log(out), _log(reference)
    assert [e["epoch"] for e in log] == [e["epoch"] for e in expected_log]
    for entry, want in zip(log, expected_log):
        for key, value in want.items():
            if key == "test_per_class_ap":
                close = lambda v: v if v is None else pytest.approx(v, abs=1e-9)  # noqa: E731
                assert [{**r, "ap": close(r["ap"]), "ap50": close(r["ap50"])} for r in value] == entry[key], key
            elif key not in ("train_time", "elapsed_s"):
                assert entry[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (entry["epoch"], key)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 2-epoch run (3 steps per epoch); its data folder is shared by the interrupted runs."""
    base = tmp_path_factory.mktemp("reference")
    data, out = base / "data", base / "run"
    proc = subprocess.run(_main_command(data, out), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return data, out


@pytest.mark.slow
def test_stop_signals_checkpoint_and_exit_0_and_resuming_gives_the_uninterrupted_run(reference, tmp_path):
    """SIGUSR1 during epoch 0's last step: stop after that epoch's checkpoint and evaluation. Resume; Ctrl-C's SIGINT
    during epoch 1 step 0: checkpoint at epoch 1 step 1 with the epoch's running sums, exit code 130 and no
    traceback. Resume again: the same run."""
    data, ref_out = reference
    out = tmp_path / "run"
    wrapper = [sys.executable, "-c", SELF_SIGNAL_WRAPPER, str(ROOT)]

    proc = subprocess.run(wrapper + _main_command(data, out)[2:], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=_env(SELF_SIGNAL="SIGUSR1:0:2"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "received SIGUSR1: saved checkpoint at epoch 1 step 0; resume with --resume auto" in proc.stdout
    assert [e["epoch"] for e in _log(out)] == [0] and "epoch 1:" not in proc.stdout

    proc = subprocess.run(wrapper + _main_command(data, out, "--resume", "auto")[2:], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=_env(SELF_SIGNAL="SIGINT:1:0"))
    assert proc.returncode == 130 and "Traceback" not in proc.stderr, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "resumed from" in proc.stdout and "epoch 1, step 0" in proc.stdout
    assert "received SIGINT: saved checkpoint at epoch 1 step 1; resume with --resume auto" in proc.stdout
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 1) and state["epoch_totals"]["count"] == 1
    assert _only_plain_types(state)

    proc = subprocess.run(_main_command(data, out, "--resume", "auto"), cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "epoch 1, step 1" in proc.stdout
    assert_same_run(out, ref_out)


@pytest.mark.slow
def test_resuming_with_another_batch_size_keeps_the_lr_schedule_on_epochs(reference, tmp_path):
    """A run resumed with another world size or batch size has another number of steps per epoch: the restored
    schedule is re-aligned to this run's (LR drop and warm-up at the right epoch), and an epoch interrupted mid-way
    restarts from its first step (the saved step counts another run's batches)."""
    data, _ = reference
    out = tmp_path / "run"
    proc = subprocess.run(_main_command(data, out, "--epochs", "1"), cwd=ROOT, capture_output=True, text=True,
                          timeout=300)  # batch 4: 3 steps per epoch
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert torch.load(out / "checkpoint.pth", weights_only=True)["lr_scheduler"]["last_epoch"] == 3

    proc = subprocess.run(_main_command(data, out, "--epochs", "3", "--batch_size", "2", "--resume", "auto"),
                          cwd=ROOT, capture_output=True, text=True, timeout=300)  # 6 steps per epoch
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "was trained with 1 process(es) x 4 images per step, this run uses 1 x 2: the LR schedule follows this " \
           "run's 6 steps per epoch\n" in proc.stdout
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert (state["epoch"], state["step"], state["lr_scheduler"]["last_epoch"]) == (3, 0, 18)  # not 3 + 12
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(5e-5)  # --lr_drop 1: dropped since epoch 1

    wrapper = [sys.executable, "-c", SELF_SIGNAL_WRAPPER, str(ROOT)]
    mid = tmp_path / "mid"
    proc = subprocess.run(wrapper + _main_command(data, mid)[2:], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=_env(SELF_SIGNAL="SIGTERM:0:1"))
    assert "saved checkpoint at epoch 0 step 2" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    proc = subprocess.run(_main_command(data, mid, "--batch_size", "2", "--resume", "auto"), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "and epoch 0, interrupted at step 2, restarts from its first step" in proc.stdout
    assert "epoch 0, step 0" in proc.stdout
    state = torch.load(mid / "checkpoint.pth", weights_only=True)
    assert (state["epoch"], state["lr_scheduler"]["last_epoch"]) == (2, 12)
    assert [e["epoch"] for e in _log(mid)] == [0, 1] and all(e["train_steps"] == 6 for e in _log(mid))


@pytest.mark.slow
def test_resuming_with_other_lr_flags_applies_them_and_says_so(reference, tmp_path):
    """A restored optimizer keeps the saved run's LRs and weight decay; the resumed run uses this run's flags (as the
    schedule's --lr_drop and --warmup_iters already do), with a note. A frozen/trained backbone mismatch is one line."""
    data, _ = reference
    out = tmp_path / "run"
    proc = subprocess.run(_main_command(data, out, "--epochs", "1"), cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    saved = torch.load(out / "checkpoint.pth", weights_only=True)["config"]
    proc = subprocess.run(_main_command(data, out, "--resume", "auto", "--lr", "3e-4", "--weight_decay", "0.05"),
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (f"note: this run's --lr 0.0003 (was {saved['lr']:g}), --weight_decay 0.05 (was {saved['weight_decay']:g}) "
            "apply from epoch 1, step 0 on") in proc.stdout
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    groups = state["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.05]
    assert [g["lr"] for g in groups] == pytest.approx([3e-5, saved["lr_backbone"] * 0.1])  # --lr_drop 1: dropped
    assert state["lr_scheduler"]["base_lrs"] == pytest.approx([3e-4, saved["lr_backbone"]])
    assert _log(out)[1]["train_lr"] == pytest.approx(3e-5)

    proc = subprocess.run(_main_command(data, out, "--epochs", "3", "--resume", "auto", "--lr_backbone", "0"),
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {out / 'checkpoint.pth'} trained its backbone (--lr_backbone > 0) but this run freezes it "
        "(--lr_backbone 0): resume with the run's --lr_backbone, or start a new run from its weights with --finetune")


# Runs main.py after patching the training set so that loader worker 0, loading its second image of the run, sends
# GROUP_SIGNAL to the whole process group (the main process waits for that batch), as SLURM's time limit, scancel
# and `timeout` do.
GROUP_SIGNAL_WRAPPER = """
import os, runpy, signal, sys
root = sys.argv.pop(1)
sys.path.insert(0, root)
import torch.utils.data
import training.sampling as sampling
original, loaded = sampling.EpochSeededDataset.__getitem__, []
def signalling_getitem(self, index):
    worker = torch.utils.data.get_worker_info()
    if worker is not None and worker.id == 0 and self.epoch == 0:
        loaded.append(index)
        if len(loaded) == 2:
            os.killpg(os.getpgrp(), getattr(signal, os.environ["GROUP_SIGNAL"]))
    return original(self, index)
sampling.EpochSeededDataset.__getitem__ = signalling_getitem
sys.argv[0] = os.path.join(root, "main.py")
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR2"])
def test_a_stop_signal_to_the_whole_process_group_still_checkpoints_with_loader_workers(reference, tmp_path, name):
    """SLURM (time limit, scancel) and `timeout` signal every process of the job, data-loader workers included.
    The workers leave the stop to the main process: it checkpoints after the step, exits 0, and resuming gives the
    uninterrupted run. (Workers used to die mid-batch and the run failed with "DataLoader worker ... killed by
    signal" and no checkpoint.)"""
    data, ref_out = reference
    out = tmp_path / "run"
    wrapper = [sys.executable, "-c", GROUP_SIGNAL_WRAPPER, str(ROOT)]
    proc = subprocess.run(wrapper + _main_command(data, out, "--num_workers", "2")[2:], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, start_new_session=True,
                          env=_env(GROUP_SIGNAL=name))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"received {name}: saved checkpoint at epoch 0 step 1; resume with --resume auto" in proc.stdout
    assert "Traceback" not in proc.stderr

    proc = subprocess.run(_main_command(data, out, "--resume", "auto", "--num_workers", "2"), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "epoch 0, step 1" in proc.stdout
    assert_same_run(out, ref_out)


def _wait_for_line(path: Path, text: str, proc: subprocess.Popen, timeout: float = 120) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and text in path.read_text():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    raise AssertionError(f"no {text!r} in {path} after {timeout} s")


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume_auto_gives_the_uninterrupted_run(reference, tmp_path):
    """Three SIGKILLs at random moments (seeded) of one training history, each followed by --resume auto; the run
    that finally completes has the uninterrupted run's weights and log."""
    data, ref_out = reference
    training_seconds = _log(ref_out)[-1]["elapsed_s"]  # from the "training ..." line to the last epoch's end
    out = tmp_path / "run"
    history = []
    for seed in (1, 2, 3):
        delay = random.Random(seed).uniform(0.0, training_seconds)
        stdout = tmp_path / f"stdout{seed}.txt"
        with open(stdout, "w") as f:
            proc = subprocess.Popen(_main_command(data, out, "--resume", "auto"), cwd=ROOT, stdout=f,
                                    stderr=subprocess.STDOUT, env=_env())
        try:
            _wait_for_line(stdout, "training 2 epochs", proc)
            time.sleep(delay)
            alive = proc.poll() is None
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            proc.kill()
        epoch = torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] if (out / "checkpoint.pth").exists() \
            else None
        history.append((round(delay, 2), alive, epoch))
    assert any(alive for _, alive, _ in history), history
    proc = subprocess.run(_main_command(data, out, "--resume", "auto"), cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, (history, proc.stdout[-2000:] + proc.stderr[-2000:])
    assert not [p for p in out.iterdir() if TEMP_NAME.match(p.name)]
    assert_same_run(out, ref_out)


@pytest.mark.slow
def test_a_crash_between_the_epoch_checkpoint_and_its_log_entry_is_finished_on_resume(reference, tmp_path):
    """kill -9 during the last epoch's evaluation leaves checkpoint.pth at epoch 2 and log.txt without epoch 1:
    --resume auto evaluates and logs epoch 1 (from the checkpoint's train stats) and trains nothing more."""
    import shutil

    data, ref_out = reference
    out = tmp_path / "run"
    shutil.copytree(ref_out, out)
    (out / "log.txt").write_text(json.dumps(_log(ref_out)[0]) + "\n")
    (out / "final_stats.json").unlink()
    proc = subprocess.run(_main_command(data, out, "--resume", "auto"), cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "epoch 1: train loss" in proc.stdout
    assert_same_run(out, ref_out)
    assert json.loads((out / "final_stats.json").read_text()) == json.loads((ref_out / "final_stats.json").read_text())
    again = subprocess.run(_main_command(data, out, "--resume", "auto"), cwd=ROOT, capture_output=True, text=True,
                           timeout=300)  # the log is complete now: nothing is evaluated twice or logged twice
    assert again.returncode == 0 and "epoch 1: train loss" not in again.stdout
    assert [e["epoch"] for e in _log(out)] == [0, 1]
    final_stats = json.loads((out / "final_stats.json").read_text())  # kept, not overwritten by an empty run
    assert final_stats == json.loads((ref_out / "final_stats.json").read_text())
