"""Semantic-segmentation data (BEiT's ADE20K recipe): batches ``{"image": B x 3 x H x W float
(normalised), "label": B x H x W long (255 = ignored)}``.

:class:`SegmentationDataModule` owns what every source shares: the transforms of
:mod:`.segmentation_transforms` (mmseg's training pipeline; the evaluation resize with the label
map at its original size) and the loaders (validation batch 1: images differ in size). Sources:

* :class:`ADE20KDataModule`: an ``ADEChallengeData2016`` folder (``images/<split>/*.jpg`` +
  ``annotations/<split>/*.png``);
* :class:`SegmentationShardsDataModule`: webdataset shards of ``.jpg`` + ``.seg.png`` pairs
  (``beit-lightning-shards ROOT OUT --segmentation``), streamed by :class:`SegmentationShardStream`
  with the epochs, slots, seeding and exact mid-epoch resume of :class:`~.streaming.ShardStream`;
* :class:`GeneratedSegmentationDataModule`: the embedded generated scenes
  (:class:`~.generated.GeneratedSegmentation`), written once as shards and streamed.

Every random draw of the augmentation follows a random state seeded per sample, from
``(seed, epoch, rank, position)`` for folders (:class:`SeededSampler`) and from the stream's
``(seed, epoch, slot, position)`` for shards. Unreadable or undecodable images and label maps are
skipped with a warning naming them and counted in ``skipped_samples``.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, get_worker_info

from .class_names import ADE20K_CLASSES
from .datamodule import (
    ImageFiles,
    ImageShardsDataModule,
    default_cache_dir,
    shard_pattern,
    write_shards_once,
)
from .generated import SEGMENTATION_CLASS_NAMES
from .segmentation_transforms import IGNORE_INDEX, SegmentationEvalTransform, SegmentationTrainTransform
from .shards import SEG_KEY, generated_segmentation_records, list_segmentation_pairs
from .streaming import (
    IMAGE_KEYS,
    EpochLoader,
    PrivateRandomness,
    ShardStream,
    SharedCounter,
    expand_urls,
    private_generator,
    read_shard_index,
    seed_globals,
    stream_seed,
)
from .transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "ADE20K_CLASSES",
    "ADE20KDataModule",
    "GeneratedSegmentationDataModule",
    "SeededSampler",
    "SegmentationDataModule",
    "SegmentationFiles",
    "SegmentationShardStream",
    "SegmentationShardsDataModule",
]

def _read_label(data: str | bytes) -> np.ndarray:
    """A label map file (path or bytes) as an ``H x W`` array of its stored values."""
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
        label = np.array(img)
    if label.ndim != 2:
        raise ValueError(f"a label map must have one channel; got shape {label.shape}")
    return label


def _check_sizes(img: Image.Image, label: np.ndarray) -> None:
    if img.size != (label.shape[1], label.shape[0]):
        raise ValueError(f"label map {label.shape[1]}x{label.shape[0]} differs from the image's {img.size[0]}x{img.size[1]}")


class SegmentationFiles(ImageFiles):
    """``(PIL image, label map)`` from a list of ``(image path, label path)`` pairs.

    As :class:`~.datamodule.ImageFiles`: a pair whose image or label map cannot be read (or whose
    sizes differ) is skipped with a warning naming the file, counted in ``skipped``, and replaced by
    the next readable pair of the list.
    """

    def _read(self, index: int) -> tuple[Image.Image, np.ndarray] | None:
        image_path, label_path = self.files[index]
        if image_path in self._unreadable:
            return None
        path = image_path
        try:
            with Image.open(image_path) as img:
                img = img.convert("RGB")
            path = label_path
            label = _read_label(label_path)
            _check_sizes(img, label)
            return img, label
        except Exception as err:  # noqa: BLE001 - any unreadable pair is skipped, named and counted
            self._unreadable.add(image_path)
            warnings.warn(
                f"skipping unreadable {'image' if path == image_path else 'label map'} {path!r} ({type(err).__name__}: {err}); "
                "the next readable pair of the folder takes its place",
                stacklevel=3,
            )
            return None


class SeededSampler(DistributedSampler):
    """A ``DistributedSampler`` (a ``(seed, epoch)`` permutation dealt to the ranks) that yields
    ``(index, sample seed)``: the seed of the sample's augmentation, from ``(seed, epoch, rank,
    position)``, so augmentation does not depend on the number of workers. Lightning keeps it (it
    is a ``DistributedSampler``) and calls its ``set_epoch``.
    """

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for position, index in enumerate(super().__iter__()):
            yield index, stream_seed(self.seed, self.epoch, self.rank, position)


class _SeededSamples(Dataset):
    """``files[index]`` through ``transform`` under the random state of the sample's seed."""

    def __init__(self, files: Dataset, transform, seed: int = 0) -> None:
        self.files, self.transform, self.seed = files, transform, seed

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        index, seed = key if isinstance(key, tuple) else (key, stream_seed(self.seed, "index", key))
        img, label = self.files[index]
        if get_worker_info() is not None:  # a worker process: its global generators are the pipeline's own
            seed_globals(seed)
            return self.transform(img, label)
        with PrivateRandomness(seed):
            return self.transform(img, label)


