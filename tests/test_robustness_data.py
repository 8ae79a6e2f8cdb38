"""Bad data: annotation-file validation, images in every awkward format or broken, a whole dirty dataset end to end.

The dirty dataset (`make_dirty_coco`) holds every fixable annotation problem and every image case at once;
`test_dirty_dataset_trains_and_evaluates` runs main.py on it.
"""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from datasets import DatasetError, build_dataset, collate_fn
from datasets.coco import CocoDetection, load_rgb
from datasets.transforms import train_transform
from datasets.validation import validate_coco_file
from pvt_detr.preprocess import IMAGENET_MEAN, IMAGENET_STD, build_eval_transform

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_main_cli import TINY  # noqa: E402  (the tiny model of the CLI tests)

EXIF_ORIENTATION = 0x0112
CATEGORIES = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 5, "name": "c"}]
UNREADABLE = ("truncated.jpg", "corrupt.jpg", "missing.jpg")


def _write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def _coco(images=None, annotations=None, categories=None) -> dict:
    return {"images": [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48}] if images is None else images,
            "annotations": [] if annotations is None else annotations,
            "categories": CATEGORIES if categories is None else categories}


def _unnormalize(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) normalised -> RGB in [0, 1]."""
    return image * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]


def assert_valid_detr_target(target: dict) -> None:
    """Boxes cxcywh, finite, of positive size and inside [0, 1]; one label per box."""
    boxes = target["boxes"]
    assert boxes.dtype == torch.float32 and boxes.ndim == 2 and boxes.shape[1] == 4
    assert len(target["labels"]) == len(boxes) == len(target["area"])
    assert torch.isfinite(boxes).all()
    cx, cy, w, h = boxes.unbind(-1)
    eps = 1e-5
    assert (w > 0).all() and (h > 0).all()
    assert (cx - w / 2 >= -eps).all() and (cx + w / 2 <= 1 + eps).all()
    assert (cy - h / 2 >= -eps).all() and (cy + h / 2 <= 1 + eps).all()
    assert ((boxes >= 0) & (boxes <= 1)).all()


# ---------------------------------------------------------------------------------------------------------------
# Annotation file validation

FATAL = [
    ("not json", "{\"images\": [", "not valid JSON"),
    ("list", [], "not a COCO annotation file"),
    ("no annotations", {"images": [], "categories": []}, "no 'annotations' list"),
    ("images not a list", {"images": {}, "annotations": [], "categories": []}, "'images' must be a list"),
    ("no width", _coco(images=[{"id": 1, "file_name": "a.jpg", "height": 4}]), "invalid image entries"),
    ("string id", _coco(images=[{"id": "x", "file_name": "a.jpg", "width": 4, "height": 4}]), "invalid image entries"),
    ("no file name", _coco(images=[{"id": 1, "width": 4, "height": 4}]), "has no file_name"),
    ("duplicate image", _coco(images=[{"id": 1, "file_name": "a.jpg", "width": 4, "height": 4},
                                      {"id": 1, "file_name": "b.jpg", "width": 4, "height": 4}]),
     "1 duplicate image ids (e.g. image id 1 for a.jpg and b.jpg)"),
    ("no images", _coco(images=[]), "no images"),
    ("duplicate category", _coco(categories=[{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]),
     "duplicate category ids"),
    ("negative category", _coco(categories=[{"id": -1, "name": "a"}]), "invalid category entries"),
    ("no categories", _coco(categories=[]), "no categories"),
    ("unknown image", _coco(annotations=[{"id": 7, "image_id": 99, "category_id": 1, "bbox": [0, 0, 2, 2]}]),
     "annotations refer to image ids not in 'images' (e.g. annotation 7 -> image_id 99)"),
    ("unknown category", _coco(annotations=[{"id": 7, "image_id": 1, "category_id": 3, "bbox": [0, 0, 2, 2]}]),
     "annotations refer to category ids not in 'categories' (e.g. annotation 7 -> category_id 3)"),
    ("annotation not a dict", _coco(annotations=[[1, 2]]), "invalid annotation entries"),
]


@pytest.mark.parametrize("name, content, message", FATAL, ids=[c[0] for c in FATAL])
def test_fatal_annotation_problems_are_one_line_naming_the_file(tmp_path, name, content, message):
    path = tmp_path / "annotations" / "instances_train2017.json"
    path.parent.mkdir(parents=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(DatasetError) as info:
        validate_coco_file(path)
    text = str(info.value)
    assert message in text and str(path) in text and "\n" not in text


def test_missing_annotation_file(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        validate_coco_file(tmp_path / "nope.json")


def test_fixable_problems_are_fixed_and_counted(tmp_path):
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 10, 10], "area": 100, "iscrowd": 0},  # fine
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [4, 4, 0, 10], "area": 0, "iscrowd": 0},  # zero-area
        {"id": 3, "image_id": 2, "category_id": 2, "bbox": [4, 4, 5, 0], "area": 0, "iscrowd": 0},  # zero-area
        {"id": 4, "image_id": 2, "category_id": 2, "bbox": [1, 1, 0, 0], "area": 0, "iscrowd": 0},  # zero-area
        {"id": 5, "image_id": 1, "category_id": 5, "bbox": [math.nan, 1, 2, 2], "area": 4, "iscrowd": 0},
        {"id": 6, "image_id": 1, "category_id": 5, "bbox": [1, 1, math.inf, 2], "area": 4, "iscrowd": 0},
        {"id": 7, "image_id": 1, "category_id": 5, "bbox": [1, None, 2, 2], "area": 4, "iscrowd": 0},
        {"id": 8, "image_id": 1, "category_id": 5, "bbox": [1, 1, 2], "area": 4, "iscrowd": 0},  # malformed
        {"id": 9, "image_id": 1, "category_id": 5, "bbox": [10, 10, -3, 5], "area": 4, "iscrowd": 0},  # negative
        {"id": 10, "image_id": 1, "category_id": 5, "bbox": [70, 10, 5, 5], "area": 25, "iscrowd": 0},  # outside
        {"id": 11, "image_id": 1, "category_id": 5, "bbox": [-4, 40, 20, 20], "area": 400, "iscrowd": 0},  # clamp
        {"id": 11, "image_id": 2, "category_id": 1, "bbox": [2, 2, 0.5, 9]},  # duplicate id, tiny, no area/iscrowd
    ]
    images = [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48},
              {"id": 2, "file_name": "b.jpg", "width": 32, "height": 32}]
    path = _write_json(tmp_path / "ann.json", _coco(images=images, annotations=anns,
                                                    categories=[{"id": 1, "name": "a"}, {"id": 2}, {"id": 5}]))
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(b"")
    data, report = validate_coco_file(path, tmp_path / "images")
    assert report.fix_counts() == {"zero_area": 3, "nonfinite": 3, "malformed": 1, "negative": 1, "outside": 1,
                                   "clamped": 1, "tiny": 1, "area": 1, "iscrowd": 1, "ann_id": 1, "cat_name": 2}
    summary = report.summary()
    assert "\n" not in summary and summary.startswith("ann.json: 2 images, 3 annotations")
    for part in ("dropped 3 zero-area boxes in 2 images", "dropped 3 boxes with NaN/inf/non-numeric coordinates "
                 "in 1 image", "clamped 1 box running off its image in 1 image", "renumbered 1 missing or duplicate",
                 "1 image file missing (e.g. b.jpg)"):
        assert part in summary, (part, summary)
    kept = {a["id"]: a for a in data["annotations"]}
    assert sorted(kept) == [1, 11, 12]
    assert kept[11]["bbox"] == [0.0, 40.0, 16.0, 8.0]  # clamped to the 64 x 48 image
    assert kept[12]["area"] == 4.5 and kept[12]["iscrowd"] == 0
    assert [c["name"] for c in data["categories"]] == ["a", "2", "5"]
    assert report.missing_files == ["b.jpg"]
    with pytest.raises(DatasetError, match=r"1 of the 2 images listed in ann.json are missing .* --max_bad_images"):
        validate_coco_file(path, tmp_path / "images", max_missing_fraction=0.01)


# ---------------------------------------------------------------------------------------------------------------
# Images


def _png_rgb16(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one). pixels: (H, W, 3) uint16."""
    height, width, _ = pixels.shape
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) +
                     chunk(b"IEND", b""))


