"""CPU speed and memory benchmark of PVT + DETR: `python -m benchmarks.benchmark --model pvt_small --threads 2`.

Measurements (each in its own subprocess, so peak RSS = `ru_maxrss` of that measurement alone):
  infer512   inference latency, batch 1, 512 x 512 (eval mode, no_grad)
  infer800   inference latency, batch 1, 800 x 1216
  train      one training step, batch 2, 512 x 512, 8 random boxes per image: forward + loss (6 decoder layers,
             aux losses) + backward + AdamW (the backbone at lr_backbone, as in training/)
  memory     one training step, batch 1, 800 x 1216 (peak RSS is the number of interest; at most 2 timed steps)
  flops      forward FLOPs (torch.utils.flop_counter) at both sizes, backbone share, FLOPs of the training step,
             and this machine's fp32 matmul GFLOP/s (2048 x 2048: torch.mm, i.e. MKL, and oneDNN's linear)
  matcher    HungarianMatcher time, batch 2, 100 queries, 20 targets per image; and the whole criterion
  breakdown  where the 512 x 512 inference and the train step spend their time: ms per run by kind of op
             (linear maps, attention, LayerNorm, copies, optimizer, other ops), see benchmarks/op_breakdown.py
Every process also reports the RSS after importing torch and building the model (the baseline).
Achieved GFLOP/s = forward FLOPs / median latency, shown next to the matmul GFLOP/s measured in the same process:
"% mm" against torch.mm (the issue's reference), "% best" against the faster of torch.mm and oneDNN (on CPUs where
MKL takes its AVX2 path, e.g. AMD Zen 4/5, oneDNN's AVX-512 matmul is ~3x faster).
Workers run with OMP_WAIT_POLICY=PASSIVE unless `--omp_wait_policy inherit`: on a CPU shared with other jobs the
libgomp default (idle threads spin) makes every parallel region wait for the scheduler, milliseconds each.

With two designs, a last block gives, for each speed target, the GFLOP/s it asks of the candidate (its FLOPs in the
reference's median time divided by the target) against the fastest 2048^2 matmul measured on the machine: the FLOPs
are fixed, so a target asking more than that rate cannot be met while the reference runs that fast.
`--show run.json` prints the tables of a run saved with `--json` again, with the current formatting.

`--design ours` is this library. The official PVT v1 + DETR design used for comparison lives outside the
library: `python -m benchmarks.compare --design both` runs the same measurements on both and prints ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count, shape_wrapper

from benchmarks.op_breakdown import breakdown, format_breakdown
from pvt_detr.detr import build_model
from pvt_detr.matmul import ONEDNN_AVAILABLE
from pvt_detr.nested_tensor import nested_tensor_from_tensor_list

MEASUREMENTS = ("infer512", "infer800", "train", "memory", "flops", "matcher", "breakdown")
SIZES = {"512": (512, 512), "800": (800, 1216)}
RESULT_TAG = "@@benchmark-result "


def model_args(backbone: str = "pvt_small", **overrides) -> argparse.Namespace:
    """The flags `pvt_detr.build_model` reads, at `main.get_args_parser()`'s defaults (the paper's recipe)."""
    args = argparse.Namespace(
        backbone=backbone, drop_path=0.1, backbone_stages=[4], hidden_dim=256, nheads=8, enc_layers=6, dec_layers=6,
        dim_feedforward=2048, dropout=0.1, num_queries=100, num_classes=None, pre_norm=False, aux_loss=True,
        set_cost_class=1.0, set_cost_bbox=5.0, set_cost_giou=2.0, bbox_loss_coef=5.0, giou_loss_coef=2.0,
        eos_coef=0.1, lr=1e-4, lr_backbone=1e-5, weight_decay=1e-4)
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def build_ours(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(model, criterion) of this library."""
    model, criterion, _ = build_model(args)
    return model, criterion


build_ours.adamw_kwargs = {"fused": True}  # the optimizer training/optim.py builds (the official code: the default)
DESIGNS: dict[str, Callable] = {"ours": build_ours}


