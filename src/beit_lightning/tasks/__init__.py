"""LightningModules, one per training task."""

from .classification import ImageClassification
from .linear_probe import LinearProbe
from .pretraining import MaskedImageModeling, NonFiniteLossError
from .segmentation import SemanticSegmentation
from .tokenizer import TokenizerTraining

__all__ = ["ImageClassification", "LinearProbe", "MaskedImageModeling", "NonFiniteLossError", "SemanticSegmentation",
           "TokenizerTraining"]
