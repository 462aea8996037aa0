import itertools

import pytest
import torch

from lib.data.sampler import InfiniteShardedSampler


def _batches(sampler, n_iter):
    it = iter(sampler)
    return [list(itertools.islice(it, sampler.per_rank)) for _ in range(n_iter)]


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_union_over_ranks_equals_single_process_stream(world_size):
    single = _batches(InfiniteShardedSampler(10, 4, seed=3), 12)
    ranks = [_batches(InfiniteShardedSampler(10, 4, r, world_size, seed=3), 12)
             for r in range(world_size)]
    for i in range(12):
        assert sum((ranks[r][i] for r in range(world_size)), []) == single[i]


def test_each_epoch_is_a_permutation_and_epochs_differ():
    batches = _batches(InfiniteShardedSampler(10, 5, seed=1), 4)
    stream = [idx for batch in batches for idx, _ in batch]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]
    seeds = [s for batch in batches for _, s in batch]
    assert len(set(seeds)) == len(seeds)  # every sample position gets its own augmentation


def test_start_iter_resumes_at_the_same_place():
    full = _batches(InfiniteShardedSampler(7, 4, 1, 2, seed=0), 9)
    resumed = _batches(InfiniteShardedSampler(7, 4, 1, 2, seed=0, start_iter=5), 4)
    assert resumed == full[5:]


def test_bad_arguments():
    with pytest.raises(ValueError, match="not divisible by 3"):
        InfiniteShardedSampler(10, 4, 0, 3)
    with pytest.raises(ValueError, match="empty"):
        InfiniteShardedSampler(0, 4)


class _Echo(torch.utils.data.Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, item):
        index, seed = item
        return index, seed % 1000


def test_drives_a_dataloader_with_seeded_items():
    sampler = InfiniteShardedSampler(6, 4, rank=1, world_size=2, seed=2)
    assert isinstance(sampler, torch.utils.data.Sampler)
    loader = torch.utils.data.DataLoader(_Echo(), batch_size=2, sampler=sampler)
    batches = list(itertools.islice(iter(loader), 3))
    expected = _batches(InfiniteShardedSampler(6, 4, rank=1, world_size=2, seed=2), 3)
    for (indices, seeds), batch in zip(batches, expected, strict=True):
        assert indices.tolist() == [i for i, _ in batch]
        assert seeds.tolist() == [s % 1000 for _, s in batch]
