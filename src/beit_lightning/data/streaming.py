"""Reading webdataset shards correctly under DDP and many data-loader workers.

Every (rank, worker) pair is a *slot*; a run has ``world_size x num_workers`` slots.

* Exact epochs (``resampled=False``): each epoch the shard list is shuffled with
  ``(seed, epoch)`` (the same order on every slot) and dealt round-robin to the slots, so every
  shard is read by exactly one slot. With fewer shards than slots, every slot reads all shards
  and keeps every n-th sample instead. Each slot yields exactly ``per_worker`` samples: it cycles
  its shards when it has fewer (padding, like ``DistributedSampler``) and stops when it has
  enough. ``per_worker`` is a multiple of the batch size, so every rank runs the same number of
  full batches and no collective waits for a rank that has finished. When the shards hold
  equally many samples and their number divides by the slot count, every sample of an epoch is
  seen exactly once.
* Resampled (``resampled=True``, recommended for multi-node pre-training): each slot draws
  shards at random with replacement from a ``(seed, epoch, slot)`` stream, with the same fixed
  ``per_worker`` epoch length.

Samples are shuffled in a buffer, decoded with PIL and transformed (a transform with
``accepts_undecoded``, the fast pre-training path, gets the image undecoded and decodes it
itself, at reduced size where it can); undecodable samples (also those whose decoding fails inside
the transform) and unreadable tar data are skipped with a warning and counted in a counter
shared across workers.
All random draws of the transform (crops, jitter, flips, masks, RandAugment) follow a random
state seeded from ``(seed, epoch, slot, sample index)``: augmentation is reproducible sample by
sample. In a worker process the global generators are seeded before each sample; in the training
process itself (``num_workers=0``) a private state is swapped in instead, so the model's random
state is neither used nor disturbed.

Resuming mid-epoch: ``set_epoch(epoch, skip_batches=n)`` makes every slot pass over the samples
of the ``n`` batches its rank already consumed (read, not decoded) and continue from there, with
the same order and augmentation as an uninterrupted run. (A corrupt sample inside the skipped
part shifts the alignment by ``repeats`` samples.) :class:`EpochLoader` takes ``n`` from the trainer.
"""

from __future__ import annotations

import io
import json
import logging
import math
import multiprocessing as mp
import os
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .decode import ImageDecodeError, open_encoded
from .shards import INDEX_FILE

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp")
_MAX_CONSECUTIVE_FAILURES = 10_000

