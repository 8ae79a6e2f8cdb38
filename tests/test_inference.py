"""The inference API: same predictions as the evaluation path, every input kind, EXIF, batching, errors."""

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from pvt_detr.checkpoints import CheckpointError
from pvt_detr.inference import Detector, ImageReadError, as_pil, load_image
from tests.tiny_detector import tiny_checkpoint

EXIF_ORIENTATION = 0x0112


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def detector(trained):
    return Detector.from_checkpoint(trained[0], device="cpu")


def _val_with_mixed_sizes(data: Path, dest: Path) -> Path:
    """A COCO-layout copy of the val split where two images are resized to non-square sizes (so evaluation batches
    are padded)."""
    shutil.copytree(data / "val2017", dest / "val2017")
    (dest / "annotations").mkdir()
    annotations = json.loads((data / "annotations" / "instances_val2017.json").read_text())
    for info, (w, h) in zip(annotations["images"][:2], [(120, 70), (50, 100)]):
        path = dest / "val2017" / info["file_name"]
        Image.open(path).convert("RGB").resize((w, h), Image.BILINEAR).save(path, quality=95)
        sx, sy = w / info["width"], h / info["height"]
        info["width"], info["height"] = w, h
        for ann in annotations["annotations"]:
            if ann["image_id"] == info["id"]:
                x, y, bw, bh = ann["bbox"]
                ann["bbox"] = [x * sx, y * sy, bw * sx, bh * sy]
                ann["area"] = bw * sx * bh * sy
    (dest / "annotations" / "instances_val2017.json").write_text(json.dumps(annotations))
    return dest


@pytest.mark.slow
def test_api_equals_the_evaluation_path(trained, detector, tmp_path):
    from torch.utils.data import DataLoader

    from datasets import build_dataset, collate_fn
    from pvt_detr import build_model
    from training.engine import predict_dataset

    checkpoint, data = trained
    state = torch.load(checkpoint, weights_only=True)
    root = _val_with_mixed_sizes(data, tmp_path)
    args = SimpleNamespace(**{**state["config"], "dataset_file": "coco", "coco_path": str(root)})
    dataset = build_dataset("val", args)
    model, _, postprocessors = build_model(args)  # what `main.py --eval --resume` does
    model.load_state_dict(state["model"])
    loader = DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate_fn)
    expected, _ = predict_dataset(model, postprocessors, loader, torch.device("cpu"))
    assert len(expected) == len(dataset) == 5

    infos = [dataset.coco.imgs[i] for i in sorted(expected)]
    paths = [root / "val2017" / info["file_name"] for info in infos]
    assert {(info["height"], info["width"]) for info in infos} >= {(70, 120), (100, 50), (80, 80)}
    # Other batches than the evaluation's: reversed order, batches of 2, mixed sizes.
    got = detector.predict(paths[::-1], score_threshold=0.0, batch_size=2)[::-1]
    for info, det in zip(infos, got):
        ref = expected[info["id"]]
        assert det.image_size == (info["height"], info["width"])
        assert len(det) == len(ref["scores"]) == args.num_queries
        torch.testing.assert_close(det.scores, ref["scores"], rtol=0, atol=1e-4)
        torch.testing.assert_close(det.boxes, ref["boxes"], rtol=0, atol=1e-4)
        assert torch.equal(det.labels, ref["labels"])
        assert det.names == [dict(state["label_map"])[int(c)] for c in ref["labels"]]