# ---------------------------------------------------------------------------------------------- measurements


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _timed(fn: Callable[[], object], repeats: int, warmup: int) -> dict:
    """Wall-clock median/min/max (s) over `repeats` runs after `warmup`; also the median CPU seconds of a run."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"median": statistics.median(wall), "min": min(wall), "max": max(wall), "runs": wall,
            "cpu_median": statistics.median(cpu)}


def matmul_gflops(n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """Median fp32 GFLOP/s of an n x n @ n x n matmul at the current thread count, per library PyTorch ships:
    "matmul_gflops" (`torch.mm`: MKL on x86) and "matmul_gflops_onednn" (the linear of `pvt_detr.matmul`)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    rates = {"matmul_gflops": 2 * n**3 / _timed(lambda: a @ b, repeats, warmup=2)["median"] / 1e9}
    if ONEDNN_AVAILABLE:
        bt = b.t().contiguous()
        onednn = _timed(lambda: torch.ops.mkldnn._linear_pointwise(a, bt, None, "none", [], ""), repeats, warmup=2)
        rates["matmul_gflops_onednn"] = 2 * n**3 / onednn["median"] / 1e9
    return rates


def _median_rates(samples: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in samples) for key in samples[0]}


def _images(batch: int, hw: tuple[int, int]):
    """A padded batch as the data loader gives it: NestedTensor (B, 3, H, W) + all-False mask (B, H, W)."""
    g = torch.Generator().manual_seed(0)
    return nested_tensor_from_tensor_list([torch.randn(3, *hw, generator=g) for _ in range(batch)])


def _targets(batch: int, per_image: int, num_classes: int = 91) -> list[dict]:
    """Random DETR targets: labels (T,), boxes (T, 4) cxcywh normalised."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(batch):
        centre = torch.rand(per_image, 2, generator=g) * 0.6 + 0.2
        size = torch.rand(per_image, 2, generator=g) * 0.3 + 0.05
        out.append({"labels": torch.randint(1, num_classes, (per_image,), generator=g),
                    "boxes": torch.cat([centre, size], dim=1)})
    return out


def _train_step_fn(model, criterion, batch: int, hw: tuple[int, int], args,
                   adamw_kwargs: dict | None = None) -> Callable[[], float]:
    """forward + weighted loss + backward + AdamW step (backbone at lr_backbone, as in main.py)."""
    model.train()
    backbone = [p for n, p in model.named_parameters() if n.startswith("backbone.") and p.requires_grad]
    rest = [p for n, p in model.named_parameters() if not n.startswith("backbone.") and p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": rest}, {"params": backbone, "lr": args.lr_backbone}], lr=args.lr,
                                  weight_decay=args.weight_decay, **(adamw_kwargs or {}))
    samples, targets = _images(batch, hw), _targets(batch, 8)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        losses = criterion(model(samples), targets)
        loss = sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


_LINEAR_POINTWISE = torch.ops.mkldnn._linear_pointwise if ONEDNN_AVAILABLE else None


class _FlopCount(TorchDispatchMode):
    """Sums `torch.utils.flop_counter`'s per-op formulas (matmuls, convolutions, attention) over what runs inside.

    Like `FlopCounterMode` without its module tracking (whose autograd hooks trip over some parameter views);
    the CPU flash-attention kernels and oneDNN's linear, which `flop_registry` lacks, are counted like the CUDA
    attention kernels and `addmm` (2 M K N).
    """

    def __init__(self):
        super().__init__()
        aten = torch.ops.aten
        self.formulas = dict(flop_registry)
        self.formulas[aten._scaled_dot_product_flash_attention_for_cpu] = shape_wrapper(
            lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v))
        self.formulas[aten._scaled_dot_product_flash_attention_for_cpu_backward] = shape_wrapper(
            lambda g, q, k, v, *a, out_shape=None, **kw: sdpa_backward_flop_count(g, q, k, v))
        self.formulas[aten.addmm_] = self.formulas[aten.addmm]  # in-place residual sums of inference blocks
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._overloadpacket is _LINEAR_POINTWISE:  # oneDNN linear (pvt_detr.matmul): X (.., K), W (N, K)
            x, w = args[0], args[2 if func is _LINEAR_POINTWISE.binary else 1]
            self.total += 2 * x.numel() * w.shape[0]
            return out
        formula = self.formulas.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **(kwargs or {}), out_val=out)
        return out


def _count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of fn() (forward, or forward + backward if fn runs one)."""
    with _FlopCount() as counter:
        fn()
    return counter.total