# Lightning warns that an IterableDataset's __len__ may be wrong under several workers when each
# worker is not configured on its own; ShardStream gives every worker its own exact share (see
# per_worker), so its length is right and the warning is noise.
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Brace patterns (``shard-{000000..000099}.tar``), ``::``-joined lists or lists of them."""
    if isinstance(urls, str):
        urls = [urls]
    out: list[str] = []
    for pattern in urls:
        out += wds.shardlists.expand_urls(pattern)
    if not out:
        raise ValueError(f"no shard URLs in {urls!r}")
    return out


def read_shard_index(urls: list[str]) -> dict | None:
    """The writer's ``index.json`` next to local shards, or ``None`` (remote or ``pipe:`` URLs)."""
    first = urls[0]
    if "://" in first or first.startswith("pipe:"):
        return None
    path = os.path.join(os.path.dirname(first), INDEX_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        index = json.load(f)
    wanted = {os.path.basename(u) for u in urls}
    shards = [s for s in index.get("shards", []) if s["url"] in wanted]
    return {**index, "shards": shards, "num_samples": sum(s["num_samples"] for s in shards)}


class SharedCounter:
    """An integer in shared memory that data-loader workers can add to."""

    def __init__(self, value: int = 0) -> None:
        self._value = mp.Value("q", value)

    def add(self, n: int = 1) -> None:
        with self._value.get_lock():
            self._value.value += n

    @property
    def value(self) -> int:
        return int(self._value.value)

    @value.setter
    def value(self, v: int) -> None:
        self._value.value = int(v)


def seed_globals(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (in a data-loader worker, they are the
    data pipeline's own)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class PrivateRandomness:
    """Python, NumPy and torch (CPU) random states of one stream, swapped in around each use.

    Used when a stream runs in the training process itself (``num_workers=0``), so that data
    augmentation neither depends on nor disturbs the model's random state. It costs ~0.13 ms
    per use (mostly NumPy's state copy); worker processes seed their globals once instead.
    """

    def __init__(self, seed: int) -> None:
        self.python = random.Random(seed).getstate()
        self.numpy = np.random.RandomState(seed % 2**32).get_state()
        self.torch = torch.Generator().manual_seed(seed).get_state()

    def __enter__(self) -> PrivateRandomness:
        self._saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.torch)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.python, self.numpy, self.torch = random.getstate(), np.random.get_state(), torch.get_rng_state()
        random.setstate(self._saved[0])
        np.random.set_state(self._saved[1])
        torch.set_rng_state(self._saved[2])


def private_generator(seed: int = 0) -> torch.Generator:
    """A generator for a ``DataLoader`` (its worker base seed, its shuffling), so that creating an
    iterator does not draw from torch's global generator. Why: Lightning creates loader iterators
    at different moments in a resumed run (sanity check, the resumed epoch) than in an
    uninterrupted one; a draw from the global generator there would shift every later dropout
    mask of the model, and the resumed run would not continue bit for bit."""
    return torch.Generator().manual_seed(int(seed))


class _Undecoded:
    """The encoded bytes of an image for a transform that decodes itself (``accepts_undecoded``)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


def stream_seed(*parts: int | str) -> int:
    return random.Random("/".join(str(p) for p in parts)).getrandbits(62)


class ShardStream(IterableDataset):
    """Samples from webdataset shards as batch-format dicts; see the module docstring.

    Args:
        urls: shard URLs (local paths, ``pipe:`` commands, anything webdataset opens).
        sample_transform: PIL image -> dict of tensors (the BEiT two-view transform, ...).
        samples_per_epoch: samples per epoch over all ranks (rounded up to fill equal batches).
        batch_size: per-device batch size (each slot's share is a multiple of it).
        num_workers: data-loader workers per rank (to size each slot's share).
        rank, world_size: this process's place in the data-parallel group.
        resampled: draw shards with replacement (see module docstring).
        shuffle: shuffle shard order per epoch and samples in a buffer.
        shuffle_buffer: samples held for shuffling per worker.
        seed: seed of shard order, sample shuffling and augmentation.
        skipped: shared counter of skipped samples.
        repeats: repeated augmentation (DeiT's ``--repeated-aug``, 3): every image read is
            transformed this many times, each copy with its own seed, and the copies follow each
            other in the stream (so they fall in the same global batch, as DeiT's ``RASampler``
            puts them on different GPUs in the same step). The epoch keeps ``samples_per_epoch``
            samples, so it reads 1/``repeats`` of the distinct images.

    Other kinds of samples go through the same epoch, slot, seeding and resume logic by
    overriding :meth:`_decode` (raw webdataset sample -> decoded content, or ``None`` to skip) and
    :meth:`_make_sample` (decoded content -> batch dict, e.g. image and label map through one
    transform); see :class:`~beit_lightning.data.segmentation.SegmentationShardStream`.
    """

    def __init__(
        self,
        urls: Sequence[str],
        sample_transform: Callable[[Image.Image], dict],
        *,
        samples_per_epoch: int,
        batch_size: int = 1,
        num_workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
        resampled: bool = False,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        skipped: SharedCounter | None = None,
        repeats: int = 1,
    ) -> None:
        super().__init__()
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1; got {repeats}")
        self.repeats = int(repeats)
        self.urls = list(urls)
        if samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be >= 1; got {samples_per_epoch}")
        self.sample_transform = sample_transform
        self.samples_per_epoch, self.batch_size = samples_per_epoch, max(1, batch_size)
        self.num_workers, self.rank, self.world_size = num_workers, rank, world_size
        self.resampled, self.shuffle, self.shuffle_buffer, self.seed = resampled, shuffle, shuffle_buffer, seed
        self.skipped = skipped if skipped is not None else SharedCounter()
        self._epoch = SharedCounter(0)
        self._skip_batches = SharedCounter(0)

    # --- epoch and sizes -------------------------------------------------------------------
    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Shard order, sample order and augmentation of the next iteration follow ``epoch``; the
        first ``skip_batches`` batches of this rank (already trained on) are passed over."""
        self._epoch.value = epoch
        self._skip_batches.value = skip_batches

    @property
    def epoch(self) -> int:
        return self._epoch.value

    def per_worker(self, num_workers: int | None = None) -> int:
        """Samples each slot yields per epoch (a multiple of the batch size)."""
        workers = max(1, self.num_workers if num_workers is None else num_workers)
        share = math.ceil(self.samples_per_epoch / (self.world_size * workers))
        return math.ceil(share / self.batch_size) * self.batch_size

    def __len__(self) -> int:
        """Samples this rank yields per epoch."""
        return self.per_worker() * max(1, self.num_workers)

    # --- iteration -------------------------------------------------------------------------
    def _passes(self, slot: int, slots: int, epoch: int, rng: random.Random) -> Iterator[Iterator[dict]]:
        """Raw samples of this slot, as successive passes over its shards.

        Exact mode: each pass reads the slot's shards once (every shard with a sample stride when
        there are fewer shards than slots); passes after the first are padding. Each pass is
        shuffled in its own buffer, so no padding sample overtakes a sample of the first pass.
        Resampled mode: one endless pass over shards drawn with replacement.
        """
        def read(urls: Iterator[str] | list[str], stride: int = 1, offset: int = 0) -> Iterator[dict]:
            samples = wds.tarfile_samples(({"url": url} for url in urls), handler=self._on_error)
            if stride > 1:
                samples = (s for i, s in enumerate(samples) if i % stride == offset)
            if self.shuffle and self.shuffle_buffer > 1:
                samples = wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng)(iter(samples))
            return samples

        if self.resampled:
            def draw() -> Iterator[str]:
                while True:
                    yield rng.choice(self.urls)
            yield read(draw())
            return
        order = list(self.urls)
        if self.shuffle:
            random.Random(stream_seed(self.seed, epoch, "shards")).shuffle(order)
        if len(order) >= slots:
            mine, stride, offset = order[slot::slots], 1, 0
        else:  # fewer shards than readers: everyone reads all, keeps every slots-th sample
            mine, stride, offset = order, slots, slot
        while True:
            yield read(mine, stride, offset)

    def _on_error(self, exn: Exception) -> bool:
        self.skipped.add()
        warnings.warn(f"skipping unreadable shard data ({type(exn).__name__}: {exn})", stacklevel=2)
        return True

    def _decode(self, sample: dict) -> tuple[Image.Image, int] | None:
        """The raw sample's decoded content (image, class index), or ``None`` when it cannot be
        decoded (then skipped: see :meth:`_skip`). Subclasses decode other sample kinds."""
        key = next((k for k in IMAGE_KEYS if k in sample), None)
        if key is None:
            return self._skip(sample, f"no image ({', '.join(IMAGE_KEYS)}) among {sorted(k for k in sample if not k.startswith('__'))}")
        try:
            label = int(sample["cls"]) if "cls" in sample else -1
            if getattr(self.sample_transform, "accepts_undecoded", False):
                open_encoded(sample[key])  # the header: a sample that is no image is skipped here
                return _Undecoded(sample[key]), label
            with Image.open(io.BytesIO(sample[key])) as img:
                img = img.convert("RGB")
            return img, label
        except Exception as err:  # noqa: BLE001 - any undecodable sample is skipped and counted
            return self._skip(sample, f"{type(err).__name__}: {err}")

    def _skip(self, sample: dict, reason: str) -> None:
        """Count an undecodable sample and warn with its key, shard and ``reason``."""
        self.skipped.add()
        warnings.warn(f"skipping undecodable sample {sample.get('__key__')} in {sample.get('__url__')}: {reason}", stacklevel=3)

    def _failed(self, failures: int) -> int:
        """One more sample in a row that could not be used; raises when there are too many."""
        failures += 1
        if failures > _MAX_CONSECUTIVE_FAILURES:
            raise RuntimeError(f"{failures} samples in a row could not be read from {self.urls[:3]}: check the shards")
        return failures

    def _make_sample(self, decoded: Any) -> dict[str, torch.Tensor]:
        """The batch-format dict of one decoded sample (called under the sample's random state).
        May raise :class:`~.decode.ImageDecodeError` (the sample is then skipped and counted)."""
        img, label = decoded
        if isinstance(img, _Undecoded):  # opened afresh for each repeated copy: decoding changes it
            img = open_encoded(img.data)
        out = self.sample_transform(img)
        out["label"] = torch.tensor(label, dtype=torch.long)
        return out

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # Batches are taken from the workers in turn: worker w makes batches w, w + W, w + 2W, ...
        # After `consumed` batches the loader starts again at worker 0, so worker w takes over the
        # place of worker (w + consumed) mod W and its remaining batches keep the uninterrupted order.
        consumed = self._skip_batches.value
        worker = (worker + consumed) % workers
        slot, slots = self.rank * workers + worker, self.world_size * workers
        epoch = self.epoch
        seed = stream_seed(self.seed, epoch, slot)
        rng = random.Random(seed)
        skip = (max(0, consumed - worker) + workers - 1) // workers * self.batch_size
        wanted, produced, failures = self.per_worker(workers), skip, 0
        for samples in self._passes(slot, slots, epoch, rng):
            read_in_pass = 0
            for sample in samples:
                if produced >= wanted:
                    return
                read_in_pass += 1
                if skip >= self.repeats:  # every copy of this image was trained on already
                    skip -= self.repeats
                    continue
                first_copy, skip = skip, 0
                decoded = self._decode(sample)
                if decoded is None:
                    failures = self._failed(failures)
                    continue
                for _ in range(first_copy, self.repeats):
                    if produced >= wanted:
                        return
                    sample_seed = stream_seed(self.seed, epoch, slot, produced)
                    try:
                        if info is not None:  # a worker process: its global generators are the pipeline's own
                            seed_globals(sample_seed)
                            out = self._make_sample(decoded)
                        else:
                            with PrivateRandomness(sample_seed):
                                out = self._make_sample(decoded)
                    except ImageDecodeError as err:  # decoded inside the transform: skipped, named, counted
                        self._skip(sample, str(err))
                        failures = self._failed(failures)
                        break
                    failures = 0
                    produced += 1
                    yield out
            if produced >= wanted:
                return
            if read_in_pass == 0:
                raise RuntimeError(
                    f"data-loader slot {slot} (rank {self.rank}, worker {worker}) read no sample from its shards "
                    f"{self.urls[:3]}...: check that the URLs exist and hold webdataset samples"
                )


class EpochLoader(DataLoader):
    """A DataLoader over a :class:`ShardStream` that tells the stream where training stands.

    Lightning calls ``set_epoch`` on samplers only, and an iterable data set has none; so the
    loader asks ``position_fn`` for ``(epoch, batches of this epoch already done)`` (from the
    trainer: after a mid-epoch resume the second number is not 0), or counts its own iterations
    when there is no trainer.

    The question is asked at the first ``next()``, not at ``iter()``: Lightning creates the
    training iterator while ``configure_optimizers`` estimates the run's steps, which is before it
    restores the loops from a checkpoint, so at ``iter()`` time a resumed run still looks like
    step 0. (Asked at ``iter()``, a mid-epoch resume replayed epoch 0's first batches.)

    The loader also implements ``state_dict``/``load_state_dict`` (Lightning's stateful-loader
    protocol), which marks it resumable and records the position in checkpoints. Lightning only
    loads such a state while it sets up the data, which in a run that estimates its steps (every
    task here) happens before the checkpoint is restored, so in practice the resumed position
    comes from ``position_fn`` (the restored loop counters); a state loaded explicitly wins.
    """

    def __init__(
        self, dataset: ShardStream, *args: Any, position_fn: Callable[[], tuple[int, int] | None] | None = None,
        **kwargs: Any,
    ):
        kwargs.setdefault("generator", private_generator(getattr(dataset, "seed", 0)))
        super().__init__(dataset, *args, **kwargs)
        self._position_fn = position_fn
        self._iterations = 0
        self._loaded: tuple[int, int] | None = None
        self._position = (0, 0)  # (epoch, batches of it delivered so far)

    def _start(self) -> Iterator:
        """Resolve the position and start the underlying DataLoader iterator."""
        if self._loaded is not None:
            (epoch, done), self._loaded = self._loaded, None
            position = (epoch + 1, 0) if done >= len(self) else (epoch, done)  # saved at the end of an epoch
        else:
            position = self._position_fn() if self._position_fn is not None else None
        epoch, done = (self._iterations, 0) if position is None else position
        self.dataset.set_epoch(epoch, skip_batches=done)
        self._iterations += 1
        self._position = (epoch, done)
        return super().__iter__()

    def __iter__(self) -> Iterator:
        started: list[Iterator] = []

        def batches() -> Iterator:
            if not started:
                started.append(self._start())
            for batch in started[0]:
                epoch, done = self._position
                self._position = (epoch, done + 1)
                yield batch

        return batches()

    def state_dict(self) -> dict[str, int]:
        epoch, done = self._position
        return {"epoch": epoch, "batches_done": done}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._loaded = (int(state_dict["epoch"]), int(state_dict["batches_done"]))
