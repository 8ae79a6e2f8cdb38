"""Training and evaluation transforms on `(image, target)` with `torchvision.transforms.v2`.

`--aug pvt` (the PVT paper's mmdet recipe): horizontal flip, short side from `train_sizes`
(long side <= `max_size`), no crop.
`--aug detr` (facebookresearch/detr `make_coco_transforms`): flip, then with probability 1/2 either
the multi-scale resize, or [short side in {400, 500, 600}, random crop with sides in [384, 600],
multi-scale resize]. DETR's crop-branch sizes are tied to its largest scale (800); here they are
scaled by `max(train_sizes) / 800`, which gives DETR's exact numbers for the default sizes and
proportionally smaller ones for tiny demo images (e.g. train_sizes 128 -> {64, 80, 96}, crop 61..96).
Both end with ImageNet normalisation. Evaluation uses `pvt_detr.preprocess.build_eval_transform`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from datasets.coco import sanitize_boxes
from pvt_detr.preprocess import ShortSideResize, build_eval_transform, to_normalized_tensor

DETR_MAX_SCALE = 800  # DETR's largest training short side; its crop-branch sizes below are relative to it
DETR_PRE_CROP_SIZES = (400, 500, 600)
DETR_CROP_RANGE = (384, 600)


class RandomSizeCrop(v2.Transform):
    """Crops a random region with height and width each uniform in [min_size, max_size] (DETR's RandomSizeCrop).

    Sides are capped by the image size, so images smaller than `min_size` are cropped to themselves
    rather than failing. Boxes are clamped by the crop; follow with `v2.SanitizeBoundingBoxes`.
    """

    def __init__(self, min_size: int, max_size: int):
        super().__init__()
        if not 0 < min_size <= max_size:
            raise ValueError(f"need 0 < min_size <= max_size, got {min_size}, {max_size}")
        self.min_size = min_size
        self.max_size = max_size

    def _side(self, length: int) -> int:
        high = min(length, self.max_size)
        low = min(self.min_size, high)
        return int(torch.randint(low, high + 1, ()))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        crop_h, crop_w = self._side(height), self._side(width)
        top = int(torch.randint(0, height - crop_h + 1, ()))
        left = int(torch.randint(0, width - crop_w + 1, ()))
        return dict(top=top, left=left, height=crop_h, width=crop_w)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return F.crop(inpt, **params)


def detr_crop_sizes(train_sizes: Sequence[int]) -> tuple[list[int], tuple[int, int]]:
    """DETR's pre-crop short sides and crop range, scaled by max(train_sizes) / 800."""
    ratio = max(train_sizes) / DETR_MAX_SCALE
    pre_crop = sorted({max(1, round(s * ratio)) for s in DETR_PRE_CROP_SIZES})
    low, high = (max(1, round(s * ratio)) for s in DETR_CROP_RANGE)
    return pre_crop, (low, high)


def train_transform(aug: str, train_sizes: Sequence[int], max_size: int, flip_prob: float = 0.5) -> v2.Compose:
    """The training pipeline on `(PIL image, target)`; see the module docstring for `aug` ("pvt" | "detr")."""
    multi_scale = ShortSideResize(train_sizes, max_size)
    if aug == "pvt":
        geometric = [multi_scale]
    elif aug == "detr":
        pre_crop, (crop_min, crop_max) = detr_crop_sizes(train_sizes)
        crop_branch = v2.Compose([
            ShortSideResize(pre_crop),
            RandomSizeCrop(crop_min, crop_max),
            sanitize_boxes(),  # boxes cropped away entirely
            ShortSideResize(train_sizes, max_size),
        ])
        geometric = [v2.RandomChoice([multi_scale, crop_branch])]
    else:
        raise ValueError(f"unknown augmentation {aug!r}; expected 'pvt' or 'detr'")
    return v2.Compose([v2.RandomHorizontalFlip(p=flip_prob), *geometric, to_normalized_tensor()])


def build_transform(image_set: str, args) -> v2.Compose:
    """Training transform for "train" (from args.aug, args.train_sizes, args.max_size), eval transform otherwise."""
    if image_set == "train":
        return train_transform(args.aug, args.train_sizes, args.max_size)
    return build_eval_transform(args.test_size, args.max_size)