def _exif_rotated(path: Path, stored: Image.Image, orientation: int = 6) -> None:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    stored.save(path, exif=exif, quality=95)


def make_dirty_coco(root: Path, extra_clean_images: int = 4) -> dict:
    """A COCO folder (train2017 = val2017) with every fixable annotation problem and every image case.

    Returns the expected counts. Images are 64 x 48 unless stated. The EXIF-rotated image (orientation 6:
    displayed rotated 90 degrees clockwise) is stored 48 x 32 with a red block at x 4..20, y 8..16; displayed
    it is 32 x 48 with the block at x 16..24, y 4..20, where its box is annotated.
    """
    folders = [root / "train2017", root / "val2017"]
    files: dict[str, callable] = {}
    files["clean.jpg"] = lambda p: Image.new("RGB", (64, 48), (40, 120, 200)).save(p)
    files["gray.jpg"] = lambda p: Image.new("L", (64, 48), 90).save(p)
    files["rgba.png"] = lambda p: Image.new("RGBA", (64, 48), (0, 255, 0, 100)).save(p)

    def palette(p):
        image = Image.new("P", (64, 48), 1)
        image.putpalette([0, 0, 0, 250, 10, 10] + [0] * 762)
        image.save(p, transparency=0)

    files["palette.png"] = palette
    files["cmyk.jpg"] = lambda p: Image.new("CMYK", (64, 48), (0, 255, 255, 0)).save(p)  # red
    files["gray16.png"] = lambda p: Image.fromarray(np.full((48, 64), 32896, dtype=np.uint16)).save(p)  # 128 in 8 bit
    files["rgb16.png"] = lambda p: _png_rgb16(p, np.tile(np.array([65535, 0, 32896], dtype=np.uint16), (48, 64, 1)))

    def rotated(p, size=(48, 32)):
        stored = Image.new("RGB", size, (0, 0, 0))
        stored.paste((255, 0, 0), (4, 8, 20, 16))
        _exif_rotated(p, stored)

    files["exif_rotated.jpg"] = rotated
    files["exif_stored_frame.jpg"] = rotated  # annotated in the stored 48 x 32 frame: orientation ignored
    files["resized.jpg"] = lambda p: Image.new("RGB", (32, 24), (10, 200, 10)).save(p)  # annotated as 64 x 48

    def truncated(p):
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(p, quality=95)
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])

    files["truncated.jpg"] = truncated
    files["corrupt.jpg"] = lambda p: p.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" * 10)
    for i in range(extra_clean_images):
        files[f"extra{i}.jpg"] = lambda p, i=i: Image.new("RGB", (64, 48), (30 * i, 60, 90)).save(p)
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        for name, write in files.items():
            write(folder / name)

    sizes = {"exif_rotated.jpg": (32, 48), "exif_stored_frame.jpg": (48, 32)}
    names = [*files, "missing.jpg"]
    images = [{"id": 100 + i, "file_name": n, "width": sizes.get(n, (64, 48))[0], "height": sizes.get(n, (64, 48))[1]}
              for i, n in enumerate(names)]
    ids = {image["file_name"]: image["id"] for image in images}
    annotations = []

    def add(name, bbox, category_id=1, **extra):
        annotations.append({"id": len(annotations) + 1, "image_id": ids[name], "category_id": category_id,
                            "bbox": bbox, "area": 10.0, "iscrowd": 0, **extra})

    for name in names:  # one good box per image
        add(name, [16, 4, 8, 16] if name == "exif_rotated.jpg" else [4, 8, 16, 8], category_id=2)
    add("clean.jpg", [math.nan, 2, 5, 5])  # NaN
    add("clean.jpg", [2, 2, math.inf, 5])  # inf
    add("gray.jpg", [2, 2, 5, -5])  # negative height
    add("gray.jpg", [2, 2, 0, 5])  # zero-area
    add("rgba.png", [10, 10, 0, 0])  # zero-area
    add("cmyk.jpg", [100, 100, 10, 10])  # outside the image
    add("palette.png", [50, 30, 30, 30], category_id=5)  # runs off: clamped to 50..64 x 30..48
    add("extra0.jpg", [-10, -10, 20, 20], category_id=5)  # runs off: clamped to 0..10 x 0..10
    annotations[-1]["id"] = 1  # duplicate annotation id
    data = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    for split in ("train", "val"):
        _write_json(root / "annotations" / f"instances_{split}2017.json", data)
    return {"images": len(names), "nonfinite": 2, "negative": 1, "zero_area": 2, "outside": 1, "clamped": 2,
            "ann_id": 1, "unreadable": len(UNREADABLE)}


