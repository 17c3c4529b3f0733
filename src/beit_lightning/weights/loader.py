"""Load BEiT weights from any of the formats users hold, into our models or a timm ``Beit``.

Accepted sources: anything :func:`~beit_lightning.weights.sources.resolve_weights` resolves (a path,
an ``http(s)`` URL, ``hf-hub:<repo>``, ``timm:<model>``, a registry name), or an already loaded object:

* our Lightning checkpoints (:mod:`.lightning`); the frozen tokenizer's weights are skipped;
* the official BEiT / BEiT v2 / DeiT release (``{"model": state_dict}``) and the official mmseg
  segmentation checkpoints (:mod:`.official`);
* plain timm state dicts and our own ``BeitForMaskedImageModeling`` state dicts;
* Hugging Face ``transformers`` BEiT checkpoints (:mod:`.hf_format`).

All of them are first brought to one flat naming (timm's, which is also the official one) and then
mapped onto the target model. A shared relative position bias is copied into every block when the
target has per-block tables. Every problem (missing keys, unexpected keys, shape mismatches) is
collected and reported at once.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from timm.models.beit import Beit, checkpoint_filter_fn
from torch import nn

from ..models.backbones import fit_state_dict
from ..models.beit import BeitForMaskedImageModeling
from ..models.splitmask import SplitMaskModel
from .hf_format import (
    check_segmentation_out_indices,
    from_hf_state_dict,
    is_hf_checkpoint,
    is_hf_state_dict,
    read_hf_checkpoint,
)
from .lightning import is_lightning_checkpoint, network_state
from .official import (
    MIM_ONLY_PREFIXES,
    NEW_HEAD_PREFIXES,
    SEGMENTATION_PREFIXES,
    V2_CLS_PRETRAINING_PREFIXES,
    from_official_segmentation,
    is_official_segmentation,
    to_flat_beit_state_dict,
    unwrap_official,
)
from .safety import load_weights_file
from .sources import resolve_weights

__all__ = ["PRETRAINING_MODELS", "CheckpointMismatchError", "LoadResult", "load_checkpoint", "read_state_dict"]

#: pre-training models: a backbone under ``backbone.`` and a pre-training head under ``lm_head.``
#: (BEiT's linear LM head, or SplitMask's decoder)
PRETRAINING_MODELS = (BeitForMaskedImageModeling, SplitMaskModel)


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the model; the message lists every offending key."""


