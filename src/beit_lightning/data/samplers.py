"""Samplers for map-style data sets (image folders, generated retrieval data).

* :class:`RepeatedAugmentationSampler`: repeated augmentation, as DeiT's ``RASampler``. Shard
  streams repeat samples themselves (:class:`~beit_lightning.data.ShardStream`'s ``repeats``); a
  map-style data set needs a sampler.
* :class:`ClassBalancedSampler`: batches of ``batch_size / m`` classes with ``m`` images each, the
  batches of metric learning (image retrieval).

Both are ``DistributedSampler`` subclasses, so Lightning keeps them under DDP (it replaces only
plain samplers) and calls their ``set_epoch``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler

__all__ = ["ClassBalancedSampler", "RepeatedAugmentationSampler"]


def data_parallel_group(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    """``(world size, rank)``: the given values, else ``torch.distributed``'s when it is initialised
    (at call time: Lightning creates the group after the DataModule), else one process."""
    initialised = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if initialised else 1
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    return num_replicas, rank


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
        num_replicas, rank = data_parallel_group(num_replicas, rank)
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


class ClassBalancedSampler(DistributedSampler):
    """Class-balanced batches for metric learning: each batch holds ``batch_size // m`` different
    classes with ``m`` images of each, so every anchor has ``m - 1`` positives in its batch.

    Each epoch, from a generator seeded by ``(seed, epoch)``: every class's images are shuffled and
    cut into groups of ``m`` (a class's last group, or a class with fewer than ``m`` images, is
    filled up with other images of the class drawn at random); all groups are shuffled; batches are
    filled with groups in that order, a group whose class is already in the batch waiting for the
    next one. An epoch so sees every image about once. The batches are dealt round-robin to the
    ranks (rank ``r`` gets batches ``r, r + W, ...``), every rank the same number, so each rank
    trains on its own batches. The sampler yields the batches' indices one after the other: a
    ``DataLoader(batch_size=batch_size, drop_last=True)`` over it cuts exactly these batches.

    The order is a function of ``(seed, epoch, labels, world size)`` only. A run resumed in the
    middle of an epoch restarts that epoch's order from its first batch (the data position of a
    map-style loader is not saved; shard streams resume exactly).

    Args:
        labels: the class of every sample of the data set (index = sample index).
        batch_size: samples per batch per rank; a multiple of ``samples_per_class``.
        samples_per_class: ``m``, images of one class in a batch (>= 2 to have positives).
        seed: seed of the order.
        num_replicas, rank: the data-parallel group; by default read from ``torch.distributed``
            when it is initialised, else one process.
    """

    def __init__(
        self, labels: Sequence[int], batch_size: int, samples_per_class: int = 2, seed: int = 0,
        num_replicas: int | None = None, rank: int | None = None,
    ) -> None:
        num_replicas, rank = data_parallel_group(num_replicas, rank)
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        super().__init__(range(len(self.labels)), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        m = int(samples_per_class)
        if m < 1 or batch_size < m or batch_size % m:
            raise ValueError(
                f"batch_size={batch_size} must be a positive multiple of samples_per_class={samples_per_class} "
                "(e.g. 64 and 2: 32 classes of 2 images per batch)"
            )
        self.batch_size, self.samples_per_class = int(batch_size), m
        self.classes = torch.unique(self.labels)
        self.classes_per_batch = batch_size // m
        if len(self.classes) < self.classes_per_batch:
            raise ValueError(
                f"a batch of {batch_size} with {m} images per class needs {self.classes_per_batch} classes, but the "
                f"data has {len(self.classes)}: lower data.batch_size or raise data.samples_per_class"
            )
        self._members = [torch.nonzero(self.labels == c).flatten() for c in self.classes]
        groups = sum(math.ceil(len(members) / m) for members in self._members)
        self.batches_per_rank = groups // self.classes_per_batch // num_replicas
        if self.batches_per_rank < 1:
            raise ValueError(
                f"{len(self.labels)} images make fewer than {num_replicas} class-balanced batches of {batch_size}: "
                "lower data.batch_size or use fewer devices"
            )

    def batches(self) -> list[list[int]]:
        """This rank's batches of the current epoch (lists of sample indices)."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        m = self.samples_per_class
        groups: list[tuple[int, list[int]]] = []
        for c, members in enumerate(self._members):
            order = members[torch.randperm(len(members), generator=generator)].tolist()
            short = -len(order) % m
            if short:
                order += members[torch.randint(len(members), (short,), generator=generator)].tolist()
            groups += [(c, order[i : i + m]) for i in range(0, len(order), m)]
        groups = [groups[i] for i in torch.randperm(len(groups), generator=generator).tolist()]
        batches, current, classes, waiting = [], [], set(), []
        for group in groups:
            pending = [*waiting, group]
            waiting = []
            for c, members in pending:
                if c in classes:
                    waiting.append((c, members))
                    continue
                current += members
                classes.add(c)
                if len(classes) == self.classes_per_batch:
                    batches.append(current)
                    current, classes = [], set()
        total = self.batches_per_rank * self.num_replicas
        if not batches:
            raise RuntimeError("no class-balanced batch could be formed: the data has too few classes for the batch")
        for i in range(total - len(batches)):  # groups left waiting at the end (few classes): repeat the first batches
            batches.append(batches[i % len(batches)])
        return batches[self.rank : total : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter([i for batch in self.batches() for i in batch])

    def __len__(self) -> int:
        return self.batches_per_rank * self.batch_size
