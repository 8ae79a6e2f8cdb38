"""COCO detection with DETR targets (after facebookresearch/detr `datasets/coco.py`).

Pipeline per image: COCO annotations -> `coco_target` (XYXY `tv_tensors.BoundingBoxes` in pixels,
crowd dropped, clamped, degenerate boxes removed) -> a `torchvision.transforms.v2` pipeline on
`(image, target)` -> `to_detr_target` (cxcywh normalised by the transformed, unpadded size).

The annotation file is checked and repaired by `datasets.validation` before pycocotools indexes it. Images
are decoded as 8-bit RGB in the frame the annotations use (EXIF orientation applied, 16-bit scaled); an image
that cannot be read (missing, truncated, corrupt) is skipped with a warning: the dataset returns None for it
and `collate_fn` drops it from its batch.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
import torchvision
from PIL import Image
from pycocotools.coco import COCO
from torchvision import tv_tensors
from torchvision.ops import box_area
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from datasets.errors import UnreadableImageError
from datasets.validation import validate_coco_file
from pvt_detr.image_io import ImageReadError, read_image


def per_box_fields(inputs: Any) -> tuple[torch.Tensor, ...]:
    """`labels_getter` for `v2.SanitizeBoundingBoxes`: the target tensors indexed like the boxes."""
    target = inputs[1] if isinstance(inputs, (tuple, list)) else inputs
    return tuple(target[key] for key in ("labels", "iscrowd", "area", "box_area") if key in target)


def sanitize_boxes() -> v2.SanitizeBoundingBoxes:
    """Drops boxes narrower or lower than 1 pixel (or outside the image) with their labels and iscrowd."""
    return v2.SanitizeBoundingBoxes(labels_getter=per_box_fields)


def coco_target(annotations: list[dict], image_id: int, height: int, width: int, drop_crowd: bool = True) -> dict:
    """COCO annotations of one image -> target dict before transforms.

    boxes: `tv_tensors.BoundingBoxes` (T, 4) XYXY absolute pixels, clamped to the image, boxes under
    1 pixel removed; labels (T,) int64 category ids; iscrowd (T,); area (T,) the annotations' `area` (COCO's
    segmentation area; the box's if absent); box_area (T,) of the clamped boxes, which `to_detr_target` uses to
    scale `area` with the transforms; image_id; orig_size [h, w].
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
        "area": torch.tensor([float(a["area"]) if "area" in a else float(a["bbox"][2] * a["bbox"][3])
                              for a in annotations], dtype=torch.float32),  # (T,)
        "box_area": box_area(boxes.as_subclass(torch.Tensor)),  # (T,)
        "image_id": torch.tensor(image_id, dtype=torch.int64),
        "orig_size": torch.tensor([height, width], dtype=torch.int64),
    }
    return sanitize_boxes()(target)


def to_detr_target(image: torch.Tensor, target: dict) -> dict:
    """Transformed (image (3, H, W), target with XYXY pixel boxes) -> DETR's target of plain tensors.

    boxes (T, 4) cxcywh normalised by (W, H), within [0, 1]; size [H, W]; area (T,) in transformed pixels: the
    annotation's area times the factor by which the transforms scaled its box's area (DETR's area, the segmentation
    area scaled by the resize; a crop keeps the part of it in proportion to the box part kept), or the box area
    for a target without `area`.
    """
    height, width = image.shape[-2:]
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    boxes_xyxy = F.convert_bounding_box_format(target["boxes"], new_format="XYXY").as_subclass(torch.Tensor)  # (T, 4)
    # Resizing scales coordinates in float32: a box edge on the image border can land a hair outside it.
    boxes_xyxy = torch.minimum(boxes_xyxy.clamp(min=0), scale)  # (T, 4)
    boxes_cxcywh = torchvision.ops.box_convert(boxes_xyxy, "xyxy", "cxcywh")  # (T, 4)
    out = {key: value for key, value in target.items() if key not in ("boxes", "box_area")}
    out["boxes"] = boxes_cxcywh / scale  # (T, 4)
    area = box_area(boxes_xyxy)  # (T,)
    if "area" in target and "box_area" in target:
        area = target["area"] * area / target["box_area"].clamp_min(1e-6)  # (T,)
    out["area"] = area
    out["size"] = torch.tensor([height, width], dtype=torch.int64)
    return out


