"""ONNX export of a trained checkpoint, with a check that onnxruntime reproduces PyTorch.

    python -m pvt_detr.export --checkpoint outputs/demo/checkpoint.pth --out model.onnx

The ONNX model is `ExportableDETR`, exactly the function PyTorch runs in the check, with dynamic batch size and
image size. Its input follows `nested_tensor_from_tensor_list` (what the evaluation feeds the model):
- `images` (B, 3, H, W) float32: each image resized by the evaluation rule (short side `test_size`, long side
  <= `max_size`, bilinear with antialiasing), scaled to [0, 1], normalised with the ImageNet mean
  (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225), then ZERO-padded at the bottom and right to a common
  H x W that are multiples of 32;
- `mask` (B, H, W) bool: True on padding, False on the image's pixels.
Outputs (DETR's): `pred_logits` (B, Q, K+1), softmax over the last axis, last class = no object (with a
`--focal_loss` checkpoint (B, Q, K) sigmoid scores, no no-object class), and `pred_boxes` (B, Q, 4) cxcywh in
[0, 1] relative to each image's unpadded size: multiply by the original image's (w, h, w, h) for pixels.
The model's metadata holds `label_map` (JSON [[category id, name or null], ...], one per class output: row r of
pred_logits stands for label_map[r]), `test_size`, `max_size` and `score` (softmax | sigmoid).

Exporters: `dynamo` (default, `torch.onnx.export(dynamo=True)` with `torch.export` dynamic shapes; H and W are
declared as 32 * h, 32 * w) or `torchscript` (the legacy tracer with dynamic axes, faster to run, deprecated by
PyTorch). The model has one forward path of tensor operations (padding masks included), so one graph serves every
batch composition. The check runs PyTorch and onnxruntime on a batch of two images whose sizes differ from the
export example. A detector on a GPU is exported from a CPU copy of its model; the detector itself stays on its GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pvt_detr.checkpoints import CheckpointError
from pvt_detr.cli import OneLineParser, expand_path, number
from pvt_detr.inference import Detector
from pvt_detr.nested_tensor import NestedTensor, nested_tensor_from_tensor_list

INPUT_NAMES = ["images", "mask"]
OUTPUT_NAMES = ["pred_logits", "pred_boxes"]
DEFAULT_OPSET = 18


class ExportError(RuntimeError):
    """Export or its check failed; the message is one line."""


class ExportableDETR(nn.Module):
    """DETR as a function of plain tensors: (images (B, 3, H, W), mask (B, H, W) bool) -> (pred_logits, pred_boxes).

    images: normalised, zero-padded bottom/right to multiples of 32; mask: True on padding (see module docstring).
    Returns pred_logits (B, Q, K+1) and pred_boxes (B, Q, 4) cxcywh in [0, 1] of each unpadded image.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = self.model(NestedTensor(images, mask))
        return outputs["pred_logits"], outputs["pred_boxes"]


def cpu_model(detector: Detector) -> nn.Module:
    """The detector's model on the CPU: itself, or a CPU copy for a GPU detector (which keeps working on its GPU)."""
    if next(detector.model.parameters()).device.type == "cpu":
        return detector.model
    return copy.deepcopy(detector.model).cpu()


def example_batch(detector: Detector, sizes: list[tuple[int, int]], seed: int = 0) -> NestedTensor:
    """Random images of the given original (h, w) sizes, through the detector's evaluation preprocessing."""
    generator = np.random.default_rng(seed)
    tensors = [detector.preprocess(generator.integers(0, 256, (h, w, 3), dtype=np.uint8))[0] for h, w in sizes]
    return nested_tensor_from_tensor_list(tensors, size_divisibility=32)


@contextlib.contextmanager
def _quiet_loggers(*names: str):
    """Raises these loggers to ERROR+1 for the block: the exporters log opset fallbacks and failed opset conversions
    (with tracebacks) that `export_onnx` reports itself in one line."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR + 1)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_onnx(detector: Detector, path: str | Path, exporter: str = "dynamo", opset: int = DEFAULT_OPSET,
                example: NestedTensor | None = None) -> NestedTensor:
    """Writes `ExportableDETR(detector.model)` to `path` (one file, CPU, float32); returns the example batch used.

    The default example: two images padded to one size, so the mask is exercised.
    """
    import onnx

    model = ExportableDETR(cpu_model(detector)).eval()
    if example is None:
        s = detector.test_size
        example = example_batch(detector, [(3 * s // 4, s), (s, s // 2)])
    args = (example.tensors.cpu(), example.mask.cpu())
    with warnings.catch_warnings(), _quiet_loggers("torch.onnx", "onnxscript"):
        warnings.simplefilter("ignore")  # exporter chatter (deprecations, TracerWarnings on branch-free code)
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=1024)
            h, w = torch.export.Dim("h", min=1, max=1024), torch.export.Dim("w", min=1, max=1024)
            shapes = {"images": {0: batch, 2: 32 * h, 3: 32 * w}, "mask": {0: batch, 1: 32 * h, 2: 32 * w}}
            program = torch.onnx.export(model, args, dynamo=True, dynamic_shapes=shapes, opset_version=opset,
                                        input_names=INPUT_NAMES, output_names=OUTPUT_NAMES, verbose=False)
            proto = program.model_proto
        elif exporter == "torchscript":
            axes = {"images": {0: "batch", 2: "height", 3: "width"}, "mask": {0: "batch", 1: "height", 2: "width"},
                    "pred_logits": {0: "batch"}, "pred_boxes": {0: "batch"}}
            with tempfile.TemporaryDirectory() as tmp:
                torch.onnx.export(model, args, f"{tmp}/model.onnx", dynamo=False, dynamic_axes=axes,
                                  opset_version=opset, input_names=INPUT_NAMES, output_names=OUTPUT_NAMES)
                proto = onnx.load(f"{tmp}/model.onnx")
        else:
            raise ExportError(f"unknown exporter {exporter!r}; use dynamo or torchscript")
    written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if written != opset:  # the dynamo exporter writes opset 18 or later whatever it is asked for
        other = " (--exporter torchscript writes older opsets)" if exporter == "dynamo" else ""
        raise ExportError(f"the {exporter} exporter wrote ONNX opset {written}, not the requested {opset}{other}; "
                          f"nothing was written to {path}")
    focal = bool(detector.config.get("focal_loss", False))
    onnx.helper.set_model_props(proto, {
        "label_map": json.dumps(detector.label_map.to_list()),
        "test_size": str(detector.test_size), "max_size": str(detector.max_size),
        "score": "sigmoid" if focal else "softmax",
        "input": "images (B,3,H,W) normalised, zero-padded bottom/right to multiples of 32; mask (B,H,W) True=padding",
    })
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return example


def onnx_session(path: str | Path):
    """An onnxruntime CPU session for an exported model."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@torch.no_grad()