@pytest.fixture(scope="module")
def dirty_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dirty") / "coco"
    make_dirty_coco(root)
    return root


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(int)


def test_every_image_format_loads_as_rgb_in_the_annotated_frame(dirty_root, capsys):
    folder = dirty_root / "val2017"
    for name in ("clean.jpg", "gray.jpg", "rgba.png", "palette.png", "cmyk.jpg", "gray16.png", "rgb16.png"):
        image = load_rgb(str(folder / name), (64, 48))
        assert image.mode == "RGB" and image.size == (64, 48), name
    assert abs(_pixels(load_rgb(str(folder / "gray16.png")))[0, 0] - 128).max() <= 1  # scaled, not clipped at 255
    assert abs(_pixels(load_rgb(str(folder / "rgb16.png")))[0, 0] - [255, 0, 128]).max() <= 1
    assert abs(_pixels(load_rgb(str(folder / "cmyk.jpg")))[0, 0] - [255, 0, 0]).max() <= 3
    assert abs(_pixels(load_rgb(str(folder / "palette.png")))[0, 0] - [250, 10, 10]).max() <= 1

    rotated = _pixels(load_rgb(str(folder / "exif_rotated.jpg"), (32, 48)))  # displayed frame, as annotated
    assert rotated.shape == (48, 32, 3)
    red = (rotated[..., 0] > 150) & (rotated[..., 1] < 80)  # (H, W)
    rows, cols = np.flatnonzero(red.any(axis=1)), np.flatnonzero(red.any(axis=0))
    assert (cols[0], cols[-1] + 1, rows[0], rows[-1] + 1) == (16, 24, 4, 20)  # the annotated box [16, 4, 8, 16]
    assert capsys.readouterr().err == ""

    stored = load_rgb(str(folder / "exif_stored_frame.jpg"), (48, 32))
    assert stored.size == (48, 32)
    assert "EXIF orientation ignored" in capsys.readouterr().err
    small = load_rgb(str(folder / "resized.jpg"), (64, 48))
    assert small.size == (32, 24)  # the file's own size: never resized to what only the JSON declares
    assert "image is 32x24 but annotated as 64x48; using the file's size" in capsys.readouterr().err
    huge = load_rgb(str(folder / "resized.jpg"), (30000, 30000))  # a declared size can cost no memory
    assert huge.size == (32, 24)


