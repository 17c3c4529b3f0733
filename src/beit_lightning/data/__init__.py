"""Data: blockwise masking, the BEiT two-view transform, generated data and DataModules."""

from .datamodule import BeitDataModule, GeneratedDataModule, ImageFolderDataModule
from .generated import CLASS_NAMES, GeneratedImages
from .masking import BlockwiseMaskGenerator
from .transforms import IMAGENET_MEAN, IMAGENET_STD, BeitPretrainTransform

__all__ = [
    "CLASS_NAMES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BeitDataModule",
    "BeitPretrainTransform",
    "BlockwiseMaskGenerator",
    "GeneratedDataModule",
    "GeneratedImages",
    "ImageFolderDataModule",
]
