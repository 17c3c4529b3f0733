"""DataModules for image retrieval (task ``retrieval``): class-balanced training batches, and an
evaluation set of queries and gallery whose classes are disjoint from training.

Batches: ``{"image", "label", "index"}`` for training; evaluation adds ``"is_query"`` and
``"is_gallery"`` (bool). ``index`` identifies a sample within its split, so that a query is left out
of its own gallery and samples repeated by a distributed sampler are counted once.

* :class:`RetrievalFolderDataModule`: ``<root>/train/<class>/*`` and ``<root>/test/<class>/*`` (SOP,
  CUB-200-2011; every test image is a query searched among the other test images), optionally a
  separate gallery ``<root>/gallery/<class>/*`` with ``<root>/query/...`` as queries (In-Shop);
* :class:`GeneratedRetrievalDataModule`: generated (structure, hue) classes, disjoint between
  training and test (:func:`~beit_lightning.data.generated.retrieval_split`), drawn on the fly.

Transforms (paper §4.2): training resizes to ``resize_size`` x ``resize_size`` (256), takes a random
``input_size`` crop (224) and flips horizontally; evaluation resizes the same way and takes the
centre crop.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from .datamodule import ImageFiles
from .generated import GeneratedRetrievalImages, retrieval_split
from .samplers import ClassBalancedSampler
from .streaming import SharedCounter, private_generator
from .transforms import IMAGENET_MEAN, IMAGENET_STD, interpolation_mode

__all__ = ["GeneratedRetrievalDataModule", "RetrievalDataModule", "RetrievalFolderDataModule"]


class RetrievalSamples(Dataset):
    """Batch dicts from ``(PIL image, label)`` pairs: the transformed image, the label, the sample's
    index and, for evaluation, its roles (query, gallery)."""

    def __init__(self, images: Dataset, transform, is_query: bool = True, is_gallery: bool = True,
                 index_offset: int = 0, roles: bool = False) -> None:
        self.images, self.transform = images, transform
        self.is_query, self.is_gallery, self.index_offset, self.roles = is_query, is_gallery, index_offset, roles

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self.images):
            raise IndexError(index)
        img, label = self.images[index]
        sample = {"image": self.transform(img.convert("RGB")), "label": torch.tensor(label, dtype=torch.long),
                  "index": torch.tensor(self.index_offset + index, dtype=torch.long)}
        if self.roles:
            sample["is_query"] = torch.tensor(self.is_query)
            sample["is_gallery"] = torch.tensor(self.is_gallery)
        return sample


class RetrievalDataModule(pl.LightningDataModule):
    """Base DataModule of the retrieval task: transforms, class-balanced training loader, evaluation
    loader. Subclasses fill ``train_images`` (with ``train_labels``) and ``eval_sets`` in ``setup``.

    Args:
        batch_size: per-device training batch, a multiple of ``samples_per_class``.
        samples_per_class: ``m``, images of one class in a training batch.
        eval_batch_size: per-device batch for computing the evaluation descriptors.
        num_workers: data-loader worker processes per device.
        input_size: side of the crop the model sees (= the model's ``img_size``).
        resize_size: images are first resized to this square side (paper: 256 for 224 crops); ``None``:
            ``round(input_size * 256 / 224)``, the paper's ratio at any input size.
        hflip: probability of a horizontal flip in training.
        interpolation: the resizing filter (``"bilinear"``, ``"bicubic"``, ``"lanczos"``, ``"nearest"``).
        mean, std: normalisation (ImageNet's for ImageNet pre-trained DeiT weights).
        seed: seed of the class-balanced order (per epoch).
    """

    data_kind = "retrieval"

    def __init__(
        self,
        batch_size: int = 64,
        samples_per_class: int = 2,
        eval_batch_size: int = 256,
        num_workers: int = 8,
        input_size: int = 224,
        resize_size: int | None = None,
        hflip: float = 0.5,
        interpolation: str = "bilinear",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        seed: int = 0,
        pin_memory: bool = True,
        persistent_workers: bool = True,
    ) -> None:
        super().__init__()
        if samples_per_class < 2:
            raise ValueError(f"samples_per_class must be >= 2 (an anchor needs a positive in its batch); got {samples_per_class}")
        if batch_size % samples_per_class:
            raise ValueError(f"batch_size={batch_size} must be a multiple of samples_per_class={samples_per_class}")
        resize_size = round(input_size * 256 / 224) if resize_size is None else resize_size
        if resize_size < input_size:
            raise ValueError(f"resize_size={resize_size} must be at least input_size={input_size}")
        self.batch_size, self.samples_per_class, self.eval_batch_size = batch_size, samples_per_class, eval_batch_size
        self.num_workers, self.input_size, self.seed = num_workers, input_size, seed
        self.pin_memory, self.persistent_workers = pin_memory, persistent_workers
        self.mean, self.std = tuple(mean), tuple(std)
        resize = T.Resize((resize_size, resize_size), interpolation=interpolation_mode(interpolation))
        normalise = [T.ToTensor(), T.Normalize(self.mean, self.std)]
        self.train_transform = T.Compose([resize, T.RandomCrop(input_size), T.RandomHorizontalFlip(hflip), *normalise])
        self.eval_transform = T.Compose([resize, T.CenterCrop(input_size), *normalise])
        self.train_images: Dataset | None = None
        self.train_labels: list[int] = []
        self.eval_sets: list[RetrievalSamples] = []
        self._skipped = SharedCounter()

    @property
    def skipped_samples(self) -> int:
        """Samples replaced because their file could not be read (0 for generated data)."""
        return self._skipped.value

    def _check_disjoint(self, train_classes: Sequence[str], test_classes: Sequence[str]) -> None:
        shared = sorted(set(train_classes) & set(test_classes))
        if shared:
            raise ValueError(
                f"{len(shared)} classes are in both the training and the test split ({', '.join(shared[:5])}"
                f"{', ...' if len(shared) > 5 else ''}): retrieval is evaluated on classes never seen in training; "
                "split the classes (e.g. SOP: the first 11,318 product classes train, the other 11,316 test)"
            )

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def train_dataloader(self) -> DataLoader:
        world, rank = self._world()
        sampler = ClassBalancedSampler(self.train_labels, self.batch_size, self.samples_per_class, seed=self.seed,
                                       num_replicas=world, rank=rank)
        return DataLoader(
            RetrievalSamples(self.train_images, self.train_transform), batch_size=self.batch_size, sampler=sampler,
            drop_last=True, num_workers=self.num_workers, pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and self.num_workers > 0, generator=private_generator(self.seed),
        )

    def val_dataloader(self) -> DataLoader:
        sets = self.eval_sets
        data = sets[0] if len(sets) == 1 else torch.utils.data.ConcatDataset(sets)
        return DataLoader(
            data, batch_size=self.eval_batch_size, shuffle=False, num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and self.num_workers > 0, generator=private_generator(self.seed),
        )


def _folder_files(path: str, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    return make_dataset(path, {c: i for c, i in class_to_idx.items() if os.path.isdir(os.path.join(path, c))},
                        extensions=IMG_EXTENSIONS, allow_empty=True)


class RetrievalFolderDataModule(RetrievalDataModule):
    """A retrieval data set as class sub-folders: ``<root>/<train_dir>/<class>/*`` for training and
    ``<root>/<test_dir>/<class>/*`` for evaluation, with no class in both (checked).

    Without ``gallery_dir`` (SOP, CUB-200-2011), every test image is a query searched among all the
    other test images. With ``gallery_dir`` (In-Shop: ``test_dir=query``, ``gallery_dir=gallery``),
    the ``test_dir`` images are the queries and the ``gallery_dir`` images the gallery; a class is
    the same class in both when its sub-folder has the same name.

    Unreadable images are skipped with a warning and replaced by the next readable one of their
    split (:class:`~beit_lightning.data.datamodule.ImageFiles`); ``skipped_samples`` counts them.

    Args:
        root: the data set folder.
        train_dir, test_dir, gallery_dir: sub-folders of ``root``.
        **kwargs: see :class:`RetrievalDataModule`.
    """

    def __init__(self, root: str, train_dir: str = "train", test_dir: str = "test", gallery_dir: str | None = None,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.root, self.train_dir, self.test_dir, self.gallery_dir = root, train_dir, test_dir, gallery_dir

    def _classes(self, sub: str) -> list[str]:
        path = os.path.join(self.root, sub)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no folder {path!r}: set data.root (and data.{sub}_dir) to a folder with "
                                    f"{sub}/<class>/<images> (README: image retrieval)")
        try:
            return find_classes(path)[0]
        except FileNotFoundError:
            raise FileNotFoundError(f"no class sub-folders under {path!r}") from None

    def _files(self, sub: str, class_to_idx: dict[str, int]) -> ImageFiles:
        files = _folder_files(os.path.join(self.root, sub), class_to_idx)
        if not files:
            raise ValueError(f"no images found under {os.path.join(self.root, sub)!r}")
        return ImageFiles(files, list(class_to_idx), skipped=self._skipped)

    def setup(self, stage: str | None = None) -> None:
        if self.train_images is not None:
            return
        train_classes = self._classes(self.train_dir)
        test_classes = self._classes(self.test_dir)
        gallery_classes = self._classes(self.gallery_dir) if self.gallery_dir else []
        eval_names = sorted(set(test_classes) | set(gallery_classes))
        self._check_disjoint(train_classes, eval_names)
        self.train_images = self._files(self.train_dir, {c: i for i, c in enumerate(train_classes)})
        self.train_labels = [label for _, label in self.train_images.files]
        eval_idx = {c: i for i, c in enumerate(eval_names)}
        queries = self._files(self.test_dir, eval_idx)
        if self.gallery_dir is None:
            self.eval_sets = [RetrievalSamples(queries, self.eval_transform, roles=True)]
        else:
            gallery = self._files(self.gallery_dir, eval_idx)
            self.eval_sets = [RetrievalSamples(queries, self.eval_transform, is_gallery=False, roles=True),
                              RetrievalSamples(gallery, self.eval_transform, is_query=False, roles=True,
                                               index_offset=len(queries))]


class GeneratedRetrievalDataModule(RetrievalDataModule):
    """Generated retrieval data (no download): ``num_hues x 10`` (structure, hue) classes split into
    disjoint training and test classes (:func:`~beit_lightning.data.generated.retrieval_split`), each
    image drawn on the fly and deterministic in ``(seed, index)``; every test image is a query
    searched among the other test images (SOP's protocol).

    Args:
        train_images_per_class, test_images_per_class: images of each class in each split.
        image_size: side of the drawn images (then resized to ``resize_size`` and cropped to ``input_size``).
        num_hues: hue families (2-6): ``5 * num_hues`` classes in each split.
        **kwargs: see :class:`RetrievalDataModule`.
    """

    def __init__(self, train_images_per_class: int = 16, test_images_per_class: int = 8, image_size: int = 32,
                 num_hues: int = 6, **kwargs) -> None:
        super().__init__(**kwargs)
        self.train_classes, self.test_classes = retrieval_split(num_hues)
        self.train_images_per_class, self.test_images_per_class = train_images_per_class, test_images_per_class
        self.image_size = image_size
        if test_images_per_class < 2:
            raise ValueError(f"test_images_per_class must be >= 2 (a query needs another image of its class); got {test_images_per_class}")

    def setup(self, stage: str | None = None) -> None:
        if self.train_images is not None:
            return
        train = GeneratedRetrievalImages(self.train_classes, self.train_images_per_class, self.image_size, seed=self.seed)
        test = GeneratedRetrievalImages(self.test_classes, self.test_images_per_class, self.image_size,
                                        seed=self.seed + 1_000_003)
        self._check_disjoint(train.classes, test.classes)
        self.train_images = _Cached(train)
        self.train_labels = [train.label(i) for i in range(len(train))]
        self.eval_sets = [RetrievalSamples(_Cached(test), self.eval_transform, roles=True)]


class _Cached(Dataset):
    """Keep drawn images in memory (the generated sets are small; drawing is the cost)."""

    def __init__(self, images: Dataset) -> None:
        self.images = images
        self._cache: dict[int, tuple[Image.Image, int]] = {}

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        if index not in self._cache:
            self._cache[index] = self.images[index]
        return self._cache[index]
