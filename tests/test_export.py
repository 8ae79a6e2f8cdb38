"""`python -m pvt_detr.export`: an ONNX model with dynamic batch and image size that onnxruntime runs like PyTorch.

Skipped as a whole when onnxruntime (or onnx) cannot be imported.
"""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from pvt_detr.inference import Detector
from pvt_detr.nested_tensor import nested_tensor_from_tensor_list
from tests.tiny_detector import ROOT, tiny_checkpoint

onnx = pytest.importorskip("onnx", reason="onnx is not installed: ONNX export tests skipped")
onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: ONNX export tests skipped")

from pvt_detr.export import ExportableDETR, example_batch, export_onnx, onnx_session  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The CLI's default (dynamo) export of the tiny model, with its own onnxruntime check."""
    checkpoint, _ = tiny_checkpoint(tmp_path_factory)
    path = tmp_path_factory.mktemp("export") / "model.onnx"
    proc = subprocess.run([sys.executable, "-m", "pvt_detr.export", "--checkpoint", str(checkpoint), "--out",
                           str(path)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    return checkpoint, path, proc


@pytest.fixture(scope="module")
def detector(exported):
    return Detector.from_checkpoint(exported[0], device="cpu")


@pytest.mark.slow
def test_cli_exports_and_checks_against_pytorch(exported):
    _, path, proc = exported
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert path.is_file() and "dynamo exporter" in proc.stdout
    check = [line for line in proc.stdout.splitlines() if line.startswith("check:")]
    assert len(check) == 1 and "onnxruntime == PyTorch" in check[0], proc.stdout
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == ["images", "mask"]
    assert [o.name for o in model.graph.output] == ["pred_logits", "pred_boxes"]
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims[1] == 3 and all(isinstance(d, str) and d for d in (dims[0], dims[2], dims[3])), dims  # dynamic
    props = {p.key: p.value for p in model.metadata_props}
    state = torch.load(exported[0], weights_only=True)
    assert json.loads(props["label_map"]) == state["label_map"] and len(state["label_map"]) == 8  # demo ids 1, 3, 7
    assert props["test_size"] == "64" and props["max_size"] == "96" and props["score"] == "softmax"


def _onnx_detections(session, detector, images):
    """The documented recipe on the ONNX model: evaluation preprocessing, padding + mask, softmax post-processing."""
    tensors, sizes = zip(*(detector.preprocess(image) for image in images))
    batch = nested_tensor_from_tensor_list(list(tensors), size_divisibility=32)
    logits, boxes = session.run(None, {"images": batch.tensors.numpy(), "mask": batch.mask.numpy()})
    outputs = {"pred_logits": torch.from_numpy(logits), "pred_boxes": torch.from_numpy(boxes)}
    return batch, outputs, detector.postprocessor(outputs, torch.tensor(sizes))


# The second batch is large (6 x 96 x 64: 2304 stage-1 tokens), so that a Python loop over the data size recorded
# for the export example (two 96 x 96 images, 1152 tokens) would show.
BIG_BATCH = [(130, 40), (100, 60), (90, 70), (110, 64), (95, 70), (64, 64)]


@pytest.mark.slow
@pytest.mark.parametrize("sizes", [[(80, 80)], BIG_BATCH], ids=["1x64x64", "6x96x64"])
def test_onnxruntime_matches_pytorch_at_other_sizes(exported, detector, sizes):
    session = onnx_session(exported[1])
    rng = np.random.default_rng(len(sizes))
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    batch, outputs, detections = _onnx_detections(session, detector, images)
    example = re.search(r"example \((\d+), 3, (\d+), (\d+)\)", exported[2].stdout).groups()
    assert tuple(batch.tensors.shape[-2:]) != (int(example[1]), int(example[2]))  # not the export example's size
    assert batch.mask.any() or len(sizes) == 1
    with torch.no_grad():
        logits, boxes = ExportableDETR(detector.model)(batch.tensors, batch.mask)
    torch.testing.assert_close(outputs["pred_logits"], logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(outputs["pred_boxes"], boxes, rtol=0, atol=1e-4)
    for det, ref in zip(detections, detector.predict(images, score_threshold=0.0)):
        torch.testing.assert_close(det["scores"], ref.scores, rtol=0, atol=1e-4)
        torch.testing.assert_close(det["boxes"], ref.boxes, rtol=0, atol=1e-3)


@pytest.mark.slow
def test_torchscript_exporter_also_matches(detector, tmp_path):
    path = tmp_path / "legacy.onnx"
    export_onnx(detector, path, exporter="torchscript")
    session = onnx_session(path)
    batch = example_batch(detector, BIG_BATCH, seed=3)
    assert tuple(batch.tensors.shape) == (6, 3, 96, 64)
    logits, boxes = session.run(None, {"images": batch.tensors.numpy(), "mask": batch.mask.numpy()})
    with torch.no_grad():
        expected = ExportableDETR(detector.model)(batch.tensors, batch.mask)
    torch.testing.assert_close(torch.from_numpy(logits), expected[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.from_numpy(boxes), expected[1], rtol=0, atol=1e-4)


@pytest.mark.slow
def test_an_opset_the_exporter_does_not_write_is_a_one_line_error_and_no_file(exported, tmp_path):
    checkpoint, _, _ = exported
    path = tmp_path / "old.onnx"
    proc = subprocess.run([sys.executable, "-m", "pvt_detr.export", "--checkpoint", str(checkpoint), "--out",
                           str(path), "--opset", "14"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.fullmatch(rf"error: the dynamo exporter wrote ONNX opset (\d+), not the requested 14 \(--exporter "
                        rf"torchscript writes older opsets\); nothing was written to {re.escape(str(path))}",
                        proc.stderr.strip().splitlines()[-1]), proc.stderr[-1000:]
    assert not path.exists()
    legacy = tmp_path / "legacy14.onnx"  # the legacy exporter writes what it is asked for
    proc = subprocess.run([sys.executable, "-m", "pvt_detr.export", "--checkpoint", str(checkpoint), "--out",
                           str(legacy), "--opset", "14", "--exporter", "torchscript", "--no_check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [o.version for o in onnx.load(str(legacy)).opset_import if o.domain in ("", "ai.onnx")] == [14]
    assert "torchscript exporter, opset 14" in proc.stdout


def test_negative_atol_is_a_flag_error(exported):
    proc = subprocess.run([sys.executable, "-m", "pvt_detr.export", "--checkpoint", str(exported[0]), "--atol", "-1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == ["error: argument --atol: must be >= 0, got -1"]
