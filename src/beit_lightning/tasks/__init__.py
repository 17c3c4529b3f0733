"""LightningModules, one per training task."""

from .pretraining import MaskedImageModeling, NonFiniteLossError

__all__ = ["MaskedImageModeling", "NonFiniteLossError"]
