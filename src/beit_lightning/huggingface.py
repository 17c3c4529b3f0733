"""Hugging Face ``transformers`` interop: the public names, kept here for existing imports.

The code lives in :mod:`beit_lightning.weights`: ``hf_names`` (the name tables), ``hf_format``
(reading transformers checkpoints), ``hf_model`` (our model from a transformers folder),
``hf_export`` (writing one, with the identity-layer padding for segmentation explained there),
``model_card`` and ``run_folder``. Every name below is the same object as there.
"""

from .weights.hf_export import export_hf, export_hf_checkpoint, to_hf
from .weights.hf_format import (
    check_segmentation_out_indices,
    from_hf_state_dict,
    is_hf_checkpoint,
    is_hf_state_dict,
    read_hf_checkpoint,
    segmentation_out_indices,
)
from .weights.hf_model import create_model_from_hf
from .weights.hf_names import CONFIG_KEY, HF_CLASSES, HFExportError, model_kind
from .weights.model_card import image_processor_config, model_card
from .weights.run_folder import checkpoint_metrics, find_run_config

__all__ = [
    "CONFIG_KEY",
    "HF_CLASSES",
    "HFExportError",
    "check_segmentation_out_indices",
    "checkpoint_metrics",
    "create_model_from_hf",
    "export_hf",
    "export_hf_checkpoint",
    "find_run_config",
    "from_hf_state_dict",
    "image_processor_config",
    "is_hf_checkpoint",
    "is_hf_state_dict",
    "model_card",
    "model_kind",
    "read_hf_checkpoint",
    "segmentation_out_indices",
    "to_hf",
]
