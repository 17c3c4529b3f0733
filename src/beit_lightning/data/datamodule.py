"""LightningDataModules that emit the one batch format of DESIGN.md.

``BeitDataModule`` owns what every source shares: the BEiT two-view transform, the blockwise
mask generator sized from the backbone's patch grid, and the data loaders. A subclass only says
where images come from (:meth:`BeitDataModule.build_dataset`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder

from .generated import GeneratedImages
from .masking import BlockwiseMaskGenerator
from .transforms import BEIT_MEAN, BEIT_STD, BeitPretrainTransform


class _Samples(Dataset):
    """Turn ``(image, label)`` pairs into batch dicts with ``sample_transform``."""

    def __init__(self, images: Dataset, sample_transform) -> None:
        self.images, self.sample_transform = images, sample_transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        img, label = self.images[index]
        sample = self.sample_transform(img)
        sample["label"] = torch.tensor(label, dtype=torch.long)
        return sample


class BeitDataModule(pl.LightningDataModule):
    """Base DataModule for masked-image-modeling batches.

    Args:
        batch_size: per-device batch size.
        num_workers: data-loader worker processes.
        input_size: side of the backbone view; must match the model's ``img_size``.
        tokenizer_size: side of the tokenizer view; must match the tokenizer's ``image_size``.
        patch_size: backbone patch size; the mask grid is ``input_size // patch_size``.
        num_masking_patches, min_num_patches, max_num_patches, min_aspect: blockwise masking
            (BEiT: 75 of 196, 16, None, 0.3).
        scale, color_jitter, hflip, mean, std: the two-view transform (see
            :class:`BeitPretrainTransform`).
    """

    def __init__(
        self,
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
        mean: Sequence[float] = BEIT_MEAN,
        std: Sequence[float] = BEIT_STD,
        pin_memory: bool = True,
        persistent_workers: bool = True,
    ) -> None:
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size={input_size} is not a multiple of patch_size={patch_size}")
        self.batch_size, self.num_workers = batch_size, num_workers
        self.input_size, self.tokenizer_size, self.patch_size = input_size, tokenizer_size, patch_size
        self.pin_memory, self.persistent_workers = pin_memory, persistent_workers
        grid = input_size // patch_size
        self.mask_generator = BlockwiseMaskGenerator(
            (grid, grid), num_masking_patches, min_num_patches, max_num_patches, min_aspect
        )
        self.train_transform = BeitPretrainTransform(
            input_size, tokenizer_size, self.mask_generator, scale=scale,
            color_jitter=color_jitter, hflip=hflip, mean=mean, std=std,
        )
        # Validation: same masking, deterministic-size views without colour augmentation.
        self.val_transform = BeitPretrainTransform(
            input_size, tokenizer_size, self.mask_generator, scale=(1.0, 1.0), ratio=(1.0, 1.0),
            color_jitter=0.0, hflip=0.0, mean=mean, std=std,
        )
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def build_dataset(self, split: str) -> Dataset | None:
        """A data set of ``(PIL image, label)`` for ``split`` ('train' or 'val'), or ``None``."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = _Samples(self.build_dataset("train"), self.train_transform)
            val = self.build_dataset("val")
            self.val_set = _Samples(val, self.val_transform) if val is not None else None

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            drop_last=shuffle,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_set, shuffle=False) if self.val_set is not None else []


class GeneratedDataModule(BeitDataModule):
    """The embedded default data: :class:`GeneratedImages` (10 classes of structured shapes).

    Args:
        num_train, num_val: data set sizes.
        image_size: side of the generated images before the crop.
        num_classes: how many of the shape classes to use.
        seed: seed of the data set (train and val use different streams).
        **kwargs: see :class:`BeitDataModule`.
    """

    def __init__(
        self,
        num_train: int = 1024,
        num_val: int = 128,
        image_size: int = 64,
        num_classes: int = 10,
        seed: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.num_train, self.num_val = num_train, num_val
        self.image_size, self.num_classes, self.seed = image_size, num_classes, seed

    def build_dataset(self, split: str) -> Dataset | None:
        if split == "train":
            return GeneratedImages(self.num_train, self.image_size, self.num_classes, seed=self.seed)
        if self.num_val <= 0:
            return None
        return GeneratedImages(self.num_val, self.image_size, self.num_classes, seed=self.seed + 1_000_003)


class ImageFolderDataModule(BeitDataModule):
    """Images in class sub-folders: ``<root>/<train_dir>/<class>/*`` and ``<root>/<val_dir>/<class>/*``.

    Args:
        root: the data set folder.
        train_dir, val_dir: sub-folders of ``root``; a missing ``val_dir`` means no validation.
        **kwargs: see :class:`BeitDataModule`.
    """

    def __init__(self, root: str, train_dir: str = "train", val_dir: str | None = "val", **kwargs) -> None:
        super().__init__(**kwargs)
        self.root, self.train_dir, self.val_dir = root, train_dir, val_dir

    def build_dataset(self, split: str) -> Dataset | None:
        sub = self.train_dir if split == "train" else self.val_dir
        if sub is None:
            return None
        path = os.path.join(self.root, sub)
        if not os.path.isdir(path):
            if split == "train":
                raise FileNotFoundError(f"no training images at {path!r}: set data.root (and data.train_dir)")
            return None
        return ImageFolder(path)
