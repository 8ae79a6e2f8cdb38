"""Where a forward pass spends its time: self CPU time per kind of op, from `torch.profiler`.

Every profiled event's self time (its time minus that of the events it calls) goes to one kind by its name
(`KINDS`); the self times of all events add up to the time spent in ops. The plain median of the same forward,
timed without the profiler, minus that sum estimates the time outside ops (Python, dispatch). The profiler adds a
little time per op, so the estimate can go below zero for a forward of many small ops.
A compiled model shows its generated code as one event per graph ("compiled kernels": fused elementwise ops,
normalisations, its own matmul kernels) and the library calls it makes (e.g. `aten::addmm`) as events of their own.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable

from torch.profiler import ProfilerActivity, profile

# Kinds of op by profiler event name; "other ops" is everything else (elementwise ops, reductions, views). The
# official design multiplies by its weights with addmm / mm / convolutions and computes attention with bmm + softmax;
# ours with linear (addmm / mm) and SDPA.
KINDS: dict[str, tuple[str, ...]] = {
    "linear maps": ("aten::addmm", "aten::mm", "aten::linear", "aten::matmul", "aten::convolution",
                    "aten::_convolution", "aten::mkldnn_convolution", "aten::conv2d", "mkldnn::_linear_pointwise",
                    "mkl::_mkl_linear", "aten::_mkl_linear"),
    "attention": ("aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
                  "aten::bmm", "aten::baddbmm", "aten::softmax", "aten::_softmax", "aten::_safe_softmax"),
    "layer norm": ("aten::layer_norm", "aten::native_layer_norm"),
    "compiled kernels": ("compiled graph",),
    "copies": ("aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy", "aten::to", "aten::cat",
               "aten::stack", "aten::constant_pad_nd", "aten::index", "aten::index_select"),
}
OTHER, OUTSIDE = "other ops", "outside ops"
_KIND_OF = {name: kind for kind, names in KINDS.items() for name in names}
COMPILED_GRAPH = "## Call CompiledFxGraph"  # the profiler's name for a compiled graph's generated code (+ its hash)


def short_name(event_name: str) -> str:
    """The event name, "compiled graph" for a compiled graph's (whose name holds a hash)."""
    return "compiled graph" if event_name.startswith(COMPILED_GRAPH) else event_name


def kind_of(event_name: str) -> str:
    """The kind of a profiler event, e.g. "aten::addmm" -> "linear maps"."""
    return _KIND_OF.get(short_name(event_name), OTHER)


def breakdown(fn: Callable[[], object], repeats: int, warmup: int = 1, top: int = 6) -> dict:
    """Times fn plainly (median of `repeats` runs), then profiles `repeats` more runs.

    Returns {"median_s": plain median, "seconds": {kind: self seconds per run, OUTSIDE: median - their sum},
    "top_ops": {event name: self seconds per run} of the `top` slowest event names}.
    """
    for _ in range(warmup):
        fn()
    plain = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        plain.append(time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            fn()
    by_name: Counter[str] = Counter()
    for event in prof.key_averages():
        by_name[short_name(event.key)] += event.self_cpu_time_total / 1e6 / repeats  # us over all runs -> s per run
    seconds = {kind: 0.0 for kind in (*KINDS, OTHER)}
    for name, s in by_name.items():
        seconds[kind_of(name)] += s
    median = statistics.median(plain)
    seconds[OUTSIDE] = median - sum(seconds.values())
    return {"median_s": median, "seconds": seconds, "top_ops": dict(by_name.most_common(top))}


def format_breakdown(columns: dict[str, dict]) -> str:
    """`breakdown` results side by side (columns: heading -> result), in ms per run."""
    heads = list(columns)
    width = max(12, *(len(h) + 2 for h in heads))
    lines = [f"{'ms per forward':<16}" + "".join(f"{h:>{width}}" for h in heads)]
    for kind in (*KINDS, OTHER, OUTSIDE):
        cells = [columns[h]["seconds"].get(kind, 0.0) * 1e3 for h in heads]
        lines.append(f"{kind:<16}" + "".join(f"{c:>{width}.1f}" for c in cells))
    lines.append(f"{'plain median':<16}" + "".join(f"{columns[h]['median_s'] * 1e3:>{width}.1f}" for h in heads))
    for h in heads:
        slowest = ", ".join(f"{name} {s * 1e3:.1f}" for name, s in columns[h]["top_ops"].items())
        lines.append(f"  slowest, {h}: {slowest}")
    return "\n".join(lines)