class SegmentationShardStream(ShardStream):
    """A :class:`~.streaming.ShardStream` of segmentation samples: an image (``.jpg``, ``.png``,
    ...) and its label map (``.seg.png``) through one transform ``(image, label) -> batch dict``.
    A sample whose image or label map cannot be decoded (or whose sizes differ) is skipped,
    warned about and counted."""

    def _decode(self, sample: dict) -> tuple[Image.Image, np.ndarray] | None:
        key = next((k for k in IMAGE_KEYS if k in sample), None)
        if key is None or SEG_KEY not in sample:
            keys = sorted(k for k in sample if not k.startswith("__"))
            return self._skip(sample, f"an image ({', '.join(IMAGE_KEYS)}) and a label map ({SEG_KEY}) expected; got {keys}")
        part = "image"
        try:
            with Image.open(io.BytesIO(sample[key])) as img:
                img = img.convert("RGB")
            part = "label map"
            label = _read_label(sample[SEG_KEY])
            _check_sizes(img, label)
            return img, label
        except Exception as err:  # noqa: BLE001 - any undecodable sample is skipped and counted
            return self._skip(sample, f"{part}: {type(err).__name__}: {err}")

    def _make_sample(self, decoded: Any) -> dict[str, torch.Tensor]:
        img, label = decoded
        return self.sample_transform(img, label)


class SegmentationDataModule(pl.LightningDataModule):
    """Base DataModule of semantic segmentation: transforms and loaders (see the module docstring).

    Serves ``data_kind = "segmentation"``: label maps, for tasks that declare the same kind.

    Args:
        crop_size: side of the training crops (ADE20K: 512; the backbone's ``img_size``).
        img_scale: ``(long, short)`` resize target (ADE20K: (2048, 512)): randomly rescaled by
            ``ratio_range`` in training, as is at evaluation; ``None``: ``(4 * crop_size, crop_size)``.
        ratio_range: random resize ratio range of training (0.5, 2.0).
        cat_max_ratio: crops are redrawn (up to 10 times) while one class covers this share or more.
        hflip: probability of a horizontal flip.
        photometric_distortion: mmseg's ``PhotoMetricDistortion`` in training.
        mean, std: normalisation in [0, 1] units (BEiT's ADE20K config: ImageNet's).
        reduce_zero_label: label 0 is "other" (ignored) and labels shift down by one (ADE20K).
        classes: class names (index = training label).
        batch_size: training batch per device (BEiT: 2 per GPU on 8 GPUs, 16 in all).
        val_batch_size: validation batch per device (1, as mmseg: images differ in size).
        num_workers: data-loader workers per device.
        seed: seed of the order and of the augmentation (per sample).
        mode: only ``None`` or ``"segmentation"``: the classification modes of the image data
            modules do not apply.
    """

    data_kind = "segmentation"

    def __init__(
        self,
        crop_size: int = 512,
        img_scale: Sequence[int] | None = (2048, 512),
        ratio_range: Sequence[float] | None = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        hflip: float = 0.5,
        photometric_distortion: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        reduce_zero_label: bool = True,
        classes: Sequence[str] | None = None,
        batch_size: int = 2,
        val_batch_size: int = 1,
        num_workers: int = 4,
        seed: int = 0,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        mode: str | None = None,
    ) -> None:
        super().__init__()
        if mode not in (None, "segmentation"):
            raise ValueError(
                f"{type(self).__name__} makes segmentation batches and takes no data.mode={mode!r} (the image data sets' "
                "pretrain/finetune/tokenizer modes): use it with task=segmentation, or remove data.mode"
            )
        self.crop_size = int(crop_size)
        self.img_scale = tuple(img_scale) if img_scale is not None else (4 * self.crop_size, self.crop_size)
        self.batch_size, self.val_batch_size, self.num_workers = batch_size, val_batch_size, num_workers
        self.seed, self.pin_memory, self.persistent_workers = seed, pin_memory, persistent_workers
        self.classes: list[str] = list(classes or [])
        self.mean, self.std = tuple(mean), tuple(std)  # to undo the normalisation (logged images)
        self.train_transform = SegmentationTrainTransform(
            self.crop_size, self.img_scale, ratio_range, cat_max_ratio, hflip, photometric_distortion, mean, std, reduce_zero_label
        )
        self.val_transform = SegmentationEvalTransform(self.img_scale, mean, std, reduce_zero_label)
        self._skipped = SharedCounter()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def ignore_index(self) -> int:
        """The label of pixels that count in neither the loss nor the metrics (255)."""
        return IGNORE_INDEX

    @property
    def skipped_samples(self) -> int:
        """Samples skipped because an image or label map could not be read or decoded, over training
        and validation and all data-loader workers of this process."""
        return self._skipped.value

    def _rank_and_world(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)

    def _loader_kwargs(self) -> dict[str, Any]:
        return {
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory and torch.cuda.is_available(),
            "persistent_workers": self.persistent_workers and self.num_workers > 0,
            "generator": private_generator(self.seed),  # iterators do not draw from torch's global generator
        }


