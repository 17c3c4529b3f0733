"""LightningModules, one per training task."""

from .classification import ImageClassification
from .gan import GANTraining
from .linear_probe import LinearProbe
from .pretraining import MaskedImageModeling, NonFiniteLossError
from .pretraining_v2 import MaskedImageModelingV2
from .retrieval import ImageRetrieval, RecallAtK
from .segmentation import SemanticSegmentation
from .splitmask import SplitMaskPretraining
from .tokenizer import TokenizerTraining

__all__ = ["GANTraining", "ImageClassification", "ImageRetrieval", "RecallAtK", "LinearProbe", "MaskedImageModeling", "MaskedImageModelingV2", "NonFiniteLossError", "SemanticSegmentation",
           "SplitMaskPretraining", "TokenizerTraining"]
