"""What one benchmark process measures: the designs, their inputs, the timed runs, FLOP counts and peak RSS.

`run_spec(spec)` runs one measurement, described by a dict, in the calling process and returns its numbers
(seconds, bytes, FLOPs). `benchmarks/benchmark.py` calls it in a fresh subprocess per measurement, so that
`ru_maxrss` is the peak RSS of that measurement alone and no measurement warms caches for another.

Kinds of measurement (`spec["kind"]`):
  infer   one design's forward, batch 1, eval mode, no_grad, at one size (spec "design", "size"); design "linears"
          replays ours' matrix products alone (`F.linear` on the shapes of its forward): what a compiler calling
          the same BLAS can reach at most
  train   one training step, batch 2 padded together: forward + loss (aux losses) + backward + gradient clipping
          + AdamW as `training/optim.py` builds it (spec "design", "sizes")
  matmul  `torch.mm` of two 2048 x 2048 float32 matrices: the machine's reference rate
  export  `pvt_detr.export.export_onnx` with each exporter, and a short onnxruntime probe of each file
  breakdown  time of the forward by kind of op under `torch.profiler` (benchmarks/op_breakdown.py)
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.official_design import build_official
from pvt_detr import ModelConfig, build_model
from pvt_detr.nested_tensor import NestedTensor, nested_tensor_from_tensor_list

INFER_DESIGNS = ("eager", "compiled", "onnx", "official", "hf", "linears")
TRAIN_DESIGNS = ("ours", "ours_no_checkpointing", "official")
HF_NUM_LABELS = 91  # COCO's max category id + 1, as `pvt_detr.detr.COCO_NUM_CLASSES`
MATMUL_N = 2048


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def timed(fn: Callable[[], object], repeats: int, warmup: int) -> list[float]:
    """Wall-clock seconds of `repeats` calls of fn after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def count_flops(fn: Callable[[], object], model: torch.nn.Module) -> int:
    """FLOPs of fn(), a no_grad forward of `model`, by `torch.utils.flop_counter.FlopCounterMode` (2 per multiply-add
    of matmuls and convolutions).

    Attention runs on SDPA's math backend while counting, so that its two products reach the counter as matmuls
    (the counter has no formula for the CPU's fused SDPA kernels); the products are the same. The parameters stop
    requiring gradients meanwhile: the counter's module tracker cannot hook a parameter passed to a submodule
    (DETR's query embedding) under no_grad.
    """
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    counter = FlopCounterMode(display=False)
    try:
        with counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
            fn()
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    return counter.get_total_flops()


def image_batch(sizes: list[tuple[int, int]], seed: int = 0) -> NestedTensor:
    """Random normalised images of the given (h, w) padded together: (B, 3, H, W) + mask (B, H, W), True on padding."""
    g = torch.Generator().manual_seed(seed)
    return nested_tensor_from_tensor_list([torch.randn(3, h, w, generator=g) for h, w in sizes])


def random_targets(batch: int, per_image: int, num_classes: int, seed: int = 1) -> list[dict]:
    """DETR targets: labels (T,) int64 in [1, num_classes), boxes (T, 4) cxcywh normalised to [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    targets = []
    for _ in range(batch):
        centre = torch.rand(per_image, 2, generator=g) * 0.6 + 0.2  # (T, 2)
        size = torch.rand(per_image, 2, generator=g) * 0.3 + 0.05  # (T, 2)
        targets.append({"labels": torch.randint(1, num_classes, (per_image,), generator=g),
                        "boxes": torch.cat([centre, size], dim=1)})
    return targets


def model_config(spec: dict, **overrides) -> ModelConfig:
    """`ModelConfig`'s defaults with the benchmarked backbone (and the overrides)."""
    return ModelConfig(backbone=spec["model"], **overrides)


def build_hf_detr() -> torch.nn.Module:
    """HF transformers' DETR with a ResNet-50 backbone (DETR-R50), randomly initialised: nothing is downloaded."""
    from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig

    backbone = ResNetConfig(out_features=["stage4"])  # ResNet-50: bottleneck blocks, depths 3/4/6/3
    config = DetrConfig(backbone_config=backbone, num_labels=HF_NUM_LABELS)
    return DetrForObjectDetection(config)


