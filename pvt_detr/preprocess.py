"""The evaluation image transform, shared by `datasets/` (validation) and inference code.

One pipeline for both, so a model is always evaluated on exactly the pixels it is served:
resize the short side to `test_size` (long side capped at `max_size`, DETR's rule), convert to a
float tensor in [0, 1] and normalise with the ImageNet statistics. Built from
`torchvision.transforms.v2`, so it accepts an image alone or `(image, target)` with the target's
`tv_tensors.BoundingBoxes` resized along with the image.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resized_size(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
    """(new_h, new_w) that `build_eval_transform(short, max_size)` gives an h x w image.

    The short side becomes `short` unless that makes the long side exceed `max_size`; then the long
    side becomes `max_size` and the short side follows the aspect ratio (rounded down, as torchvision).
    """
    short_side, long_side = min(h, w), max(h, w)
    if max_size <= short:  # the cap always binds
        new_short, new_long = int(max_size * short_side / long_side), max_size
    else:
        new_short, new_long = short, int(short * long_side / short_side)
        if new_long > max_size:
            new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_short, new_long) if h <= w else (new_long, new_short)


def to_normalized_tensor() -> v2.Compose:
    """PIL/uint8 image -> float32 (3, H, W) tensor normalised with the ImageNet mean and std."""
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def build_eval_transform(test_size: int, max_size: int) -> v2.Compose:
    """Short side -> `test_size` (long side <= `max_size`), then `to_normalized_tensor()`.

    Call it as `transform(image)` or `transform(image, target)`; boxes in the target must be
    `tv_tensors.BoundingBoxes` to be resized with the image.
    """
    if max_size > test_size:
        resize = v2.Resize(test_size, max_size=max_size)
    else:  # torchvision rejects max_size <= size; then the long side is what decides
        resize = v2.Resize(None, max_size=max_size)
    return v2.Compose([resize, to_normalized_tensor()])
