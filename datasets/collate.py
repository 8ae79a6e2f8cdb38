"""Batching for the DataLoader: images padded into a NestedTensor, targets kept as a tuple of dicts."""

from __future__ import annotations

import torch

from pvt_detr.nested_tensor import NestedTensor, nested_tensor_from_tensor_list


def collate_fn(batch: list[tuple[torch.Tensor, dict]]) -> tuple[NestedTensor, tuple[dict, ...]]:
    """[(image (3, H_i, W_i), target), ...] -> (NestedTensor (B, 3, H, W) padded to multiples of 32, targets)."""
    images, targets = zip(*batch)
    return nested_tensor_from_tensor_list(list(images), size_divisibility=32), tuple(targets)