def onnx_session(path: str, threads: int, spin: bool):
    """An onnxruntime CPU session with `threads` intra-op threads (and one inter-op thread)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def linear_calls(model: torch.nn.Module, samples: NestedTensor) -> list[tuple[int, int, int, bool]]:
    """(M, K, N, bias) of every matrix product (`aten::addmm` / `aten::mm`: ours' linear maps) in one no_grad
    forward, in order, read from `torch.profiler` with shapes recorded."""
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        model(samples)
    calls = []
    for event in prof.events():
        shapes = event.input_shapes
        if event.name == "aten::addmm":  # bias (N,), x (M, K), weight^T (K, N)
            calls.append((shapes[1][0], shapes[1][1], shapes[2][1], True))
        elif event.name == "aten::mm":  # x (M, K), weight^T (K, N)
            calls.append((shapes[0][0], shapes[0][1], shapes[1][1], False))
    return calls


def linear_replay(calls: list[tuple[int, int, int, bool]]) -> tuple[Callable[[], None], int]:
    """(a function running `F.linear` on random tensors of every call's shapes in order, its FLOPs)."""
    g = torch.Generator().manual_seed(0)
    args = [(torch.randn(m, k, generator=g), torch.randn(n, k, generator=g),  # x (M, K), weight (N, K)
             torch.randn(n, generator=g) if bias else None) for m, k, n, bias in calls]

    def replay() -> None:
        for x, w, b in args:
            F.linear(x, w, b)

    return replay, sum(2 * m * k * n for m, k, n, _ in calls)


def inference_forward(spec: dict, samples: NestedTensor, result: dict) -> tuple[Callable[[], object], Callable,
                                                                                  torch.nn.Module]:
    """(forward to time, forward of the eager PyTorch model whose FLOPs it computes, that model) for
    spec["design"].

    `ours compiled` compiles on its first call: that call's time goes to result["compile_s"].
    """
    design = spec["design"]
    if design == "hf":
        model = build_hf_detr().eval()
        pixel_mask = (~samples.mask).long()  # (1, H, W) 1 on pixels
        forward = lambda: model(pixel_values=samples.tensors, pixel_mask=pixel_mask)  # noqa: E731
        return forward, forward, model
    if design == "official":
        model = build_official(model_config(spec))[0].eval()
        forward = lambda: model(samples)  # noqa: E731
        return forward, forward, model
    model = build_model(model_config(spec))[0].eval()
    eager = lambda: model(samples)  # noqa: E731
    if design == "eager":
        return eager, eager, model
    if design == "compiled":
        compiled = torch.compile(model, options={"freezing": True})  # what Detector(..., compile=True) runs
        t0 = time.perf_counter()
        with torch.no_grad():
            compiled(samples)
        result["compile_s"] = time.perf_counter() - t0
        return lambda: compiled(samples), eager, model
    if design == "linears":
        calls = linear_calls(model, samples)
        replay, result["flops"] = linear_replay(calls)
        result["calls"] = len(calls)
        return replay, replay, model
    if design == "onnx":
        session = onnx_session(spec["onnx_path"], spec["threads"], spec.get("spin", False))
        feed = {"images": samples.tensors.numpy(), "mask": samples.mask.numpy()}
        return lambda: session.run(None, feed), eager, model
    raise ValueError(f"unknown inference design {design!r}")


def measure_inference(spec: dict) -> dict:
    """Forward times of one design at one size; with spec["flops"], also the FLOPs of its PyTorch forward."""
    h, w = spec["size"]
    samples = image_batch([(h, w)])
    result: dict = {}
    with torch.no_grad():
        forward, eager, model = inference_forward(spec, samples, result)
        result["rss_built"] = peak_rss_bytes()
        result["times"] = timed(forward, spec["repeats"], spec["warmup"])
    if spec.get("flops"):
        result["flops"] = count_flops(eager, model)
    return result


def train_step_fn(spec: dict) -> Callable[[], float]:
    """One optimisation step of spec["design"] on a padded batch of spec["sizes"], as `training/engine.py` runs it:
    forward, weighted loss (aux losses included), backward, gradient clipping, AdamW (`training.optim`)."""
    from training.config import TrainConfig
    from training.optim import build_optimizer

    design = spec["design"]
    if design == "official":
        model, criterion = build_official(model_config(spec))
    else:
        overrides = {"grad_checkpointing": False} if design == "ours_no_checkpointing" else {}
        model, criterion, _ = build_model(model_config(spec, **overrides))
    model.train()
    train = TrainConfig()
    optimizer = build_optimizer(model, train)
    samples = image_batch([tuple(s) for s in spec["sizes"]])
    targets = random_targets(len(spec["sizes"]), spec["boxes"], criterion.num_classes)
    weights = criterion.weight_dict

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        losses = criterion(model(samples), targets)
        loss = sum(losses[k] * weights[k] for k in losses if k in weights)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.clip_max_norm)
        optimizer.step()
        return float(loss.detach())

    return step


def measure_train(spec: dict) -> dict:
    """Step times, the RSS after building (baseline) and the peak RSS of the process."""
    step = train_step_fn(spec)
    result = {"rss_built": peak_rss_bytes()}
    result["times"] = timed(step, spec["repeats"], spec["warmup"])
    return result


def measure_matmul(spec: dict) -> dict:
    """Seconds of `torch.mm` on two 2048 x 2048 float32 matrices, and its FLOPs (2 n^3)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(MATMUL_N, MATMUL_N, generator=g), torch.randn(MATMUL_N, MATMUL_N, generator=g)
    return {"times": timed(lambda: torch.mm(a, b), spec["repeats"], spec["warmup"]), "flops": 2 * MATMUL_N**3}


def measure_export(spec: dict) -> dict:
    """Exports ours (the same seeded weights as the inference rows) with each exporter to spec["dir"], checks the
    file against PyTorch at the first size and times a short onnxruntime probe at every size; picks the fastest."""
    from pvt_detr.export import export_onnx
    from pvt_detr.inference import Detector

    model, _, postprocessors = build_model(model_config(spec))
    detector = Detector(model.eval(), postprocessors["bbox"])
    batches = [image_batch([tuple(size)]) for size in spec["sizes"]]
    with torch.no_grad():
        expected = model(batches[0])
    exporters: dict = {}
    for exporter in ("dynamo", "torchscript"):
        path = os.path.join(spec["dir"], f"{exporter}.onnx")
        entry: dict = {"path": path}
        try:
            t0 = time.perf_counter()
            export_onnx(detector, path, exporter=exporter, example=batches[0])
            entry["export_s"] = time.perf_counter() - t0
            session = onnx_session(path, spec["threads"], spec.get("spin", False))
            probe = []
            for i, batch in enumerate(batches):
                feed = {"images": batch.tensors.numpy(), "mask": batch.mask.numpy()}
                logits, boxes = session.run(None, feed)
                if i == 0:
                    entry["max_abs_diff"] = float(max(np.abs(logits - expected["pred_logits"].numpy()).max(),
                                                      np.abs(boxes - expected["pred_boxes"].numpy()).max()))
                probe.append(min(timed(lambda f=feed, s=session: s.run(None, f), repeats=2, warmup=0)))
            entry["probe_s"] = sum(probe)
        except Exception as err:  # an exporter that fails is reported, the other one is used
            entry["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        exporters[exporter] = entry
    working = {k: v for k, v in exporters.items() if "probe_s" in v and v["max_abs_diff"] < spec["atol"]}
    chosen = min(working, key=lambda k: working[k]["probe_s"]) if working else None
    return {"exporters": exporters, "chosen": chosen}


def measure_breakdown(spec: dict) -> dict:
    """Time by kind of op of spec["design"]'s forward at spec["size"] (eager, compiled or official)."""
    from benchmarks.op_breakdown import breakdown

    h, w = spec["size"]
    samples = image_batch([(h, w)])
    result: dict = {}
    with torch.no_grad():
        forward, _, _ = inference_forward(spec, samples, result)
        result.update(breakdown(forward, spec["repeats"], spec["warmup"]))
    return result


MEASURES: dict[str, Callable[[dict], dict]] = {
    "infer": measure_inference, "train": measure_train, "matmul": measure_matmul, "export": measure_export,
    "breakdown": measure_breakdown}


def run_spec(spec: dict) -> dict:
    """Runs one measurement in this process at spec["threads"] threads; adds the RSS after imports and the peak."""
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    rss_import = peak_rss_bytes()
    result = MEASURES[spec["kind"]](spec)
    result.update(rss_import=rss_import, peak_rss=peak_rss_bytes())
    if "times" in result:
        result["median_s"] = statistics.median(result["times"])
    return result
