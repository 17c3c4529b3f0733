"""Checkpoint loading and timm export: the public names, kept here for existing imports.

The code lives in :mod:`beit_lightning.weights` (``loader``, ``official``, ``lightning``,
``timm_export``, ``run_folder``, ``cli``); every name below is the same object as there.
"""

from .weights.cli import export_main
from .weights.loader import (
    PRETRAINING_MODELS,
    CheckpointMismatchError,
    LoadResult,
    load_checkpoint,
    read_state_dict,
)
from .weights.official import (
    MIM_ONLY_PREFIXES,
    NEW_HEAD_PREFIXES,
    SEGMENTATION_PREFIXES,
    to_flat_beit_state_dict,
)
from .weights.run_folder import newest_checkpoint
from .weights.timm_export import export_timm

__all__ = [
    "MIM_ONLY_PREFIXES",
    "NEW_HEAD_PREFIXES",
    "PRETRAINING_MODELS",
    "SEGMENTATION_PREFIXES",
    "CheckpointMismatchError",
    "LoadResult",
    "export_main",
    "export_timm",
    "load_checkpoint",
    "newest_checkpoint",
    "read_state_dict",
    "to_flat_beit_state_dict",
]