_warned: set[str] = set()  # files already warned about in this process


def warn_once(path: str, message: str) -> None:
    """A warning line on stderr, once per file and process (every rank and loader worker prints its own)."""
    if path not in _warned:
        _warned.add(path)
        sys.stderr.write(f"warning: {message}\n")


def load_rgb(path: str, expected_size: tuple[int, int] | None = None) -> Image.Image:
    """Decodes a dataset image as 8-bit RGB in its displayed orientation, fitted to the annotation's
    (width, height) (see `pvt_detr.image_io.read_image`; each fix warns once per file).
    Raises UnreadableImageError (naming the file) for a missing, truncated or corrupt file.
    """
    try:
        return read_image(path, expected_size, warn=warn_once)
    except ImageReadError as err:
        raise UnreadableImageError(str(err)) from None


class CocoDetection(torchvision.datasets.CocoDetection):
    """torchvision's CocoDetection returning `(image (3, H, W) float, DETR target dict)`, or None for an unreadable
    image.

    img_folder, ann_file: COCO layout. The annotation file is validated and repaired first
    (`datasets.validation`; a one-line summary is printed); `.coco` is the pycocotools COCO of the cleaned
    annotations (torchvision's would index the raw file) and `.report` the validation report. More than
    `max_bad_images` (a fraction) of the listed image files missing on disk is a DatasetError.
    transforms: a v2 transform called as `transforms(image, target)`; it must end with a tensor
    image (e.g. `datasets.transforms.build_transform`). Crowd boxes are dropped as in DETR
    (pycocotools still sees them through `.coco` when evaluating).
    skip_unreadable: return None (after a warning naming the file) for an image that cannot be read,
    instead of raising UnreadableImageError.
    """

    def __init__(self, img_folder: str, ann_file: str, transforms: Callable, drop_crowd: bool = True,
                 skip_unreadable: bool = True, max_bad_images: float | None = None):
        # torchvision.datasets.CocoDetection.__init__ would parse ann_file again, unvalidated: set up its state here.
        torchvision.datasets.VisionDataset.__init__(self, img_folder, transforms=transforms)
        dataset, self.report = validate_coco_file(ann_file, img_folder, max_missing_fraction=max_bad_images)
        print(f"data: {self.report.summary()}", flush=True)
        self.coco = coco_from_dict(dataset)
        self.ids = sorted(self.coco.imgs)
        self.drop_crowd = drop_crowd
        self.skip_unreadable = skip_unreadable

    def _load_image(self, id: int) -> Image.Image:
        info = self.coco.imgs[id]
        return load_rgb(os.path.join(self.root, info["file_name"]), (info["width"], info["height"]))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict] | None:
        image_id = self.ids[index]
        try:
            image = self._load_image(image_id)
        except UnreadableImageError as err:
            if not self.skip_unreadable:
                raise
            sys.stderr.write(f"warning: skipping image: {err}\n")
            return None
        target = coco_target(self._load_target(image_id), image_id, image.height, image.width, self.drop_crowd)
        image, target = self.transforms(image, target)
        return image, to_detr_target(image, target)


def coco_from_dict(dataset: dict) -> COCO:
    """A pycocotools COCO index over an already loaded (and validated) annotation dict, without its chatter."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def num_classes_from_coco(coco) -> int:
    """DETR's `num_classes`: max category id + 1 (91 for COCO)."""
    return max(coco.getCatIds()) + 1
