"""COCO detection with DETR targets (after facebookresearch/detr `datasets/coco.py`).

Pipeline per image: COCO annotations -> `coco_target` (XYXY `tv_tensors.BoundingBoxes` in pixels,
crowd dropped, clamped, degenerate boxes removed) -> a `torchvision.transforms.v2` pipeline on
`(image, target)` -> `to_detr_target` (cxcywh normalised by the transformed, unpadded size).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torchvision
from PIL import Image
from torchvision import tv_tensors
from torchvision.ops import box_area
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from datasets.errors import UnreadableImageError


def per_box_fields(inputs: Any) -> tuple[torch.Tensor, ...]:
    """`labels_getter` for `v2.SanitizeBoundingBoxes`: the target tensors indexed like the boxes."""
    target = inputs[1] if isinstance(inputs, (tuple, list)) else inputs
    return tuple(target[key] for key in ("labels", "iscrowd") if key in target)


def sanitize_boxes() -> v2.SanitizeBoundingBoxes:
    """Drops boxes narrower or lower than 1 pixel (or outside the image) with their labels and iscrowd."""
    return v2.SanitizeBoundingBoxes(labels_getter=per_box_fields)


def coco_target(annotations: list[dict], image_id: int, height: int, width: int, drop_crowd: bool = True) -> dict:
    """COCO annotations of one image -> target dict before transforms.

    boxes: `tv_tensors.BoundingBoxes` (T, 4) XYXY absolute pixels, clamped to the image, boxes under
    1 pixel removed; labels (T,) int64 category ids; iscrowd (T,); image_id; orig_size [h, w].
    """
    if drop_crowd:
        annotations = [a for a in annotations if not a.get("iscrowd", 0)]
    boxes_xywh = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float32).reshape(-1, 4)  # (T, 4)
    boxes = tv_tensors.BoundingBoxes(boxes_xywh, format="XYWH", canvas_size=(height, width))
    boxes = F.clamp_bounding_boxes(F.convert_bounding_box_format(boxes, new_format="XYXY"))  # (T, 4)
    target = {
        "boxes": boxes,
        "labels": torch.tensor([a["category_id"] for a in annotations], dtype=torch.int64),  # (T,)
        "iscrowd": torch.tensor([a.get("iscrowd", 0) for a in annotations], dtype=torch.int64),  # (T,)
        "image_id": torch.tensor(image_id, dtype=torch.int64),
        "orig_size": torch.tensor([height, width], dtype=torch.int64),
    }
    return sanitize_boxes()(target)


def to_detr_target(image: torch.Tensor, target: dict) -> dict:
    """Transformed (image (3, H, W), target with XYXY pixel boxes) -> DETR's target of plain tensors.

    boxes (T, 4) cxcywh normalised by (W, H); area (T,) box area in transformed pixels; size [H, W].
    """
    height, width = image.shape[-2:]
    boxes_xyxy = F.convert_bounding_box_format(target["boxes"], new_format="XYXY").as_subclass(torch.Tensor)  # (T, 4)
    boxes_cxcywh = torchvision.ops.box_convert(boxes_xyxy, "xyxy", "cxcywh")  # (T, 4)
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    out = {key: value for key, value in target.items() if key != "boxes"}
    out["boxes"] = boxes_cxcywh / scale  # (T, 4)
    out["area"] = box_area(boxes_xyxy)  # (T,)
    out["size"] = torch.tensor([height, width], dtype=torch.int64)
    return out


def load_rgb(path: str) -> Image.Image:
    """Opens any PIL-readable image (grayscale, palette, RGBA, PNG, ...) as RGB."""
    try:
        with Image.open(path) as image:
            if image.mode == "P" and "transparency" in image.info:
                image = image.convert("RGBA")  # PIL warns when palette transparency goes straight to RGB
            return image.convert("RGB")
    except OSError as err:  # includes PIL.UnidentifiedImageError and truncated files
        raise UnreadableImageError(f"cannot read image {path}: {err}") from err


class CocoDetection(torchvision.datasets.CocoDetection):
    """`torchvision.datasets.CocoDetection` returning `(image (3, H, W) float, DETR target dict)`.

    transforms: a v2 transform called as `transforms(image, target)`; it must end with a tensor
    image (e.g. `datasets.transforms.build_transform`). Crowd boxes are dropped as in DETR
    (pycocotools still sees them through `.coco` when evaluating).
    """

    def __init__(self, img_folder: str, ann_file: str, transforms: Callable, drop_crowd: bool = True):
        super().__init__(img_folder, ann_file)
        self.detection_transforms = transforms
        self.drop_crowd = drop_crowd

    def _load_image(self, id: int) -> Image.Image:
        return load_rgb(os.path.join(self.root, self.coco.loadImgs(id)[0]["file_name"]))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        image_id = self.ids[index]
        image = self._load_image(image_id)
        target = coco_target(self._load_target(image_id), image_id, image.height, image.width, self.drop_crowd)
        image, target = self.detection_transforms(image, target)
        return image, to_detr_target(image, target)


def num_classes_from_coco(coco) -> int:
    """DETR's `num_classes`: max category id + 1 (91 for COCO)."""
    return max(coco.getCatIds()) + 1
