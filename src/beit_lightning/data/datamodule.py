"""LightningDataModules that emit the one batch format of DESIGN.md.

``BeitDataModule`` owns what every source shares: the transform of the task (BEiT's two-view
pre-training transform with blockwise masks, or timm's fine-tuning transform), and the data
loaders. Subclasses say where images come from:

* :class:`ImageFolderDataModule`: class sub-folders, or an unlabeled tree of images (label -1);
* :class:`ImageShardsDataModule`: webdataset shards, streamed (see :mod:`.streaming`);
* :class:`GeneratedDataModule`: the embedded generated data set, written once as shards and
  then read like any other shards.
"""

from __future__ import annotations

import math
import os
import shutil
import warnings
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.utilities import rank_zero_info
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset

from .augment import patch_auto_augment
from .decode import ImageDecodeError, open_encoded
from .device_views import DeviceViews
from .generated import CLASS_NAMES
from .masking import BlockwiseMaskGenerator, RandomMaskGenerator, RandomSplitGenerator
from .samplers import RepeatedAugmentationSampler
from .shards import generated_records, list_images, write_shards
from .streaming import (
    EpochLoader,
    ShardStream,
    SharedCounter,
    expand_urls,
    private_generator,
    read_shard_index,
)
from .transforms import (
    BEIT_MEAN,
    BEIT_STD,
    BeitPretrainTransform,
    GanImageTransform,
    TokenizerEvalTransform,
    TokenizerViewTransform,
)

MODES = ("pretrain", "finetune", "tokenizer", "gan")
MASKINGS = ("blockwise", "random", "split", "split_uniform")


class ClassificationTransform:
    """timm's ``create_transform`` (RandAugment, random erasing, ...) in the batch-dict format.

    The posterize ops of timm's RandAugment/AutoAugment/AugMix inside it use
    :func:`~beit_lightning.data.augment.posterize`, which gives a black image for 0 bits on every
    Pillow version as Pillow <= 12 did (Pillow 13 raises instead); see that function.
    """

    def __init__(self, **timm_kwargs) -> None:
        self.transform = create_transform(**timm_kwargs)
        patch_auto_augment(self.transform)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform})"

    def __call__(self, img: Image.Image) -> dict[str, torch.Tensor]:
        return {"image": self.transform(img.convert("RGB"))}