def measure(name: str, build: Callable, args: argparse.Namespace, repeats: int, warmup: int) -> dict:
    """Runs one measurement in this process and returns its numbers (seconds, MB, FLOPs)."""
    torch.manual_seed(0)
    rss_import = _peak_rss_mb()
    model, criterion = build(args)
    result: dict = {"rss_import_mb": rss_import, "rss_built_mb": _peak_rss_mb()}
    if name in ("infer512", "infer800"):
        model.eval()
        samples = _images(1, SIZES[name[5:]])
        before = matmul_gflops()
        with torch.no_grad():
            result.update(_timed(lambda: model(samples), repeats, warmup))
        result.update(_median_rates([before, matmul_gflops()]))
    elif name in ("train", "memory"):
        batch, hw = (2, SIZES["512"]) if name == "train" else (1, SIZES["800"])
        step = _train_step_fn(model, criterion, batch, hw, args, getattr(build, "adamw_kwargs", None))
        n = repeats if name == "train" else min(repeats, 2)
        result.update(_timed(step, n, max(warmup, 1)))  # the first step allocates AdamW's state
    elif name == "flops":
        model.eval()
        with torch.no_grad():
            for key, hw in SIZES.items():
                samples = _images(1, hw)
                result[f"flops_{key}"] = _count_flops(lambda s=samples: model(s))
                result[f"backbone_flops_{key}"] = _count_flops(lambda s=samples: model.backbone(s.tensors))
        step = _train_step_fn(model, criterion, 2, SIZES["512"], args, getattr(build, "adamw_kwargs", None))
        result["flops_train"] = _count_flops(step)
        result.update(matmul_gflops(repeats=max(repeats, 5)))
    elif name == "matcher":
        g = torch.Generator().manual_seed(2)
        K1 = criterion.empty_weight.numel()

        def outputs() -> dict:
            return {"pred_logits": torch.randn(2, 100, K1, generator=g).requires_grad_(),
                    "pred_boxes": (torch.rand(2, 100, 4, generator=g) * 0.5 + 0.25).requires_grad_()}

        out = outputs()
        out["aux_outputs"] = [outputs() for _ in range(args.dec_layers - 1)]
        targets = _targets(2, 20, num_classes=K1 - 1)
        inner = 20  # calls per timed run: one call takes about a millisecond

        def match_many() -> None:
            for _ in range(inner):
                criterion.matcher(out, targets)

        def criterion_step() -> None:
            losses = criterion(out, targets)
            sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses).backward()

        stats = _timed(match_many, repeats, warmup)
        result.update({k: [t / inner for t in v] if k == "runs" else v / inner for k, v in stats.items()})
        result["criterion"] = _timed(criterion_step, repeats, warmup)
    elif name == "breakdown":
        model.eval()
        samples = _images(1, SIZES["512"])
        with torch.no_grad():
            result["infer512"] = breakdown(lambda: model(samples), repeats, warmup)
        step = _train_step_fn(model, criterion, 2, SIZES["512"], args, getattr(build, "adamw_kwargs", None))
        result["train"] = breakdown(step, repeats, max(warmup, 1))  # the first step allocates AdamW's state
    else:
        raise ValueError(f"unknown measurement {name!r}")
    result["peak_rss_mb"] = _peak_rss_mb()
    return result


# ---------------------------------------------------------------------------------------------- driver