def test_dirty_dataset_loads_with_valid_boxes_and_skips_unreadable_images(dirty_root, capsys):
    args = argparse_namespace(coco_path=str(dirty_root))
    for split in ("train", "val"):
        dataset = build_dataset(split, args)
        names = {dataset.coco.imgs[i]["file_name"]: index for index, i in enumerate(dataset.ids)}
        for name, index in names.items():
            item = dataset[index]
            if name in UNREADABLE:
                assert item is None
                assert f"warning: skipping image: cannot read image {dirty_root / f'{split}2017' / name}" in \
                    capsys.readouterr().err
                continue
            image, target = item
            assert image.shape[0] == 3 and torch.isfinite(image).all()
            assert_valid_detr_target(target)
            assert len(target["boxes"]) == {"palette.png": 2, "extra0.jpg": 2}.get(name, 1), name
        batch = collate_fn([dataset[names["truncated.jpg"]], dataset[names["clean.jpg"]]])
        assert batch.skipped == 1 and len(batch.targets) == 1 and batch.samples.tensors.shape[0] == 1
        empty = collate_fn([dataset[names["corrupt.jpg"]], dataset[names["missing.jpg"]]])
        assert empty.samples is None and empty.targets == () and empty.skipped == 2
        samples, targets = batch  # DETR's unpacking still works
    # with the default --max_bad_images 0.01, the one missing file of 17 is already too many
    with pytest.raises(DatasetError, match=r"^1 of the 17 images listed in instances_train2017.json are missing from"):
        build_dataset("train", argparse_namespace(coco_path=str(dirty_root), max_bad_images=0.01))


