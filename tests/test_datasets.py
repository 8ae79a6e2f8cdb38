"""build_dataset on a small hand-made COCO folder (crowd, non-contiguous ids, empty, grayscale, PNG) and on the demo."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Subset

from datasets import (
    DatasetError,
    UnreadableImageError,
    build_dataset,
    collate_fn,
    get_coco_api_from_dataset,
    num_classes_from_coco,
)
from pvt_detr.preprocess import IMAGENET_MEAN, IMAGENET_STD

REPO = Path(__file__).resolve().parents[1]


def _args(**overrides) -> argparse.Namespace:
    values = dict(dataset_file="coco", coco_path=None, aug="pvt", train_sizes=[64], max_size=1000, test_size=64,
                  demo_train_images=6, demo_val_images=3, demo_image_size=64)
    values.update(overrides)
    return argparse.Namespace(**values)


@pytest.fixture()
def coco_root(tmp_path: Path) -> Path:
    """COCO layout; categories 2, 5, 11. Image 10: RGB JPEG 64 x 48 with a normal box, a box running off the image,
    a crowd box and a zero-width box; 20: grayscale JPEG; 30: RGBA PNG without boxes; 40: palette PNG."""
    root = tmp_path / "coco"
    for split in ("train", "val"):
        (root / f"{split}2017").mkdir(parents=True)
        Image.new("RGB", (64, 48), (200, 30, 30)).save(root / f"{split}2017" / "a.jpg")
        Image.new("L", (32, 32), 100).save(root / f"{split}2017" / "b.jpg")
        Image.new("RGBA", (40, 40), (0, 255, 0, 128)).save(root / f"{split}2017" / "c.png")
        Image.new("P", (64, 48), 3).save(root / f"{split}2017" / "d.png")
    images = [{"id": 10, "file_name": "a.jpg", "height": 48, "width": 64},
              {"id": 20, "file_name": "b.jpg", "height": 32, "width": 32},
              {"id": 30, "file_name": "c.png", "height": 40, "width": 40},
              {"id": 40, "file_name": "d.png", "height": 48, "width": 64}]
    annotations = [
        {"id": 1, "image_id": 10, "category_id": 5, "bbox": [8, 8, 16, 16], "area": 256, "iscrowd": 0},
        {"id": 2, "image_id": 10, "category_id": 11, "bbox": [40, 20, 30, 40], "area": 1200, "iscrowd": 0},
        {"id": 3, "image_id": 10, "category_id": 2, "bbox": [0, 0, 64, 48], "area": 3072, "iscrowd": 1},
        {"id": 4, "image_id": 10, "category_id": 2, "bbox": [10, 10, 0, 5], "area": 0, "iscrowd": 0},
        {"id": 5, "image_id": 20, "category_id": 2, "bbox": [0, 0, 32, 32], "area": 1024, "iscrowd": 0},
        {"id": 6, "image_id": 40, "category_id": 11, "bbox": [16, 12, 32, 24], "area": 768, "iscrowd": 0},
    ]
    categories = [{"id": i, "name": f"c{i}"} for i in (2, 5, 11)]
    (root / "annotations").mkdir()
    for split in ("train", "val"):
        coco = {"images": images, "annotations": annotations, "categories": categories}
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(coco))
    return root


def _by_id(dataset) -> dict[int, tuple[torch.Tensor, dict]]:
    return {int(t["image_id"]): (img, t) for img, t in (dataset[i] for i in range(len(dataset)))}


def test_val_targets(coco_root):
    dataset = build_dataset("val", _args(coco_path=str(coco_root)))
    items = _by_id(dataset)
    assert sorted(items) == [10, 20, 30, 40]

    image, target = items[10]  # 64 x 48 -> short side 64: 85 x 64
    assert tuple(image.shape) == (3, 64, 85)
    assert target["labels"].tolist() == [5, 11]  # crowd and zero-width boxes dropped, ids kept as they are
    # cxcywh / (W, H); the second box is clamped from x 40..70, y 20..60 to x 40..64, y 20..48
    torch.testing.assert_close(target["boxes"], torch.tensor([[16 / 64, 16 / 48, 16 / 64, 16 / 48],
                                                              [52 / 64, 34 / 48, 24 / 64, 28 / 48]]))
    # the annotations' areas scaled by the resize, as in DETR (the clamped box keeps its annotated area)
    torch.testing.assert_close(target["area"], torch.tensor([256 * 85 / 64 * 4 / 3, 1200 * 85 / 64 * 4 / 3]))
    assert target["iscrowd"].tolist() == [0, 0]
    assert target["orig_size"].tolist() == [48, 64] and target["size"].tolist() == [64, 85]
    assert target["labels"].dtype == torch.int64 and target["image_id"].dtype == torch.int64
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    rgb = (image * std + mean).mean(dim=(1, 2))
    torch.testing.assert_close(rgb, torch.tensor([200, 30, 30]) / 255, atol=0.02, rtol=0)

    image, target = items[20]  # grayscale -> 3 equal channels
    assert image.shape[0] == 3
    gray = image * std + mean
    torch.testing.assert_close(gray[0], gray[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.5, 0.5, 1.0, 1.0]]))

    image, target = items[30]  # RGBA PNG, no annotations
    assert image.shape[0] == 3 and target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64

    image, target = items[40]  # palette PNG
    assert image.shape[0] == 3 and target["labels"].tolist() == [11]
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.5, 0.5, 0.5, 0.5]]))


def test_train_targets_are_flipped_or_not_and_collate(coco_root):
    dataset = build_dataset("train", _args(coco_path=str(coco_root)))
    torch.manual_seed(0)
    flips = set()
    for _ in range(12):
        _, target = dataset[0]  # image 10
        assert target["labels"].tolist() == [5, 11]
        plain = torch.tensor([[16 / 64, 16 / 48, 16 / 64, 16 / 48], [52 / 64, 34 / 48, 24 / 64, 28 / 48]])
        flipped = plain.clone()
        flipped[:, 0] = 1 - flipped[:, 0]
        flips.add(bool(torch.allclose(target["boxes"], flipped)))
        assert torch.allclose(target["boxes"], flipped) or torch.allclose(target["boxes"], plain)
    assert flips == {True, False}

    samples, targets = next(iter(DataLoader(dataset, batch_size=4, collate_fn=collate_fn)))
    assert [int(t["image_id"]) for t in targets] == [10, 20, 30, 40]
    assert samples.tensors.shape[-2] % 32 == 0 and samples.tensors.shape[-1] % 32 == 0
    assert samples.image_sizes == [tuple(t["size"].tolist()) for t in targets]


def test_coco_helpers(coco_root):
    dataset = build_dataset("val", _args(coco_path=str(coco_root)))
    assert isinstance(dataset, torchvision.datasets.CocoDetection)  # torchvision's, indexing the cleaned annotations
    assert dataset.ids == sorted(dataset.coco.imgs) and len(dataset) == len(dataset.ids)
    assert num_classes_from_coco(dataset.coco) == 12
    assert get_coco_api_from_dataset(Subset(Subset(dataset, [0, 1]), [0])) is dataset.coco
    # the evaluator still sees the crowd box; the zero-width box was dropped by the validation (and reported)
    assert len(dataset.coco.getAnnIds(imgIds=[10])) == 3
    assert dataset.report.fix_counts() == {"zero_area": 1, "clamped": 1}


def test_missing_paths_name_the_path(tmp_path, coco_root):
    with pytest.raises(DatasetError, match="--coco_path"):
        build_dataset("train", _args())
    with pytest.raises(DatasetError, match=str(tmp_path / "nowhere")):
        build_dataset("train", _args(coco_path=str(tmp_path / "nowhere")))
    (coco_root / "annotations" / "instances_val2017.json").unlink()
    with pytest.raises(DatasetError, match="instances_val2017.json") as info:
        build_dataset("val", _args(coco_path=str(coco_root)))
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)
    (coco_root / "train2017").rename(coco_root / "elsewhere")
    with pytest.raises(DatasetError, match="train2017"):
        build_dataset("train", _args(coco_path=str(coco_root)))


def test_unreadable_image_names_the_file(coco_root, capsys):
    (coco_root / "val2017" / "a.jpg").write_bytes(b"not a jpeg")
    dataset = build_dataset("val", _args(coco_path=str(coco_root)))
    assert dataset[0] is None  # skipped, with a warning naming the file
    assert "warning: skipping image: cannot read image" in capsys.readouterr().err
    dataset.skip_unreadable = False
    with pytest.raises(UnreadableImageError, match="a.jpg"):
        dataset[0]


def test_demo_is_generated_and_loaded_like_coco(tmp_path):
    args = _args(dataset_file="demo", coco_path=str(tmp_path / "demo"))
    train, val = build_dataset("train", args), build_dataset("val", args)
    assert (len(train), len(val)) == (6, 3)
    assert num_classes_from_coco(val.coco) == 8
    gt = json.loads((tmp_path / "demo" / "annotations" / "instances_val2017.json").read_text())
    for index in range(len(val)):
        image, target = val[index]  # 64 px images, test_size 64: no resizing
        assert tuple(image.shape) == (3, 64, 64)
        anns = [a for a in gt["annotations"] if a["image_id"] == int(target["image_id"])]
        assert target["labels"].tolist() == [a["category_id"] for a in anns]
        expected = torch.tensor([[x + w / 2, y + h / 2, w, h] for x, y, w, h in (a["bbox"] for a in anns)]) / 64
        torch.testing.assert_close(target["boxes"], expected)
    samples, targets = collate_fn([train[0], train[1]])
    assert tuple(samples.tensors.shape) == (2, 3, 64, 64) and len(targets) == 2


def test_our_datasets_package_is_not_importable_from_elsewhere(tmp_path):
    """The Hugging Face `datasets` (or nothing) is what `import datasets` finds outside the repository root."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = "import importlib.util as u; s = u.find_spec('datasets'); print(s.origin if s else 'none')"
    outside = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                             check=True).stdout.strip()
    assert not outside.startswith(str(REPO)), outside
    inside = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            check=True).stdout.strip()
    assert inside == str(REPO / "datasets" / "__init__.py")
