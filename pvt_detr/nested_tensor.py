"""NestedTensor: a zero-padded image batch with its padding mask (as in facebookresearch/detr)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


class NestedTensor:
    """A batch of images padded to one size.

    tensors: (B, C, H, W) zero-padded pixels.
    mask:    (B, H, W) bool, True on padding, False on real pixels.
    """

    def __init__(self, tensors: torch.Tensor, mask: torch.Tensor | None):
        self.tensors = tensors
        self.mask = mask

    def to(self, device, non_blocking: bool = False) -> NestedTensor:
        mask = None if self.mask is None else self.mask.to(device, non_blocking=non_blocking)
        return NestedTensor(self.tensors.to(device, non_blocking=non_blocking), mask)

    def decompose(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.tensors, self.mask

    @property
    def image_sizes(self) -> list[tuple[int, int]]:
        """Unpadded (h, w) of every image, read off the mask."""
        if self.mask is None:
            h, w = self.tensors.shape[-2:]
            return [(h, w)] * self.tensors.shape[0]
        valid = ~self.mask  # (B, H, W)
        heights = valid.any(dim=2).sum(dim=1)  # (B,)
        widths = valid.any(dim=1).sum(dim=1)  # (B,)
        return [(int(h), int(w)) for h, w in zip(heights, widths)]

    def __repr__(self) -> str:
        mask = None if self.mask is None else tuple(self.mask.shape)
        return f"NestedTensor(tensors={tuple(self.tensors.shape)}, mask={mask})"


def valid_sizes(mask: torch.Tensor) -> torch.Tensor:
    """(B, H, W) padding mask (True = padding) -> (B, 2) int64 [h, w] unpadded extent of every image.

    The tensor form of `NestedTensor.image_sizes` (no Python ints, so it can be exported).
    """
    valid = ~mask  # (B, H, W)
    return torch.stack((valid.any(dim=2).sum(dim=1), valid.any(dim=1).sum(dim=1)), dim=1)  # (B, 2)


def nested_tensor_from_tensor_list(images: Sequence[torch.Tensor], size_divisibility: int = 32) -> NestedTensor:
    """Pads (C, H_i, W_i) images at the bottom/right to a common size that is a multiple of `size_divisibility`."""
    if len(images) == 0:
        raise ValueError("nested_tensor_from_tensor_list needs at least one image")
    if any(img.dim() != 3 for img in images):
        raise ValueError(f"expected (C, H, W) images, got shapes {[tuple(i.shape) for i in images]}")
    channels = images[0].shape[0]
    max_h = max(img.shape[1] for img in images)
    max_w = max(img.shape[2] for img in images)
    if size_divisibility > 1:
        max_h = int(math.ceil(max_h / size_divisibility) * size_divisibility)
        max_w = int(math.ceil(max_w / size_divisibility) * size_divisibility)
    batch = images[0].new_zeros((len(images), channels, max_h, max_w))  # (B, C, H, W)
    mask = torch.ones((len(images), max_h, max_w), dtype=torch.bool, device=images[0].device)  # (B, H, W)
    for img, pad_img, m in zip(images, batch, mask):
        pad_img[:, : img.shape[1], : img.shape[2]].copy_(img)
        m[: img.shape[1], : img.shape[2]] = False
    return NestedTensor(batch, mask)


def downsample_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of a (B, H, W) padding mask to (B, h, w), as DETR does per feature map."""
    return F.interpolate(mask[:, None].float(), size=size, mode="nearest")[:, 0].bool()  # (B, h, w)