def _run_worker(module: str, name: str, design: str, opts: argparse.Namespace) -> dict:
    """Runs `measure(name)` for one design in a fresh `python -m module` process and returns its numbers."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS=str(opts.threads), MKL_NUM_THREADS=str(opts.threads),
               PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    if opts.omp_wait_policy != "inherit":
        env["OMP_WAIT_POLICY"] = opts.omp_wait_policy.upper()
    cmd = [sys.executable, "-m", module, "--worker", name, "--design", design, "--model", opts.model,
           "--threads", str(opts.threads), "--repeats", str(opts.repeats), "--warmup", str(opts.warmup)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit code {proc.returncode}: {tail}"}


def _pool_rounds(rounds: list[dict]) -> dict:
    """One measurement's worker results over several rounds: timings pooled, peak RSS the largest, rounds kept."""
    if len(rounds) == 1 or any("error" in r for r in rounds):
        return rounds[0] if len(rounds) == 1 else next(r for r in rounds if "error" in r)
    pooled = dict(rounds[0], rounds=rounds)
    for key in ("peak_rss_mb", "rss_import_mb", "rss_built_mb"):
        if key in rounds[0]:
            pooled[key] = max(r[key] for r in rounds)
    for key in ("matmul_gflops", "matmul_gflops_onednn", "cpu_median"):
        if key in rounds[0]:
            pooled[key] = statistics.median(r[key] for r in rounds)
    if "runs" in rounds[0]:
        runs = [t for r in rounds for t in r["runs"]]
        pooled.update(runs=runs, median=statistics.median(runs), min=min(runs), max=max(runs))
    if "criterion" in rounds[0]:
        pooled["criterion"] = _pool_rounds([r["criterion"] for r in rounds])
    for key in _BREAKDOWN_KEYS:
        if key in rounds[0] and "seconds" in rounds[0][key]:  # a breakdown: the median per kind over the rounds
            parts = [r[key] for r in rounds]
            pooled[key] = dict(parts[0], median=statistics.median(p["median"] for p in parts),
                               seconds={k: statistics.median(p["seconds"][k] for p in parts)
                                        for k in parts[0]["seconds"]})
    return pooled


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:.2f} ms" if s < 0.1 else f"{s:.3f} s"


LABELS = {"infer512": "infer 512x512 bs1", "infer800": "infer 800x1216 bs1", "train": "train step 512x512 bs2",
          "memory": "train step 800x1216 bs1", "matcher": "matcher bs2 Q100 T20/img",
          "criterion": "criterion 6 layers fwd+bwd", "flops": "flop count (untimed)",
          "breakdown": "time by op kind"}
_BREAKDOWN_KEYS = {"infer512": "512x512 infer", "train": "train step"}  # breakdown parts -> column heading
# The `flops` measurement's key holding the FLOPs of each timed measurement.
_FLOP_KEYS = {"infer512": "flops_512", "infer800": "flops_800", "train": "flops_train"}


def format_table(design: str, res: dict) -> str:
    """One design's numbers as a compact text table."""
    head = (f"{'measurement':<27} {'median':>10} {'min':>10} {'max':>10} {'cpu':>10} {'peak RSS':>9} {'FLOPs':>8} "
            f"{'GFLOP/s':>8} {'matmul':>8} {'% mm':>5} {'oneDNN':>7} {'% best':>6}")
    lines = [f"== {design} ==", head, "-" * len(head)]
    flops = res.get("flops", {})
    for name in (*MEASUREMENTS, "criterion"):
        r = res.get("matcher", {}).get("criterion") if name == "criterion" else res.get(name)
        if r is None or (name == "breakdown" and "error" not in r):  # the breakdown has its own table
            continue
        if "error" in r:
            lines.append(f"{LABELS[name]:<27} FAILED: {r['error']}")
            continue
        n_flops = flops.get(_FLOP_KEYS.get(name, ""))
        rate = n_flops / r["median"] / 1e9 if n_flops and "median" in r else None
        mm = r.get("matmul_gflops") or (flops.get("matmul_gflops") if rate else None)
        onednn = r.get("matmul_gflops_onednn") or (flops.get("matmul_gflops_onednn") if rate else None)
        best = max(mm or 0, onednn or 0)
        rss = f"{r['peak_rss_mb'] / 1024:.2f} GB" if "peak_rss_mb" in r else "-"
        lines.append(
            f"{LABELS[name]:<27} {_fmt_time(r.get('median')):>10} {_fmt_time(r.get('min')):>10} "
            f"{_fmt_time(r.get('max')):>10} {_fmt_time(r.get('cpu_median')):>10} {rss:>9} "
            f"{f'{n_flops / 1e9:.1f} G' if n_flops else '-':>8} "
            f"{f'{rate:.1f}' if rate else '-':>8} {f'{mm:.1f}' if mm and rate else '-':>8} "
            f"{f'{100 * rate / mm:.0f}%' if rate and mm else '-':>5} {f'{onednn:.1f}' if onednn and rate else '-':>7} "
            f"{f'{100 * rate / best:.0f}%' if rate and best else '-':>6}")
    lines.append("times: wall clock over the timed runs; cpu: median CPU seconds of a run (all threads); "
                 "matmul / oneDNN: GFLOP/s of a 2048^2 fp32 torch.mm (MKL) / oneDNN linear in the same process; "
                 "% best: of the faster")
    if flops and "error" not in flops:
        lines.append(f"forward FLOPs: 512x512 {flops['flops_512'] / 1e9:.1f} G (backbone "
                     f"{100 * flops['backbone_flops_512'] / flops['flops_512']:.0f}%), 800x1216 "
                     f"{flops['flops_800'] / 1e9:.1f} G (backbone "
                     f"{100 * flops['backbone_flops_800'] / flops['flops_800']:.0f}%); "
                     f"matmul 2048^2 fp32: torch.mm {flops['matmul_gflops']:.1f} GFLOP/s, oneDNN "
                     f"{flops.get('matmul_gflops_onednn', float('nan')):.1f}")
    built = [r["rss_built_mb"] for r in res.values() if "rss_built_mb" in r]
    if built:
        lines.append(f"baseline RSS (import torch + build model): {statistics.median(built) / 1024:.2f} GB")
    return "\n".join(lines)


