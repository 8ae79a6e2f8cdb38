"""Reproducible, resumable data order: per-epoch shuffles that can start mid-epoch, per-sample augmentation seeds.

Together they make a run resumed at (epoch, step) see exactly the batches and augmentations the uninterrupted
run would have seen, on one process or many, with any number of loader workers.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """DistributedSampler (also for a single process) whose epoch can start after the first `start` samples."""

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Epoch number (reshuffles) and how many of this rank's samples of that epoch are already done."""
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self):
        indices = list(super().__iter__())
        return iter(indices[self.start :])

    def __len__(self) -> int:
        return self.num_samples - self.start


class EpochSeededDataset(Dataset):
    """Wraps a dataset so that the random augmentation of sample i in epoch e is a function of (seed, e, i) only."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        # Only the CPU generator (what the transforms draw from) is seeded and restored: torch.manual_seed would
        # also reseed, and not restore, every accelerator's generator, and costs ~1 ms per call recording a
        # stack trace for CUDA's lazy seeding even on machines without CUDA.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed((self.seed * 1_000_003 + self.epoch * 100_003 + index) % (2**63))
            return self.dataset[index]

    def __getattr__(self, name: str):  # `.coco` and friends of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)