class BeitDataModule(pl.LightningDataModule):
    """Base DataModule: transforms and loaders for pre-training or fine-tuning batches.

    Args:
        mode: ``"pretrain"`` (two views + blockwise mask), ``"finetune"`` (one augmented view, timm's
            transform), ``"tokenizer"`` (one ``tokenizer_size`` view in [0, 1]) or ``"gan"``
            (the whole image resized to ``input_size``, flipped with ``hflip``, normalised: GAN training).
        batch_size: per-device batch size.
        num_workers: data-loader worker processes per device.
        input_size: side of the backbone view; must match the model's ``img_size``.
        tokenizer_size: side of the tokenizer view; must match the tokenizer's ``image_size``.
        patch_size: backbone patch size; the mask grid is ``input_size // patch_size``.
        num_masking_patches, min_num_patches, max_num_patches, min_aspect: blockwise masking
            (BEiT: 75 of 196, 16, None, 0.3).
        scale, color_jitter, hflip: pre-training augmentation (see :class:`BeitPretrainTransform`).
        auto_augment, reprob, crop_pct: fine-tuning augmentation (timm's RandAugment string,
            random-erasing probability, evaluation crop ratio).
        mean, std: normalisation of the backbone view (BEiT's code default: 0.5/0.5).
        train_interpolation: resize of the fine-tuning crop (BEiT and DeiT: bicubic; the official
            linear probe: torchvision's default, bilinear). Evaluation resizes bicubic.
        tokenizer_interpolation: resize of the tokenizer view (BEiT's DALL-E view: lanczos; BEiT
            v2's VQ-KD: bicubic).
        tokenizer_val_crop_pct: ``mode="tokenizer"`` validation view: ``None`` resizes the whole
            short side (the training view without randomness); a number resizes the short side to
            ``int(tokenizer_size / tokenizer_val_crop_pct)`` and crops the centre
            (:class:`~beit_lightning.data.transforms.TokenizerEvalTransform`; official VQ-KD: 0.875).
        mask_exact_count: every mask has exactly ``num_masking_patches`` (``True``), or the official
            generator's early stop is kept (``False``: ~74.5 of 75 on average).
        repeated_aug: repeated augmentation (DeiT: 3): each image read gives this many differently
            augmented samples, and an epoch keeps its length (so it holds 1/``repeated_aug`` of the
            distinct images, as DeiT's ``RASampler``). 1: off.
        fast_decode: pre-training views computed the fast way (the default: ``BeitPretrainTransform(
            fast_decode=True)``, ~2x the official pipeline per core; same draws and distribution,
            pixels within ~1 level, see benchmarks/RESULTS.md); the data sets then hand the
            transform undecoded images, whose decoding errors are skipped and counted like
            unreadable files. ``False``: the exact path (the official pixels). Validation stays exact.
        device_augment: pre-training views computed on the device a batch at a time (decoding by
            nvJPEG on a GPU; :class:`~.device_views.DeviceViews` in ``on_after_batch_transfer``):
            the workers only read files, draw the randomness and the mask. Same draws as the CPU
            paths. Off by default.
        masking: what ``mask`` holds in pre-training: ``"blockwise"`` (BEiT's masked patches),
            ``"split"`` (SplitMask: half B of a random split, drawn blockwise with
            :class:`~beit_lightning.data.RandomSplitGenerator`; ``num_masking_patches`` is its size)
            or ``"split_uniform"`` (a uniformly random half B); ``"random"``: ``num_masking_patches``
            patches drawn uniformly (:class:`~beit_lightning.data.RandomMaskGenerator`: the BEiT paper's
            "- blockwise masking" ablation).
    """

    #: images with class labels (or none); tasks declare the kind of data they need (cli checks)
    data_kind = "images"

    def __init__(
        self,
        mode: str = "pretrain",
        batch_size: int = 64,
        num_workers: int = 8,
        input_size: int = 224,
        tokenizer_size: int = 112,
        patch_size: int = 16,
        num_masking_patches: int = 75,
        min_num_patches: int = 16,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        scale: Sequence[float] = (0.08, 1.0),
        color_jitter: float = 0.4,
        hflip: float = 0.5,
        auto_augment: str | None = "rand-m9-mstd0.5-inc1",
        reprob: float = 0.25,
        crop_pct: float = 0.9,
        mean: Sequence[float] = BEIT_MEAN,
        std: Sequence[float] = BEIT_STD,
        train_interpolation: str = "bicubic",
        tokenizer_interpolation: str = "lanczos",
        tokenizer_val_crop_pct: float | None = None,
        mask_exact_count: bool = True,
        repeated_aug: int = 1,
        fast_decode: bool = True,
        device_augment: bool = False,
        masking: str = "blockwise",
        pin_memory: bool = True,
        persistent_workers: bool = True,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
        if input_size % patch_size:
            raise ValueError(f"input_size={input_size} is not a multiple of patch_size={patch_size}")
        if repeated_aug < 1:
            raise ValueError(f"repeated_aug must be >= 1 (1: off); got {repeated_aug}")
        self.mode = mode
        self.repeated_aug = int(repeated_aug)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.input_size, self.tokenizer_size, self.patch_size = input_size, tokenizer_size, patch_size
        self.pin_memory, self.persistent_workers = pin_memory, persistent_workers
        if masking not in MASKINGS:
            raise ValueError(f"masking must be one of {MASKINGS}; got {masking!r}")
        self.masking = masking
        if device_augment and mode != "pretrain":
            raise ValueError(f"device_augment computes the pre-training views (mode='pretrain'); got mode={mode!r}: "
                             "set data.device_augment=false")
        self.device_views: DeviceViews | None = None
        if mode == "pretrain":
            grid = input_size // patch_size
            if masking == "blockwise":
                self.mask_generator = BlockwiseMaskGenerator(
                    (grid, grid), num_masking_patches, min_num_patches, max_num_patches, min_aspect, exact=mask_exact_count
                )
            elif masking == "random":
                self.mask_generator = RandomMaskGenerator((grid, grid), num_masking_patches)
            else:
                self.mask_generator = RandomSplitGenerator(
                    (grid, grid), num_masking_patches, min_num_patches, max_num_patches, min_aspect,
                    blockwise=masking == "split",
                )
            self.train_transform = BeitPretrainTransform(
                input_size, tokenizer_size, self.mask_generator, scale=scale,
                color_jitter=color_jitter, hflip=hflip, mean=mean, std=std, tokenizer_interpolation=tokenizer_interpolation,
                fast_decode=fast_decode, device_augment=device_augment,
            )
            if device_augment:
                self.device_views = DeviceViews(self.train_transform)
            # Validation: the same masking on deterministic full-image views without colour augmentation.
            self.val_transform = BeitPretrainTransform(
                input_size, tokenizer_size, self.mask_generator, scale=(1.0, 1.0), ratio=(1.0, 1.0),
                color_jitter=0.0, hflip=0.0, mean=mean, std=std, tokenizer_interpolation=tokenizer_interpolation,
            )
        elif mode == "tokenizer":
            self.mask_generator = None
            self.train_transform = TokenizerViewTransform(
                tokenizer_size, scale=scale, hflip=hflip, interpolation=tokenizer_interpolation
            )
            if tokenizer_val_crop_pct is None:
                self.val_transform = TokenizerViewTransform(
                    tokenizer_size, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, interpolation=tokenizer_interpolation
                )
            else:
                self.val_transform = TokenizerEvalTransform(tokenizer_size, tokenizer_val_crop_pct, tokenizer_interpolation)
        elif mode == "gan":  # whole images in [-1, 1] (mean/std 0.5), flips only: tasks.GANTraining
            self.mask_generator = None
            self.mean, self.std = tuple(mean), tuple(std)
            self.train_transform = GanImageTransform(input_size, hflip=hflip, mean=mean, std=std,
                                                     interpolation=train_interpolation)
            self.val_transform = GanImageTransform(input_size, hflip=0.0, mean=mean, std=std,
                                                   interpolation=train_interpolation)
        else:
            self.mask_generator = None
            self.train_transform = ClassificationTransform(
                input_size=input_size, is_training=True, scale=tuple(scale), hflip=hflip, color_jitter=color_jitter,
                auto_augment=auto_augment, interpolation=train_interpolation, re_prob=reprob, re_mode="pixel", re_count=1,
                mean=tuple(mean), std=tuple(std),
            )
            self.val_transform = ClassificationTransform(
                input_size=input_size, is_training=False, interpolation="bicubic", crop_pct=crop_pct,
                mean=tuple(mean), std=tuple(std),
            )

    @property
    def skipped_samples(self) -> int:
        """Samples skipped because they could not be read or decoded (for in-memory data: only
        those the device could not decode, ``device_augment``)."""
        return self._device_skipped

    @property
    def _device_skipped(self) -> int:
        return self.device_views.skipped if self.device_views is not None else 0

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """``device_augment``: the views of a training batch are computed here, on its device."""
        if self.device_views is not None and isinstance(batch, dict) and "encoded" in batch:
            return self.device_views(batch)
        return batch

    def _loader(self, dataset: Dataset, shuffle: bool, drop_last: bool | None = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            drop_last=shuffle if drop_last is None else drop_last,
            generator=private_generator(getattr(self, "seed", 0)),
        )


class _Samples(Dataset):
    """Turn ``(image, label)`` pairs into batch dicts with ``sample_transform``."""

    def __init__(self, images: Dataset, sample_transform) -> None:
        self.images, self.sample_transform = images, sample_transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if isinstance(self.images, ImageFiles):  # the transform may decode (and fail) itself
            sample, label = self.images.sample(index, self.sample_transform)
        else:
            img, label = self.images[index]
            sample = self.sample_transform(img)
        sample["label"] = torch.tensor(label, dtype=torch.long)
        return sample


class ImageFiles(Dataset):
    """``(PIL image, label)`` from a list of ``(path, label)``; label -1 for unlabeled images.

    An image that cannot be opened or decoded (corrupt, truncated, missing, unreadable) does not
    stop training: it is skipped with a warning naming the file (once per file and process),
    counted in ``skipped``, and replaced by the next readable file of the list (wrapping around
    at the end), image and label. The substitute depends only on the index and on which files are
    readable, so the same index always gives the same sample, and batches keep their size. Each
    request of an unreadable index counts once, however many unreadable files follow it. Files
    found unreadable are remembered by each process and not opened again. Through
    :meth:`sample`, a transform that decodes itself (``accepts_undecoded``: the fast pre-training
    path) gets the image undecoded, and a file it fails to decode is skipped the same way.

    Args:
        files: ``(path, label)`` pairs.
        classes: class names (index = label).
        skipped: counter of skipped samples shared with data-loader workers (a new one if ``None``).

    Raises:
        RuntimeError: from ``__getitem__`` when no file can be read, from the requested index on
            through the whole list (or through ``MAX_SUBSTITUTE_TRIES`` files).
    """

    MAX_SUBSTITUTE_TRIES = 10_000

    def __init__(self, files: list[tuple[str, int]], classes: list[str], skipped: SharedCounter | None = None) -> None:
        self.files, self.classes = files, classes
        self.skipped = skipped if skipped is not None else SharedCounter()
        self._unreadable: set[str] = set()  # files found unreadable by this process

    def __len__(self) -> int:
        return len(self.files)

    def _read(self, index: int) -> tuple[Image.Image, int] | None:
        """The sample at ``index``, or ``None`` (with a warning the first time) if it cannot be read."""
        path, label = self.files[index]
        if path in self._unreadable:
            return None
        try:
            with Image.open(path) as img:
                return img.convert("RGB"), label
        except Exception as err:  # noqa: BLE001 - any unreadable file is skipped, named and counted
            self._unusable(path, err)
            return None

    def _unusable(self, path: str, err: Exception) -> None:
        self._unreadable.add(path)
        warnings.warn(
            f"skipping unreadable image {path!r} ({type(err).__name__}: {err}); the next readable image of "
            "the folder takes its place",
            stacklevel=4,
        )

    def _read_undecoded(self, index: int, transform) -> tuple[dict, int] | None:
        """``transform`` applied to the image at ``index`` handed over undecoded (``Image.open`` on
        the file's bytes in memory: no file handle stays open), or ``None`` (with a warning the
        first time) if the file cannot be read or the transform cannot decode it
        (:class:`~.decode.ImageDecodeError`)."""
        path, label = self.files[index]
        if path in self._unreadable:
            return None
        try:
            with open(path, "rb") as f:
                img = open_encoded(f.read())
        except Exception as err:  # noqa: BLE001 - any unreadable file is skipped, named and counted
            self._unusable(path, err)
            return None
        try:
            return transform(img), label
        except ImageDecodeError as err:  # only decoding: a bug elsewhere in the transform still raises
            self._unusable(path, err)
            return None

    def sample(self, index: int, transform=None):
        """``(transform(image), label)`` of the first usable file from ``index`` on (see the class
        docstring). A transform with ``accepts_undecoded`` true gets the image undecoded and
        decodes it itself (its decoding errors skip the file as unreadable ones do); any other
        transform gets the decoded RGB image."""
        if transform is not None and getattr(transform, "accepts_undecoded", False):
            return self._first_usable(index, lambda i: self._read_undecoded(i, transform))
        img, label = self._first_usable(index, self._read)
        return (transform(img) if transform is not None else img), label

    def _first_usable(self, index: int, read):
        n = len(self.files)
        index = int(index) % n if n else int(index)
        sample = read(index)
        if sample is not None:
            return sample
        self.skipped.add()
        tries = min(n, self.MAX_SUBSTITUTE_TRIES)
        for step in range(1, tries):
            sample = read((index + step) % n)
            if sample is not None:
                return sample
        path = self.files[index][0]
        what = (
            f"none of the {n} image files could be read" if tries == n
            else f"{tries} image files in a row (of {n}) could not be read"
        )
        raise RuntimeError(
            f"{what}, from {path!r} on: check the folder (the warnings give each file's error)"
        )

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self._first_usable(index, self._read)


class ImageFolderDataModule(BeitDataModule):
    """Images under ``<root>/<train_dir>`` (and ``<root>/<val_dir>``): class sub-folders as in
    torchvision's ``ImageFolder``, or, without sub-folders, every image of the tree unlabeled.

    Args:
        root: the data set folder.
        train_dir, val_dir: sub-folders of ``root``; a missing ``val_dir`` means no validation.
        labelled: ``None``: sub-folders are classes when present; ``False``: all images unlabeled.
        seed: seed of the repeated-augmentation sampler's order (``repeated_aug > 1``).
        **kwargs: see :class:`BeitDataModule`.

    Unreadable images are skipped with a warning and replaced by the next readable one (see
    :class:`ImageFiles`); ``skipped_samples`` counts them across workers for
    :class:`~beit_lightning.callbacks.SkippedSamplesMonitor` (``data/skipped``).
    """

    def __init__(
        self, root: str, train_dir: str = "train", val_dir: str | None = "val", labelled: bool | None = None,
        seed: int = 0, **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.root, self.train_dir, self.val_dir, self.labelled = root, train_dir, val_dir, labelled
        self.seed = seed
        self._skipped = SharedCounter()
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.classes: list[str] = []

    @property
    def skipped_samples(self) -> int:
        """Samples replaced because their file could not be read (see :class:`ImageFiles`), over
        training and validation and all data-loader workers of this process (and those the device
        could not decode, ``device_augment``)."""
        return self._skipped.value + self._device_skipped

    def _images(self, sub: str | None, required: bool) -> ImageFiles | None:
        path = os.path.join(self.root, sub) if sub else None
        if path is None or not os.path.isdir(path):
            if required:
                raise FileNotFoundError(f"no training images at {path!r}: set data.root (and data.train_dir)")
            return None
        files, classes = list_images(path, self.labelled)
        if not files:
            raise ValueError(f"no images found under {path!r}")
        self.classes = self.classes or classes
        return ImageFiles(files, classes, skipped=self._skipped)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = _Samples(self._images(self.train_dir, True), self.train_transform)
            val = self._images(self.val_dir, False)
            self.val_set = _Samples(val, self.val_transform) if val is not None else None

    def train_dataloader(self) -> DataLoader:
        if self.repeated_aug > 1:  # DeiT's repeated augmentation: a DistributedSampler that Lightning keeps
            sampler = RepeatedAugmentationSampler(self.train_set, repeats=self.repeated_aug, seed=self.seed)
            return DataLoader(
                self.train_set, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                pin_memory=self.pin_memory and torch.cuda.is_available(), drop_last=True, generator=private_generator(self.seed),
                persistent_workers=self.persistent_workers and self.num_workers > 0,
            )
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_set, shuffle=False) if self.val_set is not None else []


class ImageShardsDataModule(BeitDataModule):
    """Webdataset shards (``.jpg``/``.png`` + ``.cls``) streamed correctly under DDP.

    Args:
        train_urls: shard pattern(s), e.g. ``/data/in1k/train/shard-{000000..001281}.tar`` or
            ``pipe:aws s3 cp s3://bucket/shard-{000000..001281}.tar -``.
        val_urls: validation shards, or ``None``.
        samples_per_epoch: samples per training epoch over all ranks; defaults to the shards'
            ``index.json`` count (required for remote shards).
        val_samples: validation samples; defaults to the index count.
        resampled: draw training shards with replacement (recommended for multi-node runs).
        shuffle_buffer: samples shuffled in a buffer per worker.
        seed: seed of shard order, shuffling and augmentation (per epoch, rank and worker).
        **kwargs: see :class:`BeitDataModule`.
    """

    def __init__(
        self,
        train_urls: str | Sequence[str],
        val_urls: str | Sequence[str] | None = None,
        samples_per_epoch: int | None = None,
        val_samples: int | None = None,
        resampled: bool = False,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.train_urls, self.val_urls = train_urls, val_urls
        self.samples_per_epoch, self.val_samples = samples_per_epoch, val_samples
        self.resampled, self.shuffle_buffer, self.seed = resampled, shuffle_buffer, seed
        self._skipped = SharedCounter()
        self.train_stream: ShardStream | None = None
        self.val_stream: ShardStream | None = None
        self.classes: list[str] = []

    @property
    def skipped_samples(self) -> int:
        return self._skipped.value + self._device_skipped

    def _count(self, urls: list[str], given: int | None, what: str) -> int:
        if given is not None:
            return int(given)
        index = read_shard_index(urls)
        if index is None or not index["num_samples"]:
            raise ValueError(
                f"cannot tell how many samples the {what} shards hold (no index.json next to {urls[0]!r}): "
                f"set data.{'samples_per_epoch' if what == 'training' else 'val_samples'}"
            )
        self.classes = self.classes or list(index.get("classes", []))
        return int(index["num_samples"])

    def _stream(self, urls: list[str], count: int, train: bool) -> ShardStream:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        slots = world * max(1, self.num_workers)
        if not (train and self.resampled) and 1 < len(urls) < slots:
            rank_zero_info(
                f"{len(urls)} {'training' if train else 'validation'} shards for {slots} readers (ranks x workers): "
                "each reader scans every shard and keeps its share of samples; write more, smaller shards to avoid "
                "reading them several times"
            )
        return ShardStream(
            urls, self.train_transform if train else self.val_transform,
            samples_per_epoch=count, batch_size=self.batch_size, num_workers=self.num_workers,
            rank=rank, world_size=world, resampled=self.resampled and train, shuffle=train,
            shuffle_buffer=self.shuffle_buffer, seed=self.seed, skipped=self._skipped,
            repeats=self.repeated_aug if train else 1,
        )

    def setup(self, stage: str | None = None) -> None:
        if self.train_stream is None:
            urls = expand_urls(self.train_urls)
            self.train_stream = self._stream(urls, self._count(urls, self.samples_per_epoch, "training"), True)
            if self.val_urls:
                val = expand_urls(self.val_urls)
                self.val_stream = self._stream(val, self._count(val, self.val_samples, "validation"), False)

    def _train_position(self) -> tuple[int, int] | None:
        """(epoch, batches of it already trained): not 0 after a mid-epoch resume.

        From the restored optimiser steps: an epoch of ``B`` batches takes ``ceil(B / accumulate)``
        steps (Lightning steps at the end of an epoch whatever the accumulation), and a checkpoint
        inside an epoch falls on a step boundary, after ``(steps into the epoch) x accumulate``
        batches. ``B`` honours ``limit_train_batches``.
        """
        trainer = self.trainer
        if trainer is None:
            return None
        per_epoch = len(self.train_stream) // self.batch_size
        limited = getattr(trainer, "num_training_batches", float("inf"))
        if limited != float("inf") and 0 < limited < per_epoch:
            per_epoch = int(limited)
        accumulate = max(1, trainer.accumulate_grad_batches)
        steps_per_epoch = math.ceil(per_epoch / accumulate)
        done = (trainer.global_step - trainer.current_epoch * steps_per_epoch) * accumulate
        return trainer.current_epoch, min(max(0, done), per_epoch)

    def _stream_loader(self, stream: ShardStream, position_fn) -> EpochLoader:
        return EpochLoader(
            stream,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            position_fn=position_fn,
        )

    def train_dataloader(self) -> EpochLoader:
        return self._stream_loader(self.train_stream, self._train_position)

    def val_dataloader(self) -> EpochLoader | list:
        # validation reads the same samples every time: epoch 0's plan from its start, no shuffling
        return self._stream_loader(self.val_stream, lambda: (0, 0)) if self.val_stream is not None else []


def write_shards_once(out_dir: str, records, classes: list[str], samples_per_shard: int) -> None:
    """Write ``records()`` as shards into ``out_dir`` unless a complete set (with its index) is
    there: into a temporary folder renamed into place, so concurrent writers (one per node) and
    a killed writer never leave a half-written set that looks complete."""
    if os.path.isfile(os.path.join(out_dir, "index.json")):
        return
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    write_shards(records(), tmp, classes=classes, samples_per_shard=samples_per_shard)
    try:
        os.replace(tmp, out_dir)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)


def default_cache_dir() -> str:
    """Where generated data is written: ``$BEIT_LIGHTNING_CACHE`` or ``~/.cache/beit_lightning``."""
    return os.environ.get("BEIT_LIGHTNING_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "beit_lightning")


def shard_pattern(folder: str, num_samples: int, samples_per_shard: int) -> str:
    last = (num_samples - 1) // samples_per_shard
    return os.path.join(folder, f"shard-{{000000..{last:06d}}}.tar")


class GeneratedDataModule(ImageShardsDataModule):
    """The embedded default data (:class:`~beit_lightning.data.GeneratedImages`), written once as
    JPEG shards (``prepare_data``, on one process per node) and then streamed like real shards.

    Args:
        num_train, num_val: data set sizes.
        image_size: side of the generated images before the crop.
        num_classes: how many of the shape classes to use.
        seed: seed of the images (train and val use different streams) and of the reading.
        samples_per_shard: samples in each written shard.
        cache_dir: where shards go (default :func:`default_cache_dir`); reused when present.
        **kwargs: see :class:`ImageShardsDataModule` and :class:`BeitDataModule`.
    """

    VERSION = 1  # bump when the generator changes, so that stale shards are not reused

    def __init__(
        self,
        num_train: int = 1024,
        num_val: int = 128,
        image_size: int = 64,
        num_classes: int = 10,
        seed: int = 0,
        samples_per_shard: int = 64,
        cache_dir: str | None = None,
        **kwargs,
    ) -> None:
        self.num_train, self.num_val = num_train, num_val
        self.image_size, self.num_classes, self.samples_per_shard = image_size, num_classes, samples_per_shard
        name = f"generated-v{self.VERSION}-{image_size}px-{num_classes}c-seed{seed}-{samples_per_shard}ps"
        self.data_dir = os.path.join(cache_dir or default_cache_dir(), name)
        train_dir = os.path.join(self.data_dir, f"train-{num_train}")
        val_dir = os.path.join(self.data_dir, f"val-{num_val}")
        self._splits = [(train_dir, num_train, seed), (val_dir, num_val, seed + 1_000_003)]
        super().__init__(
            train_urls=shard_pattern(train_dir, num_train, samples_per_shard),
            val_urls=shard_pattern(val_dir, num_val, samples_per_shard) if num_val > 0 else None,
            seed=seed,
            **kwargs,
        )

    def prepare_data(self) -> None:
        """Write the shards unless a complete set (with its index) is there already."""
        for out_dir, count, seed in self._splits:
            if count > 0:
                write_shards_once(out_dir, lambda c=count, s=seed: generated_records(c, self.image_size, self.num_classes, seed=s),
                                  list(CLASS_NAMES[: self.num_classes]), self.samples_per_shard)

    def setup(self, stage: str | None = None) -> None:
        if self.trainer is None:  # used outside a Trainer: nobody called prepare_data
            self.prepare_data()
        super().setup(stage)
