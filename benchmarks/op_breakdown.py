"""Where a forward pass or a training step spends its time: wall-clock seconds per kind of ATen op.

`OpTimes` is a dispatch mode that times each op it sees (the op's call alone, so the mode's own Python overhead
stays outside the op times), sums the seconds by kind (`KINDS`) and by op name, and counts the calls. Every op
inside an optimizer's `step()` counts as "optimizer", whatever its name (a for-loop AdamW runs `mul_`, `lerp_` ...).
Autograd's backward ops run on the calling thread on the CPU, so a training step's backward is seen too.
Composite ops (`linear`, `matmul`, `layer_norm`) reach a dispatch mode as the ops they decompose into.
`breakdown` also times the run without the mode: that median minus the op times estimates the time outside ops
(Python, autograd bookkeeping, dispatch). Only an estimate: ops timed one at a time under the mode run a few percent
slower than in a plain run (on pvt_small at 512 x 512 the difference can exceed the time outside ops, and the
estimate goes below zero).

torch.profiler was not used for this: with shapes recorded, it lengthened oneDNN's fc1 + GELU call of stage 1 from
0.96 to 1.75 ms in the model (pvt_small, 512 x 512, AMD Zen 4), where timing the same calls by hand did not.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable

from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode

# Op kinds, by ATen (or mkldnn) op name; "other ops" is everything else (elementwise ops, reductions, random draws,
# views). Both detector designs multiply by their weights with mm / addmm / oneDNN's linear / convolution (the
# official patch embeddings) and batch only attention's products (bmm / baddbmm), so "linear maps" and "attention"
# compare like with like: attention is SDPA, or the explicit q k^T, softmax and attn v.
KINDS: dict[str, tuple[str, ...]] = {
    "linear maps": ("mm", "addmm", "addmm_", "mv", "dot", "_linear_pointwise", "_mkl_linear", "convolution",
                    "convolution_backward", "_convolution", "mkldnn_convolution"),
    "attention": ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward",
                  "bmm", "baddbmm", "_softmax", "_softmax_backward_data", "_safe_softmax"),
    "layer norm": ("native_layer_norm", "native_layer_norm_backward"),
    "copies": ("copy_", "clone", "_to_copy", "cat", "stack", "constant_pad_nd", "index", "index_select"),
    "optimizer": ("_fused_adamw_", "_fused_adam_"),
}
OTHER, OUTSIDE = "other ops", "median - ops"
_KIND_OF = {op: kind for kind, ops in KINDS.items() for op in ops}


def kind_of(op_name: str) -> str:
    """The kind of an op given its overload-packet name (e.g. "addmm"), outside an optimizer's step.

    `_foreach_*` ops are "other ops" here: gradient clipping runs them too (`_foreach_norm`, `_foreach_mul_`); inside
    an optimizer's `step()`, `OpTimes` counts every op as "optimizer" by the step hooks, not by name.
    """
    return _KIND_OF.get(op_name, OTHER)


class OpTimes(TorchDispatchMode):
    """Sums wall-clock seconds and calls per op kind and per op name over everything that runs inside the mode."""

    def __init__(self):
        super().__init__()
        self.seconds: Counter[str] = Counter()  # by kind
        self.calls: Counter[str] = Counter()  # by kind
        self.op_seconds: Counter[str] = Counter()  # by op name
        self._in_step = False  # inside an optimizer's step()
        self._hooks: list = []

    def _step(self, inside: bool) -> Callable:
        def hook(optimizer, args, kwargs) -> None:
            self._in_step = inside
        return hook

    def __enter__(self):
        self._hooks = [register_optimizer_step_pre_hook(self._step(True)),
                       register_optimizer_step_post_hook(self._step(False))]
        return super().__enter__()

    def __exit__(self, *exc):
        for handle in self._hooks:
            handle.remove()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        elapsed = time.perf_counter() - t0
        name = func._overloadpacket.__name__
        kind = "optimizer" if self._in_step else kind_of(name)
        self.seconds[kind] += elapsed
        self.calls[kind] += 1
        self.op_seconds[name] += elapsed
        return out


def breakdown(fn: Callable[[], object], repeats: int, warmup: int = 1, top: int = 8) -> dict:
    """Times `fn` plainly (median of `repeats` runs), then under `OpTimes` for `repeats` more runs.

    Returns {"median": plain median (s), "seconds": {kind: mean s per run, OUTSIDE: median - op times},
    "calls": {kind: calls per run}, "top_ops": {op name: mean s per run} for the `top` slowest op names}.
    """
    for _ in range(warmup):
        fn()
    plain = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        plain.append(time.perf_counter() - t0)
    with OpTimes() as times:
        for _ in range(repeats):
            fn()
    median = statistics.median(plain)
    seconds = {kind: times.seconds[kind] / repeats for kind in (*KINDS, OTHER)}
    seconds[OUTSIDE] = median - sum(seconds.values())
    return {"median": median, "seconds": seconds,
            "calls": {kind: times.calls[kind] // repeats for kind in (*KINDS, OTHER)},
            "top_ops": {name: s / repeats for name, s in times.op_seconds.most_common(top)}}


def format_breakdown(columns: dict[str, dict]) -> str:
    """A table of `breakdown` results side by side: columns maps a heading to one result; times in ms per run."""
    heads = list(columns)
    width = max(12, *(len(h) + 1 for h in heads))
    lines = [f"{'time by op kind, ms/run':<24}" + "".join(f"{h:>{width}}" for h in heads)]
    for kind in (*KINDS, OTHER, OUTSIDE):
        cells = [columns[h]["seconds"].get(kind) for h in heads]
        lines.append(f"{kind:<24}" + "".join(f"{'-' if s is None else f'{s * 1e3:.1f}':>{width}}" for s in cells))
    op_sums = [sum(s for k, s in columns[h]["seconds"].items() if k != OUTSIDE) for h in heads]
    lines.append(f"{'sum of op times':<24}" + "".join(f"{s * 1e3:>{width}.1f}" for s in op_sums))
    lines.append(f"{'plain median':<24}" + "".join(f"{columns[h]['median'] * 1e3:>{width}.1f}" for h in heads))
    for h in heads:
        slowest = ", ".join(f"{name} {s * 1e3:.1f}" for name, s in list(columns[h]["top_ops"].items())[:5])
        lines.append(f"  slowest ops, {h}: {slowest}")
    lines.append(f"ops timed one by one under a dispatch mode, in runs of their own; '{OUTSIDE}' (the plain median "
                 "minus the op times) estimates Python, autograd and dispatch, and goes negative where timing slowed "
                 "the ops more; over several rounds each row is the median of its own, so rows need not add up")
    return "\n".join(lines)