def compare_with_pytorch(detector: Detector, session, batch: NestedTensor) -> dict[str, float]:
    """Max |onnxruntime - PyTorch| of pred_logits and pred_boxes on one padded batch (PyTorch on CPU, float32)."""
    model = ExportableDETR(cpu_model(detector)).eval()
    expected = model(batch.tensors.cpu(), batch.mask.cpu())
    got = session.run(OUTPUT_NAMES, {"images": batch.tensors.cpu().numpy(), "mask": batch.mask.cpu().numpy()})
    diffs = {}
    for name, e, g in zip(OUTPUT_NAMES, expected, got):
        if tuple(g.shape) != tuple(e.shape):
            raise ExportError(f"onnxruntime {name} has shape {tuple(g.shape)}, PyTorch {tuple(e.shape)}")
        diffs[name] = float(np.abs(g - e.numpy()).max())
    return diffs


def check_batch(detector: Detector, example: NestedTensor) -> NestedTensor:
    """Two images padded to a size other than the export example's (what the check is about)."""
    s = detector.test_size
    for sizes in ([(s, s), (s, 2 * s)], [(s, 3 * s), (s, s)], [(3 * s, s), (s, s)], [(s, s)]):
        batch = example_batch(detector, sizes, seed=1)
        if batch.tensors.shape[-2:] != example.tensors.shape[-2:]:
            break
    return batch


def get_args_parser() -> argparse.ArgumentParser:
    parser = OneLineParser("python -m pvt_detr.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, type=expand_path, help="pvt-detr checkpoint written by main.py")
    parser.add_argument("--out", default="model.onnx", type=expand_path, help="ONNX file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--exporter", default="dynamo", choices=["dynamo", "torchscript"],
                        help="dynamo: torch.onnx.export(dynamo=True) (default); torchscript: the legacy tracer")
    parser.add_argument("--opset", default=DEFAULT_OPSET, type=number(int, 7, 100), help="ONNX opset version")
    parser.add_argument("--atol", default=1e-4, type=number(float, 0), help="onnxruntime vs PyTorch tolerance")
    parser.add_argument("--no_check", action="store_true", help="skip the onnxruntime check")
    return parser


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.is_dir():
        raise ExportError(f"--out {out} is a folder: give the ONNX file's name, e.g. {out / 'model.onnx'}")
    if out.exists() and not args.overwrite:
        raise ExportError(f"--out {out} already exists: pass --overwrite to replace it, or choose another name")
    detector = Detector.from_checkpoint(args.checkpoint, device="cpu")
    start = time.time()
    try:
        example = export_onnx(detector, args.out, exporter=args.exporter, opset=args.opset)
    except (ImportError, ExportError):
        raise
    except Exception as err:  # the exporters raise many kinds; the first line says what failed
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        other = "torchscript" if args.exporter == "dynamo" else "dynamo"
        raise ExportError(f"the {args.exporter} exporter failed: {type(err).__name__}: {first} "
                          f"(try --exporter {other})") from None
    size_mb = Path(args.out).stat().st_size / 1e6
    print(f"exported {args.out} ({size_mb:.1f} MB, {args.exporter} exporter, opset {args.opset}, "
          f"example {tuple(example.tensors.shape)}) in {time.time() - start:.0f} s", flush=True)
    if args.no_check:
        return 0
    try:
        session = onnx_session(args.out)
    except ImportError:
        raise ExportError("onnxruntime is not installed: cannot check the export (install it or use --no_check)") \
            from None
    batch = check_batch(detector, example)
    diffs = compare_with_pytorch(detector, session, batch)
    text = ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
    if not all(v <= args.atol for v in diffs.values()):
        raise ExportError(f"onnxruntime differs from PyTorch on a {tuple(batch.tensors.shape)} batch: max |diff| "
                          f"{text} > atol {args.atol}")
    print(f"check: onnxruntime == PyTorch on a {tuple(batch.tensors.shape)} batch (export example "
          f"{tuple(example.tensors.shape)}): max |diff| {text} <= {args.atol}")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = get_args_parser().parse_args(argv)
    except SystemExit as exit_:  # a flag error (one line already printed) or --help
        return int(exit_.code or 0)
    try:
        return run(args)
    except (ExportError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    except ImportError as err:
        print(f"error: {err.name or err} is not installed (pip install onnx onnxscript onnxruntime)", file=sys.stderr)
        return 1
    except OSError as err:  # writing the file: read-only, disk full, ...
        print(f"error: {err.filename or args.out}: cannot write it ({err.strerror or err})", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
