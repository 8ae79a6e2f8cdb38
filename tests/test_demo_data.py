"""The synthetic demo dataset: determinism, tight boxes that match the pixels, layout rules, reuse and regeneration."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets.demo import IN_PROGRESS, MARKER, SIZE_RANGE, SPLIT_CODES, generate_demo_dataset, render_scene
from datasets.errors import DatasetError

SIZE = 64


def _json(root: Path, split: str = "train") -> dict:
    return json.loads((root / "annotations" / f"instances_{split}2017.json").read_text())


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    return generate_demo_dataset(tmp_path_factory.mktemp("demo") / "demo", 40, 5, SIZE, seed=0)


def test_same_seed_same_bytes_other_seed_other_data(demo_root, tmp_path):
    again = generate_demo_dataset(tmp_path / "again", 40, 5, SIZE, seed=0)
    for name in ("annotations/instances_train2017.json", "annotations/instances_val2017.json",
                 "train2017/000000000007.jpg", "val2017/000000000005.jpg"):
        assert (demo_root / name).read_bytes() == (again / name).read_bytes()
    other = generate_demo_dataset(tmp_path / "other", 40, 5, SIZE, seed=1)
    assert _json(other)["annotations"] != _json(demo_root)["annotations"]
    assert _json(demo_root, "val")["annotations"] != _json(demo_root)["annotations"][:len(_json(demo_root, "val"))]


def test_coco_layout_and_non_contiguous_categories(demo_root):
    train, val = _json(demo_root), _json(demo_root, "val")
    assert [(c["id"], c["name"]) for c in train["categories"]] == [(1, "rectangle"), (3, "ellipse"), (7, "triangle")]
    assert (len(train["images"]), len(val["images"])) == (40, 5)
    counts = np.bincount([a["image_id"] for a in train["annotations"]], minlength=41)[1:]
    assert counts.min() >= 1 and counts.max() <= 6 and len(set(counts.tolist())) >= 4
    assert {a["category_id"] for a in train["annotations"]} == {1, 3, 7}
    assert len({a["id"] for a in train["annotations"]}) == len(train["annotations"])
    for image in train["images"]:
        with Image.open(demo_root / "train2017" / image["file_name"]) as f:
            assert f.format == "JPEG" and f.size == (SIZE, SIZE) and f.mode == "RGB"


def test_boxes_are_tight_and_match_the_jpeg_pixels(demo_root):
    train = _json(demo_root)
    lo, hi = math.ceil(SIZE_RANGE[0] * SIZE), math.floor(SIZE_RANGE[1] * SIZE)
    widths = []
    for image in train["images"][:20]:
        index = image["id"] - 1
        _, objects = render_scene(np.random.default_rng([0, SPLIT_CODES["train"], index]), SIZE)
        anns = [a for a in train["annotations"] if a["image_id"] == image["id"]]
        assert [a["bbox"] for a in anns] == [obj.bbox_xywh() for obj in objects]
        pixels = np.asarray(Image.open(demo_root / "train2017" / image["file_name"]), dtype=np.float32)
        for ann, obj in zip(anns, objects):
            x, y, w, h = ann["bbox"]
            inside = np.zeros_like(obj.mask)
            inside[y:y + h, x:x + w] = True
            assert obj.mask[inside].any() and not obj.mask[~inside].any()
            # the shape touches all four sides of its box
            assert obj.mask[y].any() and obj.mask[y + h - 1].any()
            assert obj.mask[:, x].any() and obj.mask[:, x + w - 1].any()
            assert ann["area"] == int(obj.mask.sum()) >= obj.full_area / 2  # at most half hidden
            # the JPEG shows the object's colour on its pixels (catches x/y mix-ups and misplaced boxes)
            distance = np.linalg.norm(pixels[obj.mask] - np.asarray(obj.colour), axis=1)
            assert np.median(distance) < 25
            if ann["area"] == obj.full_area:  # unoccluded: the drawn size rules hold
                assert lo - 1 <= w <= hi and lo - 1 <= h <= hi
                widths.append(w)
    assert min(widths) < SIZE * 0.25 and max(widths) > SIZE * 0.45  # small and large objects both occur


def test_complete_dataset_is_reused(demo_root):
    files = [demo_root / "annotations" / "instances_train2017.json", demo_root / "train2017" / "000000000001.jpg"]
    before = [f.stat().st_mtime_ns for f in files]
    assert generate_demo_dataset(demo_root, 40, 5, SIZE, seed=0) == demo_root
    assert [f.stat().st_mtime_ns for f in files] == before


def test_partial_or_different_dataset_is_regenerated(tmp_path):
    root = generate_demo_dataset(tmp_path / "demo", 6, 2, SIZE)
    original = (root / "train2017" / "000000000003.jpg").read_bytes()
    # an interrupted run: in-progress marker instead of the complete one, an image and an annotation file missing
    (root / MARKER).rename(root / IN_PROGRESS)
    (root / "train2017" / "000000000003.jpg").unlink()
    (root / "annotations" / "instances_val2017.json").unlink()
    generate_demo_dataset(root, 6, 2, SIZE)
    assert (root / "train2017" / "000000000003.jpg").read_bytes() == original
    assert (root / "annotations" / "instances_val2017.json").is_file() and (root / MARKER).is_file()
    assert not (root / IN_PROGRESS).exists()
    # a missing image under a complete marker is noticed too
    (root / "val2017" / "000000000001.jpg").unlink()
    generate_demo_dataset(root, 6, 2, SIZE)
    assert (root / "val2017" / "000000000001.jpg").is_file()
    # other parameters: regenerated, no stale images left
    generate_demo_dataset(root, 4, 2, SIZE)
    assert len(_json(root)["images"]) == 4 and len(list((root / "train2017").glob("*.jpg"))) == 4


def test_foreign_folder_is_left_alone(tmp_path):
    (tmp_path / "coco" / "train2017").mkdir(parents=True)
    (tmp_path / "coco" / "train2017" / "real.jpg").write_bytes(b"x")
    with pytest.raises(DatasetError, match="not a generated demo dataset"):
        generate_demo_dataset(tmp_path / "coco", 4, 2, SIZE)
    assert (tmp_path / "coco" / "train2017" / "real.jpg").read_bytes() == b"x"