class ADE20KDataModule(SegmentationDataModule):
    """An ``ADEChallengeData2016`` folder: ``<root>/images/<split>/*.jpg`` and
    ``<root>/annotations/<split>/*.png`` (pairs matched by file name; an image without a label map
    is left out with a warning).

    Args:
        root: the ``ADEChallengeData2016`` folder.
        train_split, val_split: sub-folder names (``val_split=None``: no validation).
        **kwargs: see :class:`SegmentationDataModule` (``classes`` defaults to :data:`ADE20K_CLASSES`).

    Unreadable files are skipped and replaced as in :class:`SegmentationFiles`. Each epoch's order
    and each sample's augmentation follow ``(seed, epoch)`` (:class:`SeededSampler`); a resumed run
    starts its epoch from the beginning (the shard modules resume mid-epoch exactly).
    """

    def __init__(self, root: str, train_split: str = "training", val_split: str | None = "validation", **kwargs) -> None:
        kwargs.setdefault("classes", ADE20K_CLASSES)
        super().__init__(**kwargs)
        self.root, self.train_split, self.val_split = root, train_split, val_split
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def _files(self, split: str) -> SegmentationFiles:
        pairs, unlabelled = list_segmentation_pairs(self.root, split)
        if unlabelled:
            warnings.warn(f"{len(unlabelled)} images of {split!r} have no label map and are left out, e.g. {unlabelled[0]!r}",
                          stacklevel=2)
        return SegmentationFiles(pairs, self.classes, skipped=self._skipped)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = _SeededSamples(self._files(self.train_split), self.train_transform, self.seed)
            if self.val_split:
                self.val_set = _SeededSamples(self._files(self.val_split), self.val_transform, self.seed)

    def _sampler(self, dataset: Dataset, shuffle: bool) -> SeededSampler:
        rank, world = self._rank_and_world()
        return SeededSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=self.seed)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=self._sampler(self.train_set, True),
                          drop_last=True, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        return DataLoader(self.val_set, batch_size=self.val_batch_size, sampler=self._sampler(self.val_set, False),
                          **self._loader_kwargs())