def _pct_of_matmul(res: dict, name: str, best: bool = False) -> float | None:
    """Forward GFLOP/s of an inference measurement as a fraction of the same process's torch.mm GFLOP/s (best: of
    the faster of torch.mm and oneDNN)."""
    r, flops = res.get(name, {}), res.get("flops", {})
    n_flops = flops.get(_FLOP_KEYS[name])
    if "median" not in r or not n_flops:
        return None
    mm = max(r["matmul_gflops"], r.get("matmul_gflops_onednn", 0)) if best else r["matmul_gflops"]
    return n_flops / r["median"] / 1e9 / mm


def format_comparison(results: dict, reference: str, candidate: str, targets: dict | None = None) -> str:
    """Speed-ups (reference time / candidate time), RSS ratios (candidate / reference), % of matmul, vs targets."""
    ref, cand = results[reference], results[candidate]
    lines = [f"== {candidate} vs {reference} ==",
             f"{'measurement':<27} {reference:>10} {candidate:>10} {'ratio':>8} {'target':>8} {'met':>4}"]
    targets = targets or {}
    gb = lambda mb: f"{mb / 1024:.2f} GB"  # noqa: E731
    pct = lambda f: f"{100 * f:.0f}%"  # noqa: E731

    def row(label, a, b, value, key, fmt, higher_is_better=True, value_fmt="{:.2f}x"):
        goal = targets.get(key)
        met = "-" if goal is None else ("yes" if (value >= goal if higher_is_better else value <= goal) else "NO")
        goal_txt = "-" if goal is None else (">=" if higher_is_better else "<=") + value_fmt.format(goal)
        lines.append(f"{label:<27} {fmt(a):>10} {fmt(b):>10} {value_fmt.format(value):>8} {goal_txt:>8} {met:>4}")

    for name in ("infer512", "infer800", "train", "memory", "matcher"):
        a, b = ref.get(name, {}), cand.get(name, {})
        if "median" in a and "median" in b:
            row(f"{LABELS[name]} speed-up", a["median"], b["median"], a["median"] / b["median"], name, _fmt_time)
    a, b = ref.get("memory", {}), cand.get("memory", {})
    if "peak_rss_mb" in a and "peak_rss_mb" in b:
        row("peak RSS 800x1216 train", a["peak_rss_mb"], b["peak_rss_mb"], b["peak_rss_mb"] / a["peak_rss_mb"],
            "memory_rss", gb, higher_is_better=False)
        base_a, base_b = a["rss_built_mb"], b["rss_built_mb"]
        row("  above baseline", a["peak_rss_mb"] - base_a, b["peak_rss_mb"] - base_b,
            (b["peak_rss_mb"] - base_b) / (a["peak_rss_mb"] - base_a), "", gb, higher_is_better=False)
    for name in ("infer512", "infer800"):
        a, b = _pct_of_matmul(ref, name), _pct_of_matmul(cand, name)
        if a is not None and b is not None:
            row(f"{LABELS[name]} % of mm", a, b, b, "pct_matmul", pct, value_fmt="{:.0%}")
            a, b = _pct_of_matmul(ref, name, best=True), _pct_of_matmul(cand, name, best=True)
            row(f"{LABELS[name]} % of best", a, b, b, "", pct, value_fmt="{:.0%}")
    lines += format_ceilings(results, reference, candidate, targets)
    return "\n".join(lines)


