"""Data: blockwise masking, transforms, generated data, shard writing and streaming, DataModules."""

from .datamodule import (
    BeitDataModule,
    ClassificationTransform,
    GeneratedDataModule,
    ImageFolderDataModule,
    ImageShardsDataModule,
)
from .generated import CLASS_NAMES, SEGMENTATION_CLASS_NAMES, GeneratedImages, GeneratedSegmentation
from .masking import BlockwiseMaskGenerator, RandomMaskGenerator, RandomSplitGenerator
from .retrieval import GeneratedRetrievalDataModule, RetrievalDataModule, RetrievalFolderDataModule
from .samplers import ClassBalancedSampler
from .segmentation import (
    ADE20K_CLASSES,
    ADE20KDataModule,
    GeneratedSegmentationDataModule,
    SegmentationDataModule,
    SegmentationShardsDataModule,
    SegmentationShardStream,
)
from .segmentation_transforms import SegmentationEvalTransform, SegmentationTrainTransform
from .shards import (
    ShardRecord,
    folder_records,
    generated_records,
    generated_segmentation_records,
    segmentation_records,
    write_shards,
)
from .streaming import EpochLoader, ShardStream
from .transforms import IMAGENET_MEAN, IMAGENET_STD, BeitPretrainTransform

__all__ = [
    "ADE20K_CLASSES",
    "CLASS_NAMES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SEGMENTATION_CLASS_NAMES",
    "ADE20KDataModule",
    "BeitDataModule",
    "BeitPretrainTransform",
    "BlockwiseMaskGenerator",
    "RandomMaskGenerator",
    "ClassBalancedSampler",
    "ClassificationTransform",
    "EpochLoader",
    "GeneratedDataModule",
    "GeneratedImages",
    "GeneratedRetrievalDataModule",
    "GeneratedSegmentation",
    "GeneratedSegmentationDataModule",
    "ImageFolderDataModule",
    "ImageShardsDataModule",
    "RetrievalDataModule",
    "RetrievalFolderDataModule",
    "RandomSplitGenerator",
    "SegmentationDataModule",
    "SegmentationEvalTransform",
    "SegmentationShardStream",
    "SegmentationShardsDataModule",
    "SegmentationTrainTransform",
    "ShardRecord",
    "ShardStream",
    "folder_records",
    "generated_records",
    "generated_segmentation_records",
    "segmentation_records",
    "write_shards",
]
