"""The op-time breakdown sorts ops into the right kinds, counts every call, and accounts for a run's time."""

import pytest
import torch
import torch.optim.optimizer as optimizer_module

from benchmarks import benchmark
from benchmarks.op_breakdown import KINDS, OTHER, OUTSIDE, OpTimes, breakdown, kind_of
from pvt_detr.matmul import ONEDNN_AVAILABLE, linear
from tests.test_benchmark import TINY


def test_kinds_of_known_ops():
    assert kind_of("addmm") == kind_of("_linear_pointwise") == kind_of("convolution_backward") == "linear maps"
    assert kind_of("_scaled_dot_product_flash_attention_for_cpu") == kind_of("_softmax") == "attention"
    assert kind_of("bmm") == kind_of("baddbmm") == "attention"  # the models batch only attention's products
    assert kind_of("native_layer_norm_backward") == "layer norm"
    assert kind_of("_fused_adamw_") == "optimizer"
    assert kind_of("_foreach_norm") == OTHER  # gradient clipping's, outside a step; a step's ops count by its hooks
    assert kind_of("copy_") == kind_of("cat") == "copies"
    assert kind_of("gelu") == kind_of("add_") == OTHER


def test_op_times_count_each_call_under_its_kind():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(256, 128, generator=g)
    w = torch.randn(128, 128, generator=g)
    q = torch.randn(1, 2, 16, 8, generator=g)
    norm = torch.nn.LayerNorm(128)
    with torch.no_grad(), OpTimes() as times:
        for _ in range(3):
            a @ w  # mm
        linear(a, w)  # oneDNN's linear where available, else addmm or mm
        norm(a)  # native_layer_norm
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
        torch.cat([a, a])
        torch.relu(a)
    assert times.calls["linear maps"] == 4
    assert times.calls["layer norm"] == 1 and times.calls["attention"] == 1
    assert times.calls["copies"] == 1 and times.calls["optimizer"] == 0
    assert times.calls[OTHER] >= 1  # relu, and the views `linear` takes (views are ops too)
    assert set(times.op_seconds) >= {"mm", "native_layer_norm", "cat", "relu"}
    assert "_linear_pointwise" in times.op_seconds or not ONEDNN_AVAILABLE
    assert all(times.seconds[k] > 0 for k in ("linear maps", "layer norm", "attention", "copies", OTHER))
    assert times.seconds["linear maps"] == pytest.approx(sum(times.op_seconds[k] for k in times.op_seconds
                                                             if kind_of(k) == "linear maps"))


def test_every_op_of_an_optimizer_step_counts_as_optimizer():
    hooks = optimizer_module._global_optimizer_pre_hooks
    n_hooks = len(hooks)
    w = torch.nn.Parameter(torch.randn(64, 64))
    for kwargs in ({"foreach": False}, {"fused": True}):  # the official code's for-loop AdamW on the CPU, and ours
        optimizer = torch.optim.AdamW([w], lr=1e-3, **kwargs)
        (w @ w).sum().backward()
        optimizer.step()  # the first step allocates the optimizer's state
        with OpTimes() as times:
            (w @ w).sum().backward()
            n_other = times.calls[OTHER]
            torch.nn.utils.clip_grad_norm_([w], 0.1, foreach=True)  # _foreach_norm ... before the step: other ops
            assert times.calls["optimizer"] == 0 and times.calls[OTHER] > n_other
            optimizer.step()
            w.grad.mul_(2)  # after the step: an op of its own kind again
        assert times.calls["optimizer"] > 0 and times.seconds["optimizer"] > 0
        assert times.calls["linear maps"] == 3  # w @ w and its two gradients
        assert times.op_seconds["mul_"] > 0 and times.calls[OTHER] > 0
        # fused: the step counter's _foreach_add_ and _fused_adamw_; for-loop: add_, mul_, lerp_, addcmul_, sqrt ...
        assert times.calls["optimizer"] == 2 if "fused" in kwargs else times.calls["optimizer"] >= 8
        assert len(hooks) == n_hooks  # the mode's step hooks are gone after it


def test_breakdown_accounts_for_the_plain_median():
    a = torch.randn(128, 128)
    result = breakdown(lambda: (a @ a).relu_(), repeats=3, warmup=1)
    seconds = result["seconds"]
    assert set(seconds) == {*KINDS, OTHER, OUTSIDE}
    assert sum(seconds.values()) == pytest.approx(result["median"], rel=1e-9)
    assert result["calls"]["linear maps"] == 1 and result["calls"][OTHER] == 1
    assert seconds["layer norm"] == 0 and set(result["top_ops"]) == {"mm", "relu_"}


def test_breakdown_measurement_of_the_detector_and_its_table():
    res = benchmark.measure("breakdown", benchmark.build_ours, benchmark.model_args(**{**TINY, "num_classes": 91}),
                            repeats=2, warmup=1)  # the step draws labels up to 90
    infer, train = res["infer512"], res["train"]
    assert infer["calls"]["optimizer"] == 0 and infer["calls"]["linear maps"] > 0 and infer["calls"]["layer norm"] > 0
    # fused AdamW, per parameter group (backbone, the rest): the step counters' _foreach_add_ and _fused_adamw_
    assert train["calls"]["optimizer"] == 4
    # a training step runs every forward op again plus the backward ones
    assert train["calls"]["linear maps"] > 2 * infer["calls"]["linear maps"]
    assert train["calls"]["layer norm"] == 2 * infer["calls"]["layer norm"]
    table = benchmark.format_breakdowns({"ours": {"breakdown": res}})
    lines = table.splitlines()
    assert "ours 512x512 infer" in lines[0] and "ours train step" in lines[0]
    rows = {line[:24].strip(): [float(v) for v in line[24:].split()] for line in lines[1:10]}
    assert list(rows) == [*KINDS, OTHER, OUTSIDE, "sum of op times", "plain median"]
    assert rows["plain median"][1] == pytest.approx(train["median"] * 1e3, abs=0.06)
    ops = sum(s for k, s in train["seconds"].items() if k != OUTSIDE)
    assert rows["sum of op times"][1] == pytest.approx(ops * 1e3, abs=0.06)
    assert rows["linear maps"][1] == pytest.approx(train["seconds"]["linear maps"] * 1e3, abs=0.06)


def test_breakdown_rounds_pool_to_the_median_per_kind():
    def part(x):
        return {"median": x, "seconds": {"linear maps": x / 2, OUTSIDE: x / 4}, "calls": {"linear maps": 3},
                "top_ops": {}}

    pooled = benchmark._pool_rounds([{"infer512": part(t), "train": part(10 * t)} for t in (1.0, 3.0, 2.0)])
    assert pooled["infer512"]["median"] == 2.0 and pooled["infer512"]["seconds"] == {"linear maps": 1.0, OUTSIDE: 0.5}
    assert pooled["train"]["seconds"]["linear maps"] == 10.0 and pooled["train"]["calls"] == {"linear maps": 3}
