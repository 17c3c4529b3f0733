"""Plain ``nn.Module`` models (no Lightning): BEiT for masked image modeling, classifiers, BEiT +
UperNet for segmentation, and the tokenizers."""

from .beit import PRETRAIN_BACKBONE_DEFAULTS, BeitForMaskedImageModeling, beit_init_
from .classifier import create_classifier
from .segmentation import BeitUperNet, create_segmenter
from .tokenizers import DallETokenizer, VisualTokenizer

__all__ = ["PRETRAIN_BACKBONE_DEFAULTS", "BeitForMaskedImageModeling", "BeitUperNet", "DallETokenizer", "VisualTokenizer",
           "beit_init_", "create_classifier", "create_segmenter"]
