"""Batching for the DataLoader: images padded into a NestedTensor, targets kept as a tuple of dicts.

Items that are None (images the dataset could not read, see `datasets.coco.CocoDetection`) are dropped from
the batch and counted in `Batch.skipped`, so the engine can log them and stop when there are too many.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from pvt_detr.nested_tensor import NestedTensor, nested_tensor_from_tensor_list


def _pin(value):
    return value.pin_memory() if isinstance(value, torch.Tensor) else value


@dataclass
class Batch:
    """A collated batch; unpacks as DETR's pair: `samples, targets = batch`.

    samples: NestedTensor (B, 3, H, W) padded to multiples of 32, or None if no image of the batch could be read.
    targets: one DETR target dict per image in `samples`.
    skipped: images of this batch dropped because they could not be read.
    """

    samples: NestedTensor | None
    targets: tuple[dict, ...]
    skipped: int = 0

    def __iter__(self) -> Iterator:
        return iter((self.samples, self.targets))

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True)."""
        samples = self.samples
        if samples is not None:
            samples = NestedTensor(_pin(samples.tensors), _pin(samples.mask))
        targets = tuple({k: _pin(v) for k, v in t.items()} for t in self.targets)
        return Batch(samples, targets, self.skipped)


def collate_fn(batch: list[tuple[torch.Tensor, dict] | None]) -> Batch:
    """[(image (3, H_i, W_i), target) or None, ...] -> Batch(NestedTensor (B, 3, H, W), targets, skipped)."""
    items = [item for item in batch if item is not None]
    skipped = len(batch) - len(items)
    if not items:
        return Batch(None, (), skipped)
    images, targets = zip(*items)
    return Batch(nested_tensor_from_tensor_list(list(images), size_divisibility=32), tuple(targets), skipped)
