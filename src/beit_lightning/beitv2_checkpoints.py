"""BEiT v2's released files: the patch-aggregation head's keys on top of :func:`load_checkpoint`.

BEiT v2 files (microsoft/unilm ``beit2``) are v1 files plus, in the pre-training ones, the keys of
the patch-aggregation head: ``cls_pt_layers.N.*`` (and ``cls_pt_norm.*`` / ``cls_pt_lm_head.*``
when it was trained with ``--shared_lm_head False``). Fine-tuned v2 files have exactly v1's
layout. :func:`load_beitv2_checkpoint` takes those keys out, loads them into a
:class:`~beit_lightning.models.beitv2.BeitV2ForMaskedImageModeling` (checking names and shapes),
or reports them as dropped for any other target (a classifier, a segmenter, a v1 pre-training
model), and hands the rest to :func:`~beit_lightning.checkpoints.load_checkpoint`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .checkpoints import (
    CheckpointMismatchError,
    LoadResult,
    load_checkpoint,
    read_state_dict,
    to_flat_beit_state_dict,
)
from .models.beitv2 import PATCH_AGGREGATION_PREFIXES, BeitV2ForMaskedImageModeling

__all__ = ["load_beitv2_checkpoint", "split_patch_aggregation_head"]


def split_patch_aggregation_head(flat: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(rest, head)``: a flat (official / timm naming) state dict without and with only the
    patch-aggregation head's keys."""
    head = {k: v for k, v in flat.items() if k.startswith(PATCH_AGGREGATION_PREFIXES)}
    return {k: v for k, v in flat.items() if k not in head}, head


def load_beitv2_checkpoint(
    model: nn.Module,
    path_or_state_dict: str | os.PathLike | Mapping[str, Any],
    strict: bool = True,
    weights_only: bool = True,
    norm_to_fc_norm: bool = False,
) -> LoadResult:
    """Load a BEiT v2 (or v1) checkpoint into ``model``; every key is used or reported.

    Into a :class:`BeitV2ForMaskedImageModeling` the patch-aggregation head loads key for key
    (a checkpoint without it, e.g. a v1 file, leaves it ``missing``: an error with ``strict``).
    Into anything else its keys are ``dropped`` with the reason. Everything else, and the meaning
    of ``strict`` / ``norm_to_fc_norm`` (the model is left untouched when ``strict`` fails), is
    :func:`~beit_lightning.checkpoints.load_checkpoint`'s.
    """
    state, source = read_state_dict(path_or_state_dict, weights_only=weights_only)
    rest, head = split_patch_aggregation_head(to_flat_beit_state_dict(state))
    if not isinstance(model, BeitV2ForMaskedImageModeling):
        result = load_checkpoint(model, rest, strict=strict, weights_only=weights_only, norm_to_fc_norm=norm_to_fc_norm)
        result.dropped += [f"{key} (BEiT v2's patch-aggregation head: pre-training only)" for key in sorted(head)]
        result.source = source
        return result

    target = {k: v for k, v in model.state_dict().items() if k.startswith(PATCH_AGGREGATION_PREFIXES)}
    before = {k: v.clone() for k, v in model.state_dict().items()} if strict else None
    result = load_checkpoint(model, rest, strict=False, weights_only=weights_only, norm_to_fc_norm=norm_to_fc_norm)
    result.source = source
    result.missing = [k for k in result.missing if k not in target]  # the head is checked here
    fitting = {}
    for key, value in head.items():
        if key not in target:
            result.unexpected.append(key)
        elif tuple(value.shape) != tuple(target[key].shape):
            result.mismatched.append((key, tuple(value.shape), tuple(target[key].shape)))
        else:
            fitting[key] = value
    result.missing += [k for k in target if k not in head]
    if strict and (result.missing or result.unexpected or result.mismatched):
        model.load_state_dict(before)
        raise CheckpointMismatchError(
            f"the checkpoint does not fit {type(model).__name__}:\n{result.report()}\n"
            "Check early_layers / head_layers / shared_lm_head and the model size against the checkpoint "
            "(official base: early_layers=9, head_layers=2, shared_lm_head=True), or pass strict=False."
        )
    model.load_state_dict(fitting, strict=False)
    return result
