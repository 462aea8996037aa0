"""Iteration-based sampling: an endless, shuffled stream of samples sharded over the ranks.

The global stream is a concatenation of seeded permutations of the dataset. Iteration ``i`` uses
positions ``[i*B, (i+1)*B)`` of it (``B`` the global batch size) and rank ``r`` of ``N`` takes the
``r``-th contiguous chunk of ``B/N`` of them, so the samples of an iteration do not depend on ``N``.
Each sample also gets a seed derived from its global position, which drives its augmentation: a
run on 1 or N processes, or a resumed run, sees exactly the same augmented samples.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


class InfiniteShardedSampler(Sampler):
    """Yields ``(dataset_index, sample_seed)`` forever, for this rank's share of each batch."""

    def __init__(self, dataset_len: int, global_batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, start_iter: int = 0) -> None:
        if dataset_len < 1:
            raise ValueError("cannot sample from an empty dataset")
        if global_batch_size % world_size:
            raise ValueError(f"global batch size {global_batch_size} is not divisible by "
                             f"{world_size} processes")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        self.dataset_len = dataset_len
        self.global_batch_size = global_batch_size
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.start_iter = start_iter
        self.per_rank = global_batch_size // world_size

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.dataset_len)

    def sample_seed(self, position: int) -> int:
        return int(np.random.SeedSequence([self.seed, position]).generate_state(1)[0])

    def __iter__(self) -> Iterator[tuple[int, int]]:
        iteration = self.start_iter
        epoch, permutation = -1, None
        while True:
            first = iteration * self.global_batch_size + self.rank * self.per_rank
            for position in range(first, first + self.per_rank):
                if position // self.dataset_len != epoch:
                    epoch = position // self.dataset_len
                    permutation = self._permutation(epoch)
                yield int(permutation[position % self.dataset_len]), self.sample_seed(position)
            iteration += 1