class SegmentationShardsDataModule(SegmentationDataModule):
    """Webdataset shards of image + label-map samples (``.jpg`` + ``.seg.png``, as written by
    ``beit-lightning-shards ROOT OUT --segmentation``), streamed by :class:`SegmentationShardStream`.

    Args:
        train_urls: shard pattern(s), e.g. ``/data/ade-shards/training/shard-{000000..000020}.tar``.
        val_urls: validation shards, or ``None``.
        samples_per_epoch: samples per training epoch over all ranks; defaults to the shards'
            ``index.json`` count (required for remote shards).
        val_samples: validation samples; defaults to the index count.
        resampled: draw training shards with replacement.
        shuffle_buffer: samples shuffled in a buffer per worker.
        **kwargs: see :class:`SegmentationDataModule`; ``classes`` defaults to the index's.

    The training loader is an :class:`~.streaming.EpochLoader`: its position is saved in checkpoints
    and a resumed run continues mid-epoch with the same samples and augmentation.
    """

    def __init__(
        self,
        train_urls: str | Sequence[str],
        val_urls: str | Sequence[str] | None = None,
        samples_per_epoch: int | None = None,
        val_samples: int | None = None,
        resampled: bool = False,
        shuffle_buffer: int = 1000,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.train_urls, self.val_urls = train_urls, val_urls
        self.samples_per_epoch, self.val_samples = samples_per_epoch, val_samples
        self.resampled, self.shuffle_buffer = resampled, shuffle_buffer
        self.train_stream: SegmentationShardStream | None = None
        self.val_stream: SegmentationShardStream | None = None
        if not self.classes:  # local shards: the writer's index names the classes
            index = read_shard_index(expand_urls(train_urls))
            self.classes = list(index.get("classes", [])) if index else []

    # the same sample counts and training position as the image shards
    _count = ImageShardsDataModule._count
    _train_position = ImageShardsDataModule._train_position

    def _stream(self, urls: list[str], count: int, train: bool) -> SegmentationShardStream:
        rank, world = self._rank_and_world()
        return SegmentationShardStream(
            urls, self.train_transform if train else self.val_transform, samples_per_epoch=count,
            batch_size=self.batch_size if train else self.val_batch_size, num_workers=self.num_workers, rank=rank,
            world_size=world, resampled=self.resampled and train, shuffle=train, shuffle_buffer=self.shuffle_buffer,
            seed=self.seed, skipped=self._skipped,
        )

    def setup(self, stage: str | None = None) -> None:
        if self.train_stream is None:
            urls = expand_urls(self.train_urls)
            self.train_stream = self._stream(urls, self._count(urls, self.samples_per_epoch, "training"), True)
            if self.val_urls:
                val = expand_urls(self.val_urls)
                self.val_stream = self._stream(val, self._count(val, self.val_samples, "validation"), False)

    def train_dataloader(self) -> EpochLoader:
        return EpochLoader(self.train_stream, batch_size=self.batch_size, position_fn=self._train_position,
                           **self._loader_kwargs())

    def val_dataloader(self) -> EpochLoader | list:
        # validation reads the same samples every time: epoch 0's plan from its start, no shuffling
        if self.val_stream is None:
            return []
        return EpochLoader(self.val_stream, batch_size=self.val_batch_size, position_fn=lambda: (0, 0), **self._loader_kwargs())


class GeneratedSegmentationDataModule(SegmentationShardsDataModule):
    """The embedded segmentation data (:class:`~.generated.GeneratedSegmentation`: textured regions
    on a gradient background, labels in the ADE20K convention), written once as shards
    (``prepare_data``, one process per node, under :func:`~.datamodule.default_cache_dir`) and
    streamed like real shards.

    Args:
        num_train, num_val: data set sizes.
        image_size: side of the generated images.
        num_classes: classes including the background (2 .. 7).
        seed: seed of the images (train and val use different streams) and of the reading.
        samples_per_shard: samples in each written shard.
        cache_dir: where shards go; reused when present.
        crop_size, img_scale: as in :class:`SegmentationDataModule`, sized for the small images
            (default crop 64, ``img_scale`` (256, 64)).
        **kwargs: see :class:`SegmentationShardsDataModule` and :class:`SegmentationDataModule`.
    """

    VERSION = 1  # bump when the generator changes, so that stale shards are not reused

    def __init__(
        self,
        num_train: int = 512,
        num_val: int = 64,
        image_size: int = 64,
        num_classes: int = len(SEGMENTATION_CLASS_NAMES),
        seed: int = 0,
        samples_per_shard: int = 64,
        cache_dir: str | None = None,
        crop_size: int = 64,
        img_scale: Sequence[int] | None = None,
        **kwargs,
    ) -> None:
        if not kwargs.get("reduce_zero_label", True):
            raise ValueError("the generated segmentation data stores labels in the ADE20K convention: keep reduce_zero_label=true")
        if not 2 <= num_classes <= len(SEGMENTATION_CLASS_NAMES):
            raise ValueError(f"num_classes must be in [2, {len(SEGMENTATION_CLASS_NAMES)}] (background included); got {num_classes}")
        self.num_train, self.num_val = num_train, num_val
        self.image_size, self.samples_per_shard = image_size, samples_per_shard
        name = f"generated-segmentation-v{self.VERSION}-{image_size}px-{num_classes}c-seed{seed}-{samples_per_shard}ps"
        self.data_dir = os.path.join(cache_dir or default_cache_dir(), name)
        train_dir = os.path.join(self.data_dir, f"train-{num_train}")
        val_dir = os.path.join(self.data_dir, f"val-{num_val}")
        self._splits = [(train_dir, num_train, seed), (val_dir, num_val, seed + 1_000_003)]
        kwargs["classes"] = list(SEGMENTATION_CLASS_NAMES[:num_classes])
        super().__init__(
            train_urls=shard_pattern(train_dir, num_train, samples_per_shard),
            val_urls=shard_pattern(val_dir, num_val, samples_per_shard) if num_val > 0 else None,
            seed=seed, crop_size=crop_size, img_scale=img_scale, **kwargs,
        )

    def prepare_data(self) -> None:
        """Write the shards unless a complete set (with its index) is there already."""
        for out_dir, count, seed in self._splits:
            if count > 0:
                write_shards_once(
                    out_dir, lambda c=count, s=seed: generated_segmentation_records(c, self.image_size, self.num_classes, seed=s),
                    self.classes, self.samples_per_shard)

    def setup(self, stage: str | None = None) -> None:
        if self.trainer is None:  # used outside a Trainer: nobody called prepare_data
            self.prepare_data()
        super().setup(stage)
