"""LightningModules, one per training task."""

from .pretraining import MaskedImageModeling, NonFiniteLossError
from .tokenizer import TokenizerTraining

__all__ = ["MaskedImageModeling", "NonFiniteLossError", "TokenizerTraining"]
