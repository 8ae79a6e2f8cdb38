"""The evaluation image transform, shared by `datasets/` (validation) and inference code.

One pipeline for both, so a model is always evaluated on exactly the pixels it is served:
resize the short side to `test_size` (long side capped at `max_size`, DETR's rule), convert to a
float tensor in [0, 1] and normalise with the ImageNet statistics. Built from
`torchvision.transforms.v2`, so it accepts an image alone or `(image, target)` with the target's
`tv_tensors.BoundingBoxes` resized along with the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import PIL.Image
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resized_size(h: int, w: int, short: int, max_size: int | None) -> tuple[int, int]:
    """(new_h, new_w) that `ShortSideResize([short], max_size)` gives an h x w image.

    The short side becomes `short` unless that makes the long side exceed `max_size`; then the long
    side becomes `max_size` and the short side follows the aspect ratio (rounded down, as torchvision's
    `Resize`, but never below 1 pixel, so that images of any aspect ratio can be resized).
    """
    short_side, long_side = min(h, w), max(h, w)
    if max_size is not None and max_size <= short:  # the cap always binds
        new_short, new_long = int(max_size * short_side / long_side), max_size
    else:
        new_short, new_long = short, int(short * long_side / short_side)
        if max_size is not None and new_long > max_size:
            new_short, new_long = int(max_size * new_short / new_long), max_size
    new_short = max(new_short, 1)
    return (new_short, new_long) if h <= w else (new_long, new_short)


class ShortSideResize(v2.Transform):
    """Resizes the short side to one of `sizes` (drawn uniformly per call) with the long side <= `max_size`.

    DETR's resize rule (`resized_size`) for images and everything transformed with them (boxes, masks).
    """

    def __init__(self, sizes: Sequence[int], max_size: int | None = None):
        super().__init__()
        if not sizes or min(sizes) < 1 or (max_size is not None and max_size < 1):
            raise ValueError(f"need sizes >= 1 and max_size >= 1, got {list(sizes)}, {max_size}")
        self.sizes = list(sizes)
        self.max_size = max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        images = [i for i in flat_inputs if isinstance(i, (PIL.Image.Image, tv_tensors.Image))
                  or (isinstance(i, torch.Tensor) and not isinstance(i, tv_tensors.TVTensor))]
        h, w = v2.functional.get_size(images[0] if images else flat_inputs[0])
        # one size draws nothing, so evaluation leaves the random stream of training untouched
        short = self.sizes[int(torch.randint(len(self.sizes), ()))] if len(self.sizes) > 1 else self.sizes[0]
        return {"size": list(resized_size(h, w, short, self.max_size))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return v2.functional.resize(inpt, params["size"], antialias=True)


def to_normalized_tensor() -> v2.Compose:
    """PIL/uint8 image -> float32 (3, H, W) tensor normalised with the ImageNet mean and std."""
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def build_eval_transform(test_size: int, max_size: int) -> v2.Compose:
    """Short side -> `test_size` (long side <= `max_size`), then `to_normalized_tensor()`.

    Call it as `transform(image)` or `transform(image, target)`; boxes in the target must be
    `tv_tensors.BoundingBoxes` to be resized with the image.
    """
    return v2.Compose([ShortSideResize([test_size], max_size), to_normalized_tensor()])
