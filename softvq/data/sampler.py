"""Deterministic, resumable, process-independent batches of a map-style data set.

The data a run sees is one endless stream: epoch ``e`` is a permutation of the ``n`` items drawn
from (seed, e), and the epochs are concatenated. Global micro-batch ``m`` is the slice
``[m * B, (m + 1) * B)`` of that stream (``B`` = images of one micro-batch summed over processes),
and process ``r`` of ``W`` takes the ``r``-th of its ``W`` equal parts. Hence:

* one process with batch B and W processes with B / W each see exactly the same images per step;
* resuming at stream position ``p`` continues the very same stream;
* every sample carries its stream position, from which its augmentation RNG is made.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


class StreamBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields this process's share of each global micro-batch as ``[(item_index, position), ...]``.

    Args:
        num_items: size of the data set.
        global_batch: images per micro-batch summed over all processes.
        rank / world_size: this process and the number of processes.
        seed: the run seed (epoch permutations).
        start: stream position to begin at (``consumed micro-batches * global_batch``).
        shuffle: permute each epoch (False: items in order, for evaluation).
    """

    def __init__(self, num_items: int, global_batch: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, start: int = 0, shuffle: bool = True) -> None:
        if num_items < 1:
            raise ValueError("the training set is empty")
        if global_batch % world_size:
            raise ValueError(
                f"the global micro-batch {global_batch} is not divisible by the {world_size} processes; "
                f"change schedule.batch_size or schedule.grad_accum"
            )
        self.num_items = num_items
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.rank = rank
        self.seed = seed
        self.start = start
        self.shuffle = shuffle
        self._cache: tuple[int, np.ndarray] | None = None

    def order(self, epoch: int) -> np.ndarray:
        """The item order of ``epoch``: a permutation seeded by (seed, epoch) when shuffling."""
        if self._cache is None or self._cache[0] != epoch:
            perm = (np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
                    if self.shuffle else np.arange(self.num_items))
            self._cache = (epoch, perm)
        return self._cache[1]

    def item_at(self, position: int) -> int:
        """The item index at stream ``position`` (epochs follow each other)."""
        epoch, offset = divmod(position, self.num_items)
        return int(self.order(epoch)[offset])

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        position = self.start
        while True:
            first = position + self.rank * self.local_batch
            yield [(self.item_at(p), p) for p in range(first, first + self.local_batch)]
            position += self.global_batch

    def __len__(self) -> int:  # endless; DataLoader only needs it for len(loader)
        return 2**62