def test_eval_targets_of_clamped_boxes(dirty_root):
    dataset = CocoDetection(str(dirty_root / "val2017"), str(dirty_root / "annotations" / "instances_val2017.json"),
                            transforms=build_eval_transform(48, 1000))
    index = next(i for i, image_id in enumerate(dataset.ids) if dataset.coco.imgs[image_id]["file_name"] ==
                 "palette.png")
    _, target = dataset[index]
    # boxes [4, 8, 16, 8] and [50, 30, 30, 30] clamped to [50, 30, 14, 18] in the 64 x 48 image
    torch.testing.assert_close(target["boxes"], torch.tensor([[12 / 64, 12 / 48, 16 / 64, 8 / 48],
                                                              [57 / 64, 39 / 48, 14 / 64, 18 / 48]]))


def argparse_namespace(**overrides):
    import argparse

    values = dict(dataset_file="coco", coco_path=None, aug="pvt", train_sizes=[48, 64], max_size=96, test_size=64,
                  max_bad_images=0.5)
    values.update(overrides)
    return argparse.Namespace(**values)


# ---------------------------------------------------------------------------------------------------------------
# Property: any boxes through load + augmentation give valid DETR targets

coordinate = st.one_of(st.floats(-200, 300, allow_nan=False), st.sampled_from([math.nan, math.inf, -math.inf, 0.0]),
                       st.integers(-50, 120))
