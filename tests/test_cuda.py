"""The CUDA path (`pytest -m cuda`; skipped without a GPU): training in fp32/TF32 and under --amp bf16 and fp16,
checkpoints moving between GPU and CPU, evaluation, Detector / predict / ONNX export on a GPU, --compile, NCCL in a
one-process group, host synchronisations of a training step, and a throughput print of pvt_small at 800 px.

    python -m pytest -m cuda -s tests/test_cuda.py     # -s shows the throughput lines
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.test_main_cli import TINY
from tests.tiny_detector import ROOT

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

# 40 training images, batch 4: 10 steps per epoch, 2 epochs = 20 steps; the TINY model of the CLI tests on the GPU.
FLAGS = [*[f for f in TINY if f not in ("--device", "cpu")], "--device", "cuda", "--demo_train_images", "40",
         "--epochs", "2", "--eval_every", "2", "--lr_drop", "10"]


def _main(*args, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), *FLAGS, *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cuda") / "data"


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16", "fp16"])
def test_twenty_training_steps_on_the_gpu(data, tmp_path, precision):
    extra = {"fp32": ["--no_tf32"], "tf32": [], "bf16": ["--amp", "--amp_dtype", "bf16"],
             "fp16": ["--amp", "--amp_dtype", "fp16"]}[precision]
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    start = time.time()
    proc = _main("--coco_path", data, "--output_dir", tmp_path, *extra)
    log = _log(tmp_path)
    assert [e["train_steps"] for e in log] == [10, 10]
    assert all(math.isfinite(e["train_loss"]) for e in log) and log[1]["train_loss"] < log[0]["train_loss"]
    assert log[1]["train_nonfinite_steps"] == 0 and len(log[1]["test_coco_eval_bbox"]) == 12
    if precision == "fp16":  # the scaler's skipped steps are counted apart, not as errors
        assert "with a gradient scaler" in proc.stdout and "train_amp_skipped_steps" in log[0]
    if precision == "tf32":
        assert "CUDA float32 matmuls use TF32" in proc.stdout
    print(f"\n{precision}: 20 steps + 2 evaluations in {time.time() - start:.1f} s")


def test_a_gpu_checkpoint_resumes_on_the_cpu_and_back(data, tmp_path):
    out = tmp_path / "run"
    _main("--coco_path", data, "--output_dir", out, "--epochs", "1")
    state = torch.load(out / "checkpoint.pth", weights_only=True, map_location="cpu")
    assert all(isinstance(rng["cuda"], torch.Tensor) for rng in state["rng"].values())
    _main("--coco_path", data, "--output_dir", out, "--epochs", "2", "--resume", "auto", "--device", "cpu")
    _main("--coco_path", data, "--output_dir", out, "--epochs", "3", "--resume", "auto")
    assert [e["epoch"] for e in _log(out)] == [0, 1, 2]


def test_evaluation_detector_predict_and_onnx_export_on_the_gpu(data, tmp_path):
    from pvt_detr.export import export_onnx, onnx_session
    from pvt_detr.inference import Detector

    out = tmp_path / "run"
    _main("--coco_path", data, "--output_dir", out, "--epochs", "1")
    proc = _main("--coco_path", data, "--output_dir", tmp_path / "eval", "--eval", "--resume", out / "checkpoint.pth")
    assert "Average Precision  (AP) @[ IoU=0.50:0.95" in proc.stdout and "per-class box AP" in proc.stdout
    detector = Detector.from_checkpoint(out / "checkpoint.pth", device="cuda")
    images = sorted((data / "val2017").glob("*.jpg"))[:3]
    before = detector.predict(images, score_threshold=0.0)
    export_onnx(detector, tmp_path / "model.onnx", exporter="torchscript")
    assert next(detector.model.parameters()).device.type == "cuda"  # the export worked on a CPU copy
    after = detector.predict(images, score_threshold=0.0)
    for a, b in zip(before, after):
        torch.testing.assert_close(a.scores, b.scores)
    assert onnx_session(tmp_path / "model.onnx") is not None
    proc = subprocess.run([sys.executable, "-m", "pvt_detr.predict", "--checkpoint", str(out / "checkpoint.pth"),
                           "--device", "cuda", "--out", str(tmp_path / "pred"), *map(str, images)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads((tmp_path / "pred" / "predictions.json").read_text())) >= 0


def test_compile_trains_and_evaluates_on_the_gpu(data, tmp_path):
    proc = _main("--coco_path", data, "--output_dir", tmp_path, "--epochs", "1", "--compile", timeout=900)
    assert "torch.compile" in proc.stdout and math.isfinite(_log(tmp_path)[0]["train_loss"])


def test_nccl_in_a_one_process_group():
    code = ("import datetime, torch, torch.distributed as dist; "
            "dist.init_process_group('nccl', init_method='tcp://127.0.0.1:29581', rank=0, world_size=1, "
            "timeout=datetime.timedelta(seconds=60)); t = torch.ones(3, device='cuda'); dist.all_reduce(t); "
            "print(dist.get_backend(), t.sum().item()); dist.destroy_process_group()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")})
    assert proc.returncode == 0 and proc.stdout.split() == ["nccl", "3.0"], proc.stderr


def test_a_training_step_synchronises_only_where_it_must():
    """torch.cuda.set_sync_debug_mode counts the synchronising calls of training steps on the GPU: the step's
    counts, one per Hungarian matching and the gradient norm (as counted on the CPU by tests/test_devices.py)."""
    import warnings

    from pvt_detr import build_model
    from tests.test_devices import CONFIG, _batches
    from training.engine import train_one_epoch

    device = torch.device("cuda")
    torch.manual_seed(0)
    model, criterion, _ = build_model(CONFIG)
    model.to(device)
    criterion.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)
    batches = _batches(4)
    train_one_epoch(model, criterion, batches[:1], optimizer, scheduler, device, 0)  # warm-up
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_one_epoch(model, criterion, batches[1:], optimizer, scheduler, device, 0, start_step=1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    steps, layers = 3, CONFIG.dec_layers
    print(f"\n{len(syncs)} synchronising calls in {steps} training steps ({layers} decoder layers)")
    assert len(syncs) <= steps * (layers + 4) + 2, [str(w.message)[:120] for w in syncs[:10]]


def test_throughput_of_pvt_small_at_800_pixels():
    """Images/s and peak GPU memory of a few training steps of the paper's detector at its training scale."""
    from pvt_detr import ModelConfig, build_model
    from pvt_detr.nested_tensor import nested_tensor_from_tensor_list
    from training.optim import build_optimizer

    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    model, criterion, _ = build_model(ModelConfig())
    model.to(device).train()
    criterion.to(device)

    class Args:
        lr, lr_backbone, weight_decay = 1e-4, 1e-5, 1e-4

    optimizer = build_optimizer(model, Args)
    g = torch.Generator().manual_seed(0)
    samples = nested_tensor_from_tensor_list([torch.randn(3, 800, 1216, generator=g),
                                              torch.randn(3, 736, 1088, generator=g)]).to(device)
    targets = [{"labels": torch.randint(1, 91, (8,), generator=g).to(device),
                "boxes": (torch.rand(8, 4, generator=g) * 0.4 + 0.3).to(device)} for _ in range(2)]
    for amp in (None, torch.bfloat16):
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(6):
            torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.autocast("cuda", dtype=amp or torch.float32, enabled=amp is not None):
                losses = criterion(model(samples), targets)
            loss = sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            optimizer.step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        step_s = sorted(times[1:])[len(times[1:]) // 2]
        print(f"\npvt_small + DETR, batch 2 at 800x1216 / 736x1088, {'bf16 autocast' if amp else 'fp32 (TF32)'}: "
              f"{2 / step_s:.1f} images/s ({step_s * 1000:.0f} ms/step), peak GPU memory "
              f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB on {torch.cuda.get_device_name()}")
        assert math.isfinite(float(loss))