@dataclass
class LoadResult:
    """What :func:`load_checkpoint` did: keys it could not fill, keys it did not use, keys dropped
    on purpose (e.g. the LM head when loading a pre-trained checkpoint into a classifier)."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    initialised: list[str] = field(default_factory=list)
    source: str = ""

    def report(self) -> str:
        lines = [f"checkpoint format: {self.source}"]
        if self.missing:
            lines.append(f"missing in checkpoint ({len(self.missing)}): {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(f"not used by the model ({len(self.unexpected)}): {', '.join(self.unexpected)}")
        if self.mismatched:
            lines.append(
                "shape mismatch (checkpoint vs model): "
                + ", ".join(f"{k} {tuple(a)} vs {tuple(b)}" for k, a, b in self.mismatched)
            )
        if self.dropped:
            lines.append(f"dropped on purpose ({len(self.dropped)}): {', '.join(self.dropped)}")
        if self.initialised:
            lines.append(f"not in the checkpoint, initialised fresh ({len(self.initialised)}): {', '.join(self.initialised)}")
        return "\n".join(lines)


def read_state_dict(
    path_or_state_dict: str | os.PathLike | Mapping[str, Any], weights_only: bool = True
) -> tuple[dict[str, torch.Tensor], str]:
    """Return ``(state_dict, format)`` from weights named by a path, URL, ``hf-hub:`` / ``timm:`` name or
    registry name (:func:`~beit_lightning.weights.sources.resolve_weights`), or from a loaded checkpoint object.

    ``format`` is one of ``"lightning"``, ``"official"``, ``"official_segmentation"``, ``"state_dict"`` or
    ``"transformers"``. Lightning checkpoints have their task prefix (``model.``) removed and the
    tokenizer and the EMA copy (``model_ema.``, with ``task.ema_decay``) dropped (:mod:`.lightning`);
    mmseg's neck ``backbone.fpnN`` becomes ``neck.fpnN`` (:mod:`.official`); transformers BEiT
    checkpoints (a ``save_pretrained`` folder, a ``.safetensors`` / ``.bin`` file or a state dict with
    ``beit.*`` names) are renamed to ours (:mod:`.hf_format`). A pickle that holds anything but weights is
    refused (:class:`~beit_lightning.weights.safety.UnsafeWeightsError`) unless ``weights_only=False``.
    """
    obj = path_or_state_dict
    path = None
    if isinstance(obj, (str, os.PathLike)):
        path = resolve_weights(obj)
        if is_hf_checkpoint(path):
            return read_hf_checkpoint(path)[0], "transformers"
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint not found: {path!r} (a file, a transformers folder, an http(s) URL, "
                                    "hf-hub:<repo>, timm:<model> or a name of `beit-lightning-weights list`)")
        if path.endswith(".safetensors"):
            obj = load_weights_file(path)
            if is_hf_state_dict(obj):
                return read_hf_checkpoint(path)[0], "transformers"
            return obj, "state_dict"
        obj = load_weights_file(path) if weights_only else torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(obj, Mapping):
        raise ValueError(f"a checkpoint must be a dict-like state dict; got {type(obj).__name__}")
    if is_lightning_checkpoint(obj):
        state = network_state(obj)
        if is_official_segmentation(state):
            return from_official_segmentation(state), "official_segmentation"
        return state, "lightning"
    official = unwrap_official(obj)
    if official is not None:
        return official, "official"
    if is_hf_state_dict(obj):
        if path is not None:
            return read_hf_checkpoint(path)[0], "transformers"  # with the config.json beside it
        return from_hf_state_dict(obj), "transformers"
    return dict(obj), "state_dict"


def _expand_shared_rel_pos_bias(flat: dict[str, torch.Tensor], target_keys: set[str], dropped: list[str]) -> None:
    """Copy a shared relative position table into every block when the target has per-block tables."""
    shared = "rel_pos_bias.relative_position_bias_table"
    if shared in flat and shared not in target_keys:
        blocks = sorted(
            {k.split(".")[1] for k in target_keys if k.startswith("blocks.") and k.endswith("attn.relative_position_bias_table")},
            key=int,
        )
        if blocks:
            table = flat.pop(shared)
            dropped.append(f"{shared} (copied into {len(blocks)} blocks)")
            for i in blocks:
                flat.setdefault(f"blocks.{i}.attn.relative_position_bias_table", table.clone())


def _adapt_to_beit(flat: dict[str, torch.Tensor], target: Beit, result: LoadResult, norm_to_fc_norm: bool) -> dict[str, torch.Tensor]:
    """Make a flat BEiT state dict fit a timm ``Beit``: shared -> per-block position tables,
    resizing (timm's filter), final norm vs ``fc_norm``, a head of another class count."""
    target_state = target.state_dict()
    _expand_shared_rel_pos_bias(flat, set(target_state), result.dropped)
    # timm's filter resizes tables the target has; keys it does not have are left for the report
    fits = {k: v for k, v in flat.items() if k in target_state}
    flat = {**{k: v for k, v in flat.items() if k not in target_state}, **checkpoint_filter_fn(fits, target)}
    if "fc_norm.weight" in target_state and "norm.weight" not in target_state and "norm.weight" in flat:
        for suffix in ("weight", "bias"):
            value = flat.pop(f"norm.{suffix}")
            if norm_to_fc_norm and "fc_norm.weight" not in flat:
                flat[f"fc_norm.{suffix}"] = value
            else:
                result.dropped.append(f"norm.{suffix} (the target pools first, then applies fc_norm)")
    for key in ("head.weight", "head.bias"):
        if key in flat and (key not in target_state or flat[key].shape != target_state[key].shape):
            result.dropped.append(f"{key} {tuple(flat.pop(key).shape)} (the target has another head)")
    return flat


def _is_segmentation_model(model: nn.Module) -> bool:
    """A network with a timm ``Beit`` as ``backbone`` and segmentation heads around it."""
    return isinstance(getattr(model, "backbone", None), Beit) and hasattr(model, "decode_head")


def load_checkpoint(
    model: nn.Module,
    path_or_state_dict: str | os.PathLike | Mapping[str, Any],
    strict: bool = True,
    weights_only: bool = True,
    norm_to_fc_norm: bool = False,
) -> LoadResult:
    """Load BEiT weights into ``model`` (a :class:`BeitForMaskedImageModeling`, a timm ``Beit``, or
    a segmentation model such as :class:`~beit_lightning.models.BeitUperNet`). The weights are a
    path, an ``http(s)`` URL, an ``hf-hub:`` / ``timm:`` name, a registry name or a loaded object.

    Into a segmentation model, a pre-trained or fine-tuned BEiT fills the backbone (relative
    position tables resized to its window on BEiT's geometric grid, a shared table copied into
    every block; the LM head, mask token, final norm and classifier head dropped), and the neck
    and heads start fresh (``result.initialised``); a segmentation checkpoint fills everything.

    With ``strict=True`` any missing key, unused key or shape mismatch raises
    :class:`CheckpointMismatchError` listing all of them, and the model is left untouched.
    Keys that cannot apply to the target kind (the LM head and mask token when loading into a
    plain backbone) are dropped and reported, not errors; a classifier's ``head`` and ``fc_norm``
    missing from a pre-training checkpoint start fresh (``result.initialised``). With
    ``norm_to_fc_norm`` a pre-trained final norm initialises a mean-pooling model's ``fc_norm``
    (used by :func:`export_timm`); by default it is dropped, as the official fine-tuning does.

    BEiT v2's patch-aggregation head (``cls_pt_layers.*``, ``cls_pt_norm.*``, ``cls_pt_lm_head.*``
    of the official pre-training files) loads key for key into a model that has it
    (:class:`~beit_lightning.models.beitv2.BeitV2ForMaskedImageModeling`; a file without it leaves
    it ``missing``) and is ``dropped``, with the reason, for any other target.
    """
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        path_or_state_dict = resolve_weights(path_or_state_dict)
    state, source = read_state_dict(path_or_state_dict, weights_only=weights_only)
    if source == "transformers" and isinstance(path_or_state_dict, (str, os.PathLike)):
        problem = check_segmentation_out_indices(model, path_or_state_dict)
        if problem and strict:
            raise CheckpointMismatchError(problem)
        if problem:
            warnings.warn(problem, stacklevel=2)
    # a segmentation checkpoint's neck and heads keep their names; the rest is a BEiT backbone
    heads = {k: state.pop(k) for k in list(state) if k.startswith(SEGMENTATION_PREFIXES)}
    flat = to_flat_beit_state_dict(state)
    result = LoadResult(source=source)
    has_v2_head = any(k.startswith(V2_CLS_PRETRAINING_PREFIXES) for k in model.state_dict())
    for key in [k for k in flat if k.startswith(V2_CLS_PRETRAINING_PREFIXES) and not has_v2_head]:
        flat.pop(key)
        result.dropped.append(f"{key} (BEiT v2's patch-aggregation head: the target model has none)")
    segmentation = _is_segmentation_model(model)
    fresh_prefixes: tuple[str, ...] = ()  # target keys that may start fresh besides the BEiT ones
    if heads and not segmentation:
        result.dropped += sorted(heads)

    if segmentation:
        backbone = model.backbone
        for key in [k for k in flat if k.startswith(MIM_ONLY_PREFIXES + NEW_HEAD_PREFIXES)]:
            flat.pop(key)
            result.dropped.append(key)
        flat = _adapt_to_beit(flat, backbone, result, False)
        backbone_keys = set(backbone.state_dict())
        for key in [k for k in flat if k not in backbone_keys and k.startswith(("norm.", "head."))]:
            flat.pop(key)  # the final norm: the segmentation backbone takes block outputs before it
            result.dropped.append(f"{key} (unused: features are taken from inside the backbone)")
        flat = {**{f"backbone.{k}": v for k, v in flat.items()}, **heads}
    elif isinstance(model, PRETRAINING_MODELS) and isinstance(model.backbone, Beit):
        head = {k: flat.pop(k) for k in list(flat) if k.startswith(MIM_ONLY_PREFIXES + V2_CLS_PRETRAINING_PREFIXES)}
        flat = {**{f"backbone.{k}": v for k, v in _adapt_to_beit(flat, model.backbone, result, False).items()}, **head}
    elif isinstance(model, Beit):
        for key in [k for k in flat if k.startswith(MIM_ONLY_PREFIXES)]:
            flat.pop(key)
            result.dropped.append(key)
        flat = _adapt_to_beit(flat, model, result, norm_to_fc_norm)
    elif isinstance(model, PRETRAINING_MODELS) or hasattr(model, "pretrained_cfg"):
        # a timm ViT / DeiT / XCiT (or another timm model, e.g. a distillation teacher), or our
        # masked-image-modeling model over one: timm's filter of the family (models/backbones.py)
        flat, dropped, fresh_prefixes = fit_state_dict(flat, model)
        result.dropped += dropped
    else:
        raise TypeError(
            "load_checkpoint expects a BeitForMaskedImageModeling, a SplitMaskModel, a timm model or a segmentation model with a Beit "
            f"backbone (BeitUperNet); got {type(model).__name__}"
        )
    target_state = model.state_dict()
    if isinstance(model, PRETRAINING_MODELS):
        # a head of another pre-training method (BEiT's LM head into SplitMask's decoder, or the
        # reverse) does not carry over: the encoder does, the head starts fresh
        foreign = [k for k in flat if k.startswith(MIM_ONLY_PREFIXES) and k not in target_state]
        if foreign and not any(k.startswith(MIM_ONLY_PREFIXES) and k in target_state for k in flat):
            for key in foreign:
                flat.pop(key)
                result.dropped.append(f"{key} (the head of another pre-training method)")
            fresh_prefixes = (*fresh_prefixes, *MIM_ONLY_PREFIXES)

    to_load = {}
    for key, value in flat.items():
        if key not in target_state:
            result.unexpected.append(key)
        elif tuple(value.shape) != tuple(target_state[key].shape):
            result.mismatched.append((key, tuple(value.shape), tuple(target_state[key].shape)))
        else:
            to_load[key] = value
    for key in target_state:
        if key not in flat:
            fresh = (isinstance(model, Beit) and key.startswith(NEW_HEAD_PREFIXES)) or (
                segmentation and key.startswith(SEGMENTATION_PREFIXES)) or key.startswith(fresh_prefixes)
            (result.initialised if fresh else result.missing).append(key)

    if strict and (result.missing or result.unexpected or result.mismatched):
        v2_head = has_v2_head and any(k.startswith(V2_CLS_PRETRAINING_PREFIXES) for k in
                                      result.missing + result.unexpected + [k for k, _, _ in result.mismatched])
        raise CheckpointMismatchError(
            f"the checkpoint does not fit {type(model).__name__}:\n{result.report()}\n"
            "Check that the model configuration (size, patch size, image size, vocab size, position "
            "embedding kind) matches the checkpoint, or pass strict=False to load the matching part."
            + (" BEiT v2's patch-aggregation head: check early_layers / head_layers / shared_lm_head against the "
               "checkpoint (official base: early_layers=9, head_layers=2, shared_lm_head=True); a v1 file has no "
               "head (strict=False starts it fresh)." if v2_head else "")
        )
    model.load_state_dict(to_load, strict=False)
    return result