boxes_strategy = st.lists(st.lists(coordinate, min_size=4, max_size=4), max_size=6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Found by this test: a box touching the image border came out of the resize with h = 1.0000001.
@example(boxes=[[0.0, 0.0, 1.0, 21.0]], width=19, height=21, aug="pvt", crowd=[False] * 6, seed=0)
@given(boxes=boxes_strategy, width=st.integers(8, 80), height=st.integers(8, 80), aug=st.sampled_from(["pvt", "detr"]),
       crowd=st.lists(st.booleans(), min_size=6, max_size=6), seed=st.integers(0, 2**16))
def test_random_boxes_through_load_and_augmentation_give_valid_targets(boxes, width, height, aug, crowd, seed):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        Image.new("RGB", (width, height), (90, 90, 90)).save(folder / "img.png")
        annotations = [{"id": i + 1, "image_id": 1, "category_id": 2, "bbox": box, "area": 1.0,
                        "iscrowd": int(crowd[i])} for i, box in enumerate(boxes)]
        path = _write_json(folder / "ann.json", _coco(
            images=[{"id": 1, "file_name": "img.png", "width": width, "height": height}], annotations=annotations))
        dataset = CocoDetection(str(folder), str(path), transforms=train_transform(aug, [32, 48], max_size=100))
        torch.manual_seed(seed)
        image, target = dataset[0]
        assert_valid_detr_target(target)
        assert target["size"].tolist() == list(image.shape[-2:])
        eval_set = CocoDetection(str(folder), str(path), transforms=build_eval_transform(40, 100))
        assert_valid_detr_target(eval_set[0][1])


# ---------------------------------------------------------------------------------------------------------------
# End to end


@pytest.mark.slow
def test_dirty_dataset_trains_and_evaluates(tmp_path):
    """main.py on the dirty dataset: one epoch and an evaluation; every problem is reported with its count.

    It fine-tunes from a checkpoint with another class count (demo's 8 vs 6 here): the class head is skipped
    with a message."""
    expected = make_dirty_coco(tmp_path / "coco")
    finetune = tmp_path / "demo_model.pth"
    _tiny_checkpoint(finetune, num_classes=8)
    command = [sys.executable, str(ROOT / "main.py"), *TINY, "--dataset_file", "coco", "--coco_path",
               str(tmp_path / "coco"), "--output_dir", str(tmp_path / "out"), "--epochs", "1", "--max_bad_images",
               "0.2", "--finetune", str(finetune), "--aug", "detr", "--train_sizes", "48,64"]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    summaries = [line for line in proc.stdout.splitlines() if line.startswith("data: instances_")]
    assert len(summaries) == 2
    for line in summaries:
        for part in (f"{expected['images']} images",
                     "dropped 2 boxes with NaN/inf/non-numeric coordinates in 1 image",
                     "dropped 1 box of negative width or height in 1 image",
                     "dropped 2 zero-area boxes in 2 images",
                     "dropped 1 box outside its image in 1 image",
                     "clamped 2 boxes running off their image in 2 images",
                     "renumbered 1 missing or duplicate annotation id",
                     "1 image file missing (e.g. missing.jpg)"):
            assert part in line, (part, line)
    for name in UNREADABLE:
        assert f"warning: skipping image: cannot read image {tmp_path / 'coco' / 'train2017' / name}" in proc.stderr
        assert f"warning: skipping image: cannot read image {tmp_path / 'coco' / 'val2017' / name}" in proc.stderr
    assert "EXIF orientation ignored" in proc.stderr and "using the file's size" in proc.stderr
    assert "skipped class_embed" in proc.stdout
    (entry,) = [json.loads(line) for line in (tmp_path / "out" / "log.txt").read_text().splitlines()]
    assert entry["train_bad_images"] == expected["unreadable"] and entry["test_bad_images"] == expected["unreadable"]
    assert entry["train_steps"] == 4 and entry["train_empty_steps"] == 0 and math.isfinite(entry["train_loss"])
    assert len(entry["test_coco_eval_bbox"]) == 12
    results = json.loads((tmp_path / "out" / "results_val.json").read_text())
    gt = json.loads((tmp_path / "coco" / "annotations" / "instances_val2017.json").read_text())
    unreadable_ids = {i["id"] for i in gt["images"] if i["file_name"] in UNREADABLE}
    assert results and not unreadable_ids & {r["image_id"] for r in results}


def _tiny_checkpoint(path: Path, num_classes: int) -> None:
    """A pvt-detr checkpoint of the TINY test model (as main.py would write, without optimizer state)."""
    import main
    from pvt_detr import build_model
    from training.checkpoint import save_checkpoint
    from training.config import config_dict

    args = main.get_args_parser().parse_args([*TINY, "--num_classes", str(num_classes)])
    model, _, _ = build_model(args)
    save_checkpoint({"model": model.state_dict(), "config": config_dict(args), "epoch": 1, "step": 0}, path)
