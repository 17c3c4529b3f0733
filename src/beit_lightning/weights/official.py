"""The official releases' layouts (microsoft/unilm ``beit/``, ``beit2/``; DeiT's ``{"model": ...}``)
and the one flat naming every reader brings a BEiT state dict to (timm's, which is also the official one:
``blocks.N.*``, ``rel_pos_bias.*``, ``mask_token``, ``lm_head.*``).

* classification and pre-training checkpoints: ``{"model": state_dict}`` (or ``"module"`` /
  ``"model_ema"``); BEiT v2's pre-training ones add the CLS pre-training head (``cls_pt_layers.*``,
  ``cls_pt_norm.*``, ``cls_pt_lm_head.*``), which no model here has;
* segmentation checkpoints (mmseg): ``{"meta": ..., "state_dict": {...}}`` with the four-scale neck
  inside the backbone (``backbone.fpn1-4``), which is our ``neck.fpn1-4``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["MIM_ONLY_PREFIXES", "NEW_HEAD_PREFIXES", "SEGMENTATION_PREFIXES", "V2_CLS_PRETRAINING_PREFIXES",
           "from_official_segmentation", "is_official_segmentation", "to_flat_beit_state_dict", "unwrap_official"]

#: keys a fine-tuning target may lack in the checkpoint: they start fresh
NEW_HEAD_PREFIXES = ("head.", "fc_norm.")

#: BEiT v2 pre-training's CLS head (patch aggregation blocks over an early layer's tokens)
V2_CLS_PRETRAINING_PREFIXES = ("cls_pt_",)

#: keys that only a masked-image-modeling model has
MIM_ONLY_PREFIXES = ("mask_token", "lm_head.")

#: the parts of a segmentation model around its backbone (BeitUperNet)
SEGMENTATION_PREFIXES = ("neck.", "decode_head.", "auxiliary_head.")

#: the keys under which the official scripts (BEiT, DeiT) save the network's state dict
WRAPPERS = ("model", "module", "model_ema")


def unwrap_official(obj: Mapping[str, Any]) -> dict[str, torch.Tensor] | None:
    """The state dict of an official ``{"model": ...}`` checkpoint, or ``None`` for another layout."""
    for wrapper in WRAPPERS:
        if wrapper in obj and isinstance(obj[wrapper], Mapping):
            return dict(obj[wrapper])
    return None


def is_official_segmentation(state: Mapping[str, Any]) -> bool:
    """An mmseg checkpoint's state dict: the neck inside the backbone (``backbone.fpnN.*``) and a decode head."""
    return any(k.startswith("backbone.fpn") for k in state) and any(k.startswith("decode_head.") for k in state)


def from_official_segmentation(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mmseg's ``backbone.fpnN.*`` -> our ``neck.fpnN.*``; everything else keeps its name."""
    return {("neck." + k[len("backbone."):] if k.startswith("backbone.fpn") else k): v for k, v in state.items()}


def to_flat_beit_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm/official naming: strip ``backbone.``/``module.`` prefixes, drop derived index buffers."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "backbone.", "encoder."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        if key.endswith("relative_position_index") or key.endswith(".k_bias"):
            continue
        out[key] = value
    return out
