"""Repeated augmentation for map-style data sets (image folders), as DeiT's ``RASampler``.

Shard streams repeat samples themselves (:class:`~beit_lightning.data.ShardStream`'s ``repeats``);
a map-style data set needs a sampler. This one is a ``DistributedSampler``, so Lightning keeps it
(it replaces only plain samplers) and calls its ``set_epoch``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler

__all__ = ["RepeatedAugmentationSampler"]


class RepeatedAugmentationSampler(DistributedSampler):
    """Each epoch: a permutation seeded by ``(seed, epoch)``, every index repeated ``repeats``
    times in a row, dealt round-robin to the ranks (so the copies of an image go to different
    ranks in the same step), and each rank keeps ``floor(N // 256 * 256 / world_size)`` indices:
    an epoch has about as many samples as the data set and holds 1/``repeats`` of its images.

    Args:
        dataset: the data set (only its length is used).
        repeats: copies of each index (DeiT: 3).
        seed: seed of the permutation.
        num_replicas, rank: the data-parallel group; by default read from ``torch.distributed``
            when it is initialised, else one process.
    """

    def __init__(
        self, dataset: Dataset, repeats: int = 3, seed: int = 0, num_replicas: int | None = None, rank: int | None = None
    ) -> None:
        initialised = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if initialised else 1
        if rank is None:
            rank = dist.get_rank() if initialised else 0
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.repeats = int(repeats)
        n = len(dataset)
        self.num_samples = math.ceil(n * self.repeats / num_replicas)
        self.total_size = self.num_samples * num_replicas
        selected = n // 256 * 256 // num_replicas
        self.num_selected = selected if selected > 0 else math.ceil(n / num_replicas)  # small data sets: all

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.dataset), generator=generator).repeat_interleave(self.repeats).tolist()
        order += order[: self.total_size - len(order)]
        return iter(order[self.rank : self.total_size : self.num_replicas][: self.num_selected])

    def __len__(self) -> int:
        return min(self.num_selected, self.num_samples)