def _best_matmul_gflops(res: dict) -> float | None:
    """The faster of torch.mm and oneDNN on a 2048^2 fp32 product: median over a design's measuring processes."""
    rates = [max(r["matmul_gflops"], r.get("matmul_gflops_onednn", 0.0))
             for r in res.values() if isinstance(r, dict) and r.get("matmul_gflops")]
    return statistics.median(rates) if rates else None


def format_ceilings(results: dict, reference: str, candidate: str, targets: dict | None = None) -> list[str]:
    """For each speed target, the GFLOP/s it asks of the candidate next to the machine's best matmul rate.

    A speed-up target t over the reference's median time T_ref asks the candidate to run its own FLOPs in
    T_ref / t; where that rate is above the fastest 2048^2 matmul measured on the machine, the target is out of reach
    on this machine while the reference runs as fast as it did (the FLOPs of the model are fixed).
    """
    ref, cand = results[reference], results[candidate]
    best = _best_matmul_gflops(cand) or _best_matmul_gflops(ref)
    flops_ref, flops_cand = ref.get("flops", {}), cand.get("flops", {})
    cell = lambda rate: f"{rate:.0f} ({100 * rate / best:.0f}%)"  # noqa: E731
    rows = []
    for name, key in _FLOP_KEYS.items():
        goal = (targets or {}).get(name)
        a, b = ref.get(name, {}), cand.get(name, {})
        if not goal or not best or "median" not in a or "median" not in b or not flops_cand.get(key):
            continue
        f_ref, f_cand = flops_ref.get(key) or flops_cand[key], flops_cand[key]
        rate_ref, rate_cand = f_ref / a["median"] / 1e9, f_cand / b["median"] / 1e9
        need = f_cand * goal / a["median"] / 1e9
        rows.append(f"{LABELS[name]:<27} {cell(rate_ref):>12} {cell(rate_cand):>12} {goal:>7.2f}x {cell(need):>12}"
                    f" {'yes' if need <= best else 'NO':>9}")
    if not rows:
        return []
    return [f"GFLOP/s each speed target asks of {candidate} (its FLOPs in {reference}'s median time / target), and in "
            f"brackets as % of the fastest 2048^2 fp32 matmul measured here ({best:.0f} GFLOP/s):",
            f"{'measurement':<27} {reference:>12} {candidate:>12} {'target':>8} {'needs':>12} {'<= matmul':>9}",
            *rows]


def machine_info(opts: argparse.Namespace) -> dict:
    policy = os.environ.get("OMP_WAIT_POLICY", "default") if opts.omp_wait_policy == "inherit" else opts.omp_wait_policy
    return {"torch": torch.__version__, "python": platform.python_version(), "cpu": platform.processor() or
            platform.machine(), "cpus": os.cpu_count(), "threads": opts.threads, "omp_wait_policy": policy,
            "load_average": os.getloadavg(), "dtype": "float32"}


