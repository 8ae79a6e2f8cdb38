"""Per-sample augmentation seeds and resumable shuffles (training/sampling.py)."""

import torch
from torch.utils.data import Dataset

from training.sampling import EpochSeededDataset, ResumableSampler


class RandomDraws(Dataset):
    """Each item is three draws from the global CPU generator, like a random augmentation."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.rand(3)  # (3,)


def test_sample_draws_depend_only_on_seed_epoch_and_index_and_leave_the_global_generator_alone():
    data = EpochSeededDataset(RandomDraws(), seed=5)
    data.set_epoch(2)
    first = data[3]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    torch.rand(17)  # unrelated draws in between must not change sample 3 of epoch 2
    again = data[3]
    assert torch.equal(first, again)
    assert not torch.equal(data[3], data[4])
    data.set_epoch(3)
    assert not torch.equal(data[3], first)
    # The wrapper restores the caller's generator: the next global draw is the one it would have been.
    torch.set_rng_state(state)
    expected = torch.rand(17), torch.rand(2)
    torch.set_rng_state(state)
    torch.rand(17)
    data[5]
    assert torch.equal(torch.rand(2), expected[1])


def test_resumable_sampler_skips_exactly_the_samples_already_done():
    sampler = ResumableSampler(RandomDraws(), seed=1)
    sampler.set_epoch(4)
    full = list(sampler)
    sampler.set_epoch(4, start=5)
    assert list(sampler) == full[5:] and len(sampler) == 3
    assert sorted(full) == list(range(8))
