"""Our own Lightning checkpoints (``{"state_dict": {"model.backbone...": ...}, "global_step": ...}``):
the network's weights are the task's ``model.*``; the frozen tokenizer, the EMA copy and a
distillation teacher are not part of the network."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["NOT_THE_NETWORK", "is_lightning_checkpoint", "model_weights", "network_state"]

#: prefixes of a task's state that are not its network: the frozen tokenizer, the EMA copy (export --ema)
NOT_THE_NETWORK = ("tokenizer.", "model_ema.")


def is_lightning_checkpoint(obj: Mapping[str, Any]) -> bool:
    """A dict with a ``state_dict`` (Lightning's, or an mmseg checkpoint's: :mod:`.official` tells them apart)."""
    return isinstance(obj.get("state_dict"), Mapping)


def network_state(obj: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The ``state_dict`` without the task's ``model.`` prefix, the tokenizer and the EMA copy."""
    state = {}
    for key, value in obj["state_dict"].items():
        if key.startswith(NOT_THE_NETWORK):
            continue
        state[key[len("model."):] if key.startswith("model.") else key] = value
    return state


def model_weights(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    """A Lightning checkpoint's ``model.*`` only (not its EMA, tokenizer or teacher), without the prefix;
    any other object as it is."""
    if isinstance(obj.get("state_dict"), Mapping):
        return {k[len("model."):]: v for k, v in obj["state_dict"].items() if k.startswith("model.")}
    return obj
