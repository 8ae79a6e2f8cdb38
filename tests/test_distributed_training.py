"""Two gloo processes (torchrun) train and evaluate exactly like one process over the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch
from test_main_cli import ROOT, TINY

# 12 training images, global batch 4 -> 3 steps; no dropout so that per-rank seeds do not matter. DETR's default
# eos_coef 0.1: the class-weighted cross-entropy is normalised by the global weight sum, so it must agree too.
FLAGS = [*TINY, "--epochs", "1", "--dropout", "0", "--drop_path", "0", "--device", "cpu", "--num_threads", "1"]


def _env():
    prefixes = ("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(cmd, cwd):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process(tmp_path):
    data = tmp_path / "data"
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, str(ROOT / "main.py"), *FLAGS, "--coco_path", data, "--output_dir", one,
          "--batch_size", "4"], ROOT)
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561",
                 str(ROOT / "main.py"), *FLAGS, "--coco_path", data, "--output_dir", two, "--batch_size", "2"], ROOT)
    assert "2 process(es)" in proc.stdout

    single = torch.load(one / "checkpoint.pth", weights_only=True)
    double = torch.load(two / "checkpoint.pth", weights_only=True)
    log_one = json.loads((one / "log.txt").read_text().splitlines()[-1])
    log_two = json.loads((two / "log.txt").read_text().splitlines()[-1])
    assert log_one["train_steps"] == log_two["train_steps"] == 3
    # Every logged training loss (the class-weighted CE included) is the one-process value of the global batch.
    for key in ("train_loss", "train_loss_ce", "train_loss_bbox", "train_loss_giou"):
        assert log_two[key] == pytest.approx(log_one[key], rel=1e-6), key
    # The whole parameter vector agrees within 1e-6 relative (observed ~2e-8). Single tensors agree less tightly
    # where a gradient is float noise around an exact zero (attention key biases, whose gradient vanishes since
    # softmax ignores a per-query shift) and AdamW normalises it to a step of +-lr: observed <= 1e-4 of the norm.
    diff = torch.cat([(double["model"][k] - v).flatten().double() for k, v in single["model"].items()]).norm()
    scale = torch.cat([v.flatten().double() for v in single["model"].values()]).norm()
    assert diff / scale < 1e-6, (diff / scale).item()
    worst = max(((double["model"][k] - v).norm() / v.norm()).item() for k, v in single["model"].items())
    assert worst < 1e-3, worst
    # Evaluation over 2 ranks (predictions gathered, scored once) gives the single process's 12 COCO stats.
    assert log_two["test_coco_eval_bbox"] == pytest.approx(log_one["test_coco_eval_bbox"], abs=1e-6)
    assert len(log_one["test_coco_eval_bbox"]) == 12


@pytest.mark.slow
def test_legacy_torch_distributed_launch_passes_local_rank(tmp_path):
    # `python -m torch.distributed.launch` without --use-env appends --local-rank=N to each process's flags, as in
    # older DETR-style commands; the ranks come from the environment it sets, and config.yaml does not record them.
    sys.path.insert(0, str(ROOT))
    import main
    from pvt_detr import build_model
    from training.config import parse_args

    weights = tmp_path / "weights.pth"  # a state dict of the run's model: something to evaluate
    torch.save({"model": build_model(parse_args(main.build_cli_parser(), FLAGS))[0].state_dict()}, weights)
    proc = _run([sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node", "2", "--master_port", "29563",
                 str(ROOT / "main.py"), *FLAGS, "--coco_path", tmp_path / "data", "--output_dir", tmp_path / "out",
                 "--eval", "--finetune", weights], ROOT)
    assert "2 process(es)" in proc.stdout and "Average Precision" in proc.stdout
    assert "local_rank" not in (tmp_path / "out" / "config.yaml").read_text()
    env = {**_env(), "LOCAL_RANK": "1", "RANK": "1", "WORLD_SIZE": "2"}
    bad = subprocess.run([sys.executable, str(ROOT / "main.py"), *FLAGS, "--local-rank=0", "--eval"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, env=env)
    assert bad.returncode == 1 and "--local-rank 0 disagrees with the environment's LOCAL_RANK 1" in bad.stderr


@pytest.mark.slow
def test_a_frozen_backbone_trains_under_ddp(tmp_path):
    """--lr_backbone 0 freezes the backbone before DDP wraps the model: two processes train past the second step
    (DDP would otherwise wait for the backbone's gradients), and the backbone's weights do not move."""
    data, out = tmp_path / "data", tmp_path / "out"
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29565",
          str(ROOT / "main.py"), *FLAGS, "--coco_path", data, "--output_dir", out, "--batch_size", "2",
          "--lr_backbone", "0", "--epochs", "2", "--eval_every", "2"], ROOT)
    first = torch.load(out / "checkpoint0000.pth", weights_only=True)["model"]  # --lr_drop 1: after epoch 0
    last = torch.load(out / "checkpoint.pth", weights_only=True)
    assert last["epoch"] == 2 and len(last["optimizer"]["param_groups"]) == 1
    backbone = [k for k in first if k.startswith("backbone.")]
    assert backbone and all(torch.equal(first[k], last["model"][k]) for k in backbone)
    assert not torch.equal(first["class_embed.weight"], last["model"]["class_embed.weight"])


@pytest.mark.slow
@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_resuming_with_another_world_size(tmp_path, before, after):
    """An epoch on `before` processes, the next one resumed on `after`: the epoch count continues, the resume says
    which random states it could not restore, and training ends with finite weights."""
    data, out = tmp_path / "data", tmp_path / "out"

    def launch(processes: int, *extra):
        runner = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                  "--master_port", "29567"] if processes > 1 else [sys.executable]
        return _run([*runner, str(ROOT / "main.py"), *FLAGS, "--coco_path", data, "--output_dir", out,
                     "--batch_size", str(4 // processes), *extra], ROOT)

    launch(before)
    proc = launch(after, "--epochs", "2", "--resume", "auto")
    assert f"was trained with {before} process(es) x {4 // before} images per step" in proc.stdout
    assert "resumed from" in proc.stdout and "epoch 1, step 0" in proc.stdout
    if after > before:
        assert "no random state for this process (another world size)" in proc.stderr
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [0, 1] and log[1]["train_steps"] == 3
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert state["epoch"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())
