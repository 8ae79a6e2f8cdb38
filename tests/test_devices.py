"""What the GPU path decides, checked on the CPU: the mixed-precision dtype, skipped gradient-scaler steps, the
processes-per-GPU check, no CUDA use for --device cpu, and how often a training step waits for the device."""

from __future__ import annotations

import inspect
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch

from datasets import collate_fn
from pvt_detr import ModelConfig, build_model
from training.devices import DeviceSetupError, amp_dtype, check_gpu_layout, grad_scaler, local_world_size
from training.engine import train_one_epoch

CONFIG = ModelConfig(backbone="pvt_nano", backbone_stages=(3,), hidden_dim=32, nheads=2, enc_layers=1, dec_layers=3,
                     dim_feedforward=64, num_queries=6, num_classes=8, dropout=0.0, drop_path=0.0)


def _batches(n: int = 3) -> list:
    def item(seed: int):
        g = torch.Generator().manual_seed(seed)
        target = {"boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.3, 0.6, 0.2, 0.2]]), "labels": torch.tensor([1, 7]),
                  "image_id": torch.tensor(seed), "orig_size": torch.tensor([64, 64]),
                  "size": torch.tensor([64, 64])}
        return torch.randn(3, 64, 64, generator=g), target

    return [collate_fn([item(2 * b), item(2 * b + 1)]) for b in range(n)]


class _Args:
    def __init__(self, amp: bool, amp_dtype: str = "auto"):
        self.amp, self.amp_dtype = amp, amp_dtype


def test_amp_dtype_is_bf16_where_native_and_fp16_needs_a_scaler():
    cpu = torch.device("cpu")
    assert amp_dtype(_Args(False), cpu) is None
    assert amp_dtype(_Args(True), cpu) == torch.bfloat16 and grad_scaler(torch.bfloat16, cpu) is None
    assert amp_dtype(_Args(True, "fp16"), cpu) == torch.float16
    assert grad_scaler(torch.float16, cpu) is None  # the scaler is for GPUs
    assert grad_scaler(torch.bfloat16, torch.device("cuda")) is None
    with warnings.catch_warnings():  # without CUDA the scaler warns that it is disabled
        warnings.simplefilter("ignore")
        assert isinstance(grad_scaler(torch.float16, torch.device("cuda")), torch.amp.GradScaler)


def test_more_processes_than_gpus_on_a_node_is_one_line():
    check_gpu_layout(8, 8, {})
    check_gpu_layout(None, 1, {})
    check_gpu_layout(4, 1, {"SLURM_GPUS_PER_TASK": "1"})  # SLURM binds one GPU to each task
    with pytest.raises(DeviceSetupError) as info:
        check_gpu_layout(8, 4, {"CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    assert str(info.value) == ("8 processes on this node but 4 visible GPU(s) (CUDA_VISIBLE_DEVICES=0,1,2,3): start "
                               "one process per GPU (torchrun --nproc_per_node, or submit.py --ngpus)")
    assert local_world_size({"LOCAL_WORLD_SIZE": "8"}) == 8
    assert local_world_size({"SLURM_STEP_TASKS_PER_NODE": "4(x2)"}) == 4
    assert local_world_size({"SLURM_NTASKS_PER_NODE": "2,1"}) == 2 and local_world_size({}) is None


def test_steps_the_gradient_scaler_skips_are_counted_apart_and_left_out_of_the_means():
    """fp16 with a GradScaler whose first scale overflows the gradients: that step is skipped by the scaler (not a
    non-finite step and no error), its losses stay out of the epoch's means, and the next steps train."""
    torch.manual_seed(0)
    model, criterion, _ = build_model(CONFIG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)
    # The first scale overflows float32 at once; the scaler then backs off far enough for the next steps.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**126, backoff_factor=2.0**-100)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = train_one_epoch(model, criterion, _batches(3), optimizer, scheduler, torch.device("cpu"), 0,
                            scaler=scaler, clip_max_norm=0.1)
    assert stats["amp_skipped_steps"] == 1 and stats["nonfinite_steps"] == 0 and stats["steps"] == 3
    assert scaler.get_scale() == 2.0**26
    assert all(v == v and abs(v) < float("inf") for v in stats.values())  # the skipped step is not in the means
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_cpu_run_never_touches_cuda(tmp_path, capsys):
    import main
    from datasets import generate_demo_dataset
    from tests.test_main_cli import TINY
    from training.config import parse_args

    generate_demo_dataset(tmp_path / "data", 8, 4, 64)
    main.main(parse_args(main.build_cli_parser(), [*TINY, "--coco_path", str(tmp_path / "data"), "--epochs", "1",
                                                   "--output_dir", str(tmp_path / "out")]))
    assert not torch.cuda.is_initialized()
    state = torch.load(tmp_path / "out" / "checkpoint.pth", weights_only=True)
    assert all("cuda" not in rng for rng in state["rng"].values())


def test_a_training_step_waits_for_the_device_a_bounded_number_of_times(monkeypatch):
    """Host synchronisations of a step, counted on the CPU as the calls of the project's code that read a tensor's
    value on the host: one for the step's counts (all-reduced together), one per Hungarian matching (one per decoder
    layer: the cost matrix to the CPU) and one for the gradient norm; then one for the epoch's loss sums. Nothing per
    image or per target. (PyTorch's own reads of host-side tensors, e.g. the optimizer's step counters on the CPU,
    are not device synchronisations and are not counted.)"""
    torch.manual_seed(0)
    model, criterion, _ = build_model(CONFIG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)
    batches = _batches(4)
    train_one_epoch(model, criterion, batches[:1], optimizer, scheduler, torch.device("cpu"), 0)  # warm-up
    root = str(Path(__file__).resolve().parents[1])
    counts: Counter = Counter()
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, _name=name, **kwargs):
            caller = inspect.currentframe().f_back.f_code.co_filename
            if caller.startswith(root) and "/.venv/" not in caller:
                counts[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    train_one_epoch(model, criterion, batches[1:], optimizer, scheduler, torch.device("cpu"), 0, start_step=1)
    monkeypatch.undo()
    steps, layers = 3, CONFIG.dec_layers
    assert counts == {"tolist": steps + 1, "__float__": steps, "cpu": steps * layers, "numpy": steps * layers}, counts