def get_parser(designs: dict) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="pvt_small", help="backbone name (pvt_tiny ... pvt_large, pvt_nano)")
    p.add_argument("--threads", type=int, default=2, help="torch / OpenMP / MKL threads")
    p.add_argument("--repeats", type=int, default=6, help="timed runs per measurement (memory: at most 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    p.add_argument("--rounds", type=int, default=1,
                   help="processes per measurement and design, alternating designs; timings are pooled")
    p.add_argument("--only", default="all", help=f"comma-separated subset of {','.join(MEASUREMENTS)}, or all")
    p.add_argument("--design", default="ours", choices=["ours", "official", "both"],
                   help="implementation(s) to measure; official and both need `python -m benchmarks.compare`")
    p.add_argument("--omp_wait_policy", default="passive", choices=["passive", "active", "inherit"],
                   help="OMP_WAIT_POLICY of the measuring processes. passive (default): idle OpenMP threads sleep;\n"
                        "on a CPU shared with other jobs, spinning threads (the libgomp default) turn every\n"
                        "parallel region into a wait for the scheduler. inherit: keep this environment's")
    p.add_argument("--json", default=None, help="also write all numbers to this JSON file")
    p.add_argument("--show", default=None, metavar="JSON",
                   help="print the tables of a run saved with --json (measures nothing)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def format_breakdowns(results: dict) -> str | None:
    """The breakdown measurement of every design in one table (columns: design x part), or None without one."""
    columns = {f"{design} {heading}": res["breakdown"][key]
               for key, heading in _BREAKDOWN_KEYS.items() for design, res in results.items()
               if key in res.get("breakdown", {})}
    return format_breakdown(columns) if columns else None


def _print_report(results: dict, targets: dict | None) -> None:
    names = list(results)
    # measurements of the per-design tables (a failed breakdown is reported there too)
    tabled = any(name != "breakdown" or "error" in r for res in results.values() for name, r in res.items())
    for design in names if tabled else ():
        print(format_table(design, results[design]))
    table = format_breakdowns(results)
    if table:
        print(table)
    if len(names) == 2 and tabled:  # the first design is the candidate, the second the reference (as `both` runs)
        print(format_comparison(results, names[1], names[0], targets))


def show_report(path: str) -> dict:
    """Prints the tables of a report written by `--json`; returns the report."""
    try:
        with open(path) as f:
            report = json.load(f)
        results = report["results"]
    except OSError as e:
        raise SystemExit(f"{path}: cannot read the report ({e.strerror})") from None
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"{path}: not a benchmark report written by --json ({type(e).__name__}: {e})") from None
    machine = report.get("machine", {})
    print(f"{report.get('model', '?')}, {machine.get('threads', '?')} threads, {report.get('rounds', '?')} x "
          f"{report.get('repeats', '?')} repeats, torch {machine.get('torch', '?')}, OMP_WAIT_POLICY "
          f"{machine.get('omp_wait_policy', '?')} (saved in {path})")
    _print_report(results, report.get("targets"))
    return report


def main(argv: list[str] | None = None, designs: dict | None = None, module: str = "benchmarks.benchmark",
         targets: dict | None = None) -> dict:
    """CLI entry point; `designs` maps names to builders, `module` is what workers run as `python -m module`."""
    designs = designs or DESIGNS
    opts = get_parser(designs).parse_args(argv)
    torch.set_num_threads(opts.threads)
    if opts.worker:
        result = measure(opts.worker, designs[opts.design], model_args(opts.model), opts.repeats, opts.warmup)
        print(RESULT_TAG + json.dumps(result), flush=True)
        return result
    if opts.show:
        return show_report(opts.show)
    names = list(MEASUREMENTS) if opts.only == "all" else [n.strip() for n in opts.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in MEASUREMENTS]
    if unknown:
        raise SystemExit(f"unknown measurement(s) {unknown}; choose from {', '.join(MEASUREMENTS)}")
    chosen = list(designs) if opts.design == "both" else [opts.design]
    if any(d not in designs for d in chosen) or len(chosen) < (2 if opts.design == "both" else 1):
        raise SystemExit(f"--design {opts.design}: the official design lives outside the library; run "
                         "`python -m benchmarks.compare` from the repository root")
    results: dict = {d: {} for d in chosen}
    info = machine_info(opts)
    print(f"{opts.model}, {opts.threads} threads, fp32, {opts.rounds} x {opts.repeats} repeats after {opts.warmup} "
          f"warm-up, torch {torch.__version__}, {os.cpu_count()} CPUs, OMP_WAIT_POLICY {info['omp_wait_policy']}, "
          f"load average {info['load_average'][0]:.1f}", flush=True)
    for name in names:  # designs alternate per measurement and round, so a noisy neighbour hits both alike
        rounds: dict = {d: [] for d in chosen}
        for r in range(opts.rounds):
            for design in (chosen if r % 2 == 0 else chosen[::-1]):
                t0 = time.perf_counter()
                rounds[design].append(_run_worker(module, name, design, opts))
                print(f"  {name} / {design} / round {r + 1}: done in {time.perf_counter() - t0:.0f} s",
                      file=sys.stderr, flush=True)
        for design in chosen:
            results[design][name] = _pool_rounds(rounds[design])
    _print_report(results, targets)
    report = {"model": opts.model, "machine": info, "repeats": opts.repeats, "warmup": opts.warmup,
              "rounds": opts.rounds, "results": results, "targets": targets or {}}
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(report, f, indent=1)
    if any("error" in r for res in results.values() for r in res.values()):
        sys.exit(1)
    return report


if __name__ == "__main__":
    main()
