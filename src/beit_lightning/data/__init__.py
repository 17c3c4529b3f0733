"""Data: blockwise masking, transforms, generated data, shard writing and streaming, DataModules."""

from .datamodule import (
    BeitDataModule,
    ClassificationTransform,
    GeneratedDataModule,
    ImageFolderDataModule,
    ImageShardsDataModule,
)
from .generated import CLASS_NAMES, GeneratedImages
from .masking import BlockwiseMaskGenerator
from .shards import ShardRecord, folder_records, generated_records, write_shards
from .streaming import EpochLoader, ShardStream
from .transforms import IMAGENET_MEAN, IMAGENET_STD, BeitPretrainTransform

__all__ = [
    "CLASS_NAMES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BeitDataModule",
    "BeitPretrainTransform",
    "BlockwiseMaskGenerator",
    "ClassificationTransform",
    "EpochLoader",
    "GeneratedDataModule",
    "GeneratedImages",
    "ImageFolderDataModule",
    "ImageShardsDataModule",
    "ShardRecord",
    "ShardStream",
    "folder_records",
    "generated_records",
    "write_shards",
]