@pytest.mark.slow
def test_every_input_kind_gives_the_same_detections(trained, detector):
    path = sorted((trained[1] / "val2017").glob("*.jpg"))[0]
    pil = load_image(path)
    pixels = np.array(pil)  # (H, W, 3) uint8
    kinds = [str(path), path, pil, pixels, torch.from_numpy(pixels).permute(2, 0, 1),
             torch.from_numpy(pixels).permute(2, 0, 1).float() / 255, pixels.astype(np.float32) / 255]
    reference = detector.predict(path, score_threshold=0.0)
    for kind, det in zip(kinds, detector.predict(kinds, score_threshold=0.0)):
        torch.testing.assert_close(det.scores, reference.scores, rtol=0, atol=1e-5, msg=str(type(kind)))
        torch.testing.assert_close(det.boxes, reference.boxes, rtol=0, atol=1e-4, msg=str(type(kind)))
    batch = detector.predict(torch.from_numpy(np.stack([pixels, pixels])).permute(0, 3, 1, 2), score_threshold=0.0)
    assert len(batch) == 2
    torch.testing.assert_close(batch[1].boxes, reference.boxes, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_threshold_batching_and_padding(detector):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(80, 80), (40, 130), (150, 60)]]
    alone = [detector.predict(image, score_threshold=0.0) for image in images]
    batched = detector.predict(images, score_threshold=0.0, batch_size=3)
    for a, b, image in zip(alone, batched, images):
        assert a.image_size == image.shape[:2]
        torch.testing.assert_close(b.scores, a.scores, rtol=0, atol=1e-4)
        torch.testing.assert_close(b.boxes, a.boxes, rtol=0, atol=1e-4)
        h, w = image.shape[:2]
        centres = (a.boxes[:, :2] + a.boxes[:, 2:]) / 2  # (Q, 2) x, y: inside the original image
        assert ((centres >= 0) & (centres <= torch.tensor([w, h]))).all()
    threshold = float(alone[0].scores.median())
    kept = detector.predict(images[0], score_threshold=threshold)
    assert 0 < len(kept) < len(alone[0]) and bool((kept.scores >= threshold).all())
    assert torch.equal(kept.boxes, alone[0].boxes[alone[0].scores >= threshold])
    rows = kept.to_coco(file_name="a.jpg")
    assert len(rows) == len(kept) and rows[0]["file_name"] == "a.jpg" and len(rows[0]["bbox"]) == 4
    x0, y0, x1, y1 = kept.boxes[0].tolist()
    assert rows[0]["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0], abs=0.01)


@pytest.mark.slow
def test_exif_rotated_file_is_predicted_upright(detector, tmp_path):
    rng = np.random.default_rng(1)
    upright = Image.fromarray(rng.integers(0, 256, (50, 90, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # stored rotated; displayed after turning it 90 degrees clockwise
    path = tmp_path / "rotated.png"
    upright.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif.tobytes())
    assert Image.open(path).size == (50, 90)
    det = detector.predict(path, score_threshold=0.0)
    ref = detector.predict(upright, score_threshold=0.0)
    assert det.image_size == (50, 90)
    assert torch.equal(det.boxes, ref.boxes) and torch.equal(det.scores, ref.scores)


def _tricky_files(folder: Path) -> list[Path]:
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    files = []
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 8
    Image.fromarray(rgb).save(folder / "exif8.jpg", exif=exif.tobytes())
    files.append(folder / "exif8.jpg")
    Image.fromarray(rng.integers(0, 65536, (20, 30), dtype=np.uint16)).save(folder / "gray16.png")
    files.append(folder / "gray16.png")
    palette = Image.fromarray(rgb).convert("P")
    palette.info["transparency"] = 0
    palette.save(folder / "palette.png", transparency=0)
    files.append(folder / "palette.png")
    Image.fromarray(rgb).convert("LA").save(folder / "la.png")
    files.append(folder / "la.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    files.append(folder / "cmyk.jpg")
    Image.fromarray(rgb[..., 0]).save(folder / "gray.jpg")
    files.append(folder / "gray.jpg")
    return files


def test_files_decode_exactly_as_the_dataset_decodes_them(tmp_path):
    from datasets.coco import load_rgb

    for path in _tricky_files(tmp_path):
        ours = load_image(path)
        assert ours.mode == "RGB", path.name
        assert np.array_equal(np.asarray(ours), np.asarray(load_rgb(str(path)))), path.name
    assert load_image(tmp_path / "exif8.jpg").size == (30, 40)  # orientation 8: a quarter turn


def test_arrays_and_tensors_convert_like_images():
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(pixels))
    for image in (pixels, torch.from_numpy(pixels).permute(2, 0, 1), pixels / 255.0,
                  torch.from_numpy(pixels).permute(2, 0, 1).double() / 255, np.dstack([pixels, pixels[..., :1]])):
        assert np.array_equal(np.asarray(as_pil(image)), expected)
    gray = as_pil(pixels[..., 0])
    assert gray.mode == "RGB" and np.array_equal(np.asarray(gray)[..., 2], pixels[..., 0])
    with pytest.raises(ValueError, match="shape"):
        as_pil(np.zeros((4, 5, 2), np.uint8))
    with pytest.raises(TypeError, match="unsupported image type"):
        as_pil(3)


def test_unreadable_files_and_bad_checkpoints_are_one_line_errors(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    for path in (broken, tmp_path / "missing.png"):
        with pytest.raises(ImageReadError) as err:
            load_image(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        Detector.from_checkpoint(tmp_path / "missing.pth")
    torch.save({"model": {"w": torch.zeros(1)}}, tmp_path / "weights_only.pth")
    with pytest.raises(CheckpointError, match="not a pvt-detr training checkpoint"):
        Detector.from_checkpoint(tmp_path / "weights_only.pth")


@pytest.mark.slow
def test_checkpoint_with_foreign_weights_is_refused(trained, tmp_path):
    state = torch.load(trained[0], weights_only=True)
    state["config"] = {**state["config"], "hidden_dim": 64}
    torch.save(state, tmp_path / "mismatch.pth")
    with pytest.raises(CheckpointError, match="different architecture"):
        Detector.from_checkpoint(tmp_path / "mismatch.pth", device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            Detector.from_checkpoint(trained[0], device="cuda")


@pytest.mark.slow
def test_readme_example_runs(trained, capsys):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Using a trained detector", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    checkpoint, data = trained
    code = code.replace("outputs/demo/checkpoint.pth", str(checkpoint)).replace("data/demo", str(data))
    exec(code, {})
    state = torch.load(checkpoint, weights_only=True)
    assert all(line.split()[0] in dict(state["label_map"]).values() for line in capsys.readouterr().out.splitlines())
