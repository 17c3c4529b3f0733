"""Reading transformers BEiT checkpoints (5.x and 4.x names) into our flat names: a
``save_pretrained`` folder, a ``.safetensors`` / ``.bin`` weight file, or a state dict."""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..models.segmentation import BeitUperNet
from .hf_names import BLOCK_FROM_HF, CONFIG_KEY, HEADS_FROM_HF, LEGACY_ENCODER, TOP_FROM_HF, sub_all
from .safety import load_weights_file

__all__ = ["check_segmentation_out_indices", "from_hf_state_dict", "hf_config_file", "is_hf_checkpoint",
           "is_hf_state_dict", "read_hf_checkpoint", "segmentation_out_indices"]


def is_hf_state_dict(state: Mapping[str, Any]) -> bool:
    """Whether ``state`` uses transformers' BEiT names (``beit.*``, or a bare ``BeitModel``'s)."""
    return any(isinstance(k, str) and (k.startswith("beit.") or k.startswith("embeddings.patch_embeddings.")) for k in state)


def hf_config_file(path: str) -> str | None:
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    candidate = os.path.join(folder, "config.json")
    return candidate if os.path.isfile(candidate) else None


def is_hf_checkpoint(path: str | os.PathLike) -> bool:
    """A folder with a transformers BEiT ``config.json`` and weights (``save_pretrained``'s layout)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return False
    config = hf_config_file(path)
    if config is None:
        return False
    try:
        with open(config) as f:
            return json.load(f).get("model_type") == "beit"
    except (OSError, ValueError):
        return False


def _folder_weights(folder: str) -> dict[str, torch.Tensor]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(folder, index_name)
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for name in files:
                state.update(load_weights_file(os.path.join(folder, name)))
            return state
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(folder, name)):
            return load_weights_file(os.path.join(folder, name))
    raise FileNotFoundError(f"{folder!r} has a config.json but no model.safetensors or pytorch_model.bin")


def _is_identity_layer(flat: Mapping[str, torch.Tensor], index: int) -> bool:
    keys = [f"blocks.{index}.attn.proj.weight", f"blocks.{index}.attn.proj.bias",
            f"blocks.{index}.mlp.fc2.weight", f"blocks.{index}.mlp.fc2.bias"]
    return all(k in flat and not flat[k].any() for k in keys)


def from_hf_state_dict(state: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """transformers BEiT names (5.x or 4.x) -> our flat names: the encoder as timm's (``blocks.N.*``,
    ``rel_pos_bias.*``, ``norm.*``, ``fc_norm.*``, ``head.*``), ``mask_token``, ``lm_head.*``, and a
    segmentation model's ``neck.*``, ``decode_head.*``, ``auxiliary_head.*``. Identity layers that
    :func:`export_hf` appended (named in ``config["beit_lightning"]``) are dropped."""
    bare = not any(k.startswith("beit.") for k in state)
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    flat: dict[str, torch.Tensor] = {}
    norms = []
    for key, value in state.items():
        if key.endswith("relative_position_index"):
            continue
        if bare and key.startswith(("embeddings.", "encoder.", "layers.", "shared_position_bias.", "pooler.", "layernorm.")):
            key = "beit." + key
        key = sub_all(key, LEGACY_ENCODER)
        match = re.fullmatch(r"beit\.layers\.(\d+)\.(.+)", key)
        if match:
            layer, rest = match[1], match[2]
            proj = re.fullmatch(r"attention\.([qkv])_proj\.(weight|bias)", rest)
            if proj and (proj[2] == "weight" or proj[1] == "k"):
                if proj[2] == "bias":  # BEiT's key has no bias; accept an all-zero one
                    if value.any():
                        raise ValueError(f"{key} is not zero: timm's BEiT attention has no key bias")
                    continue
                qkv.setdefault(layer, {})[proj[1]] = value
            elif rest in BLOCK_FROM_HF:
                flat[f"blocks.{layer}.{BLOCK_FROM_HF[rest]}"] = value
            else:
                flat[key] = value  # reported by the loader as not used
        elif key in TOP_FROM_HF:
            flat[TOP_FROM_HF[key]] = value
        elif key.startswith(("layernorm.", "beit.layernorm.")):
            norms.append(key)
            flat["norm." + key.rsplit(".", 1)[1]] = value
        elif key.startswith(("fpn", "decode_head.", "auxiliary_head.")):
            flat[sub_all(key, HEADS_FROM_HF)] = value
        else:
            flat[key] = value
    if len({k.split("layernorm.")[0] for k in norms}) > 1:
        raise ValueError(
            "the checkpoint has both an encoder LayerNorm (beit.layernorm, use_mean_pooling=False) and a masked-image-"
            "modeling LayerNorm (layernorm): two final norms in a row, which our models do not have"
        )
    for layer, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"layer {layer} lacks {sorted({'q', 'k', 'v'} - set(parts))} projection weights")
        flat[f"blocks.{layer}.attn.qkv.weight"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    for index in (config or {}).get(CONFIG_KEY, {}).get("identity_layers", []):
        if _is_identity_layer(flat, index):
            for key in [k for k in flat if k.startswith(f"blocks.{index}.")]:
                del flat[key]
        else:
            warnings.warn(f"layer {index} is named an identity layer in config.json but computes something: kept", stacklevel=2)
    return flat


def read_hf_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """``(state dict in our names, config.json as a dict or None)`` of a ``save_pretrained`` folder
    or of a transformers weight file (``.safetensors`` / ``.bin``; a ``config.json`` beside it is read)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if hf_config_file(path) is None:
            raise FileNotFoundError(f"{path!r} is a folder without config.json: not a transformers checkpoint")
        state = _folder_weights(path)
    elif os.path.isfile(path):
        state = load_weights_file(path)
    else:
        raise FileNotFoundError(f"checkpoint not found: {path!r}")
    config_file = hf_config_file(path)
    config = None
    if config_file is not None:
        with open(config_file) as f:
            config = json.load(f)
    if not is_hf_state_dict(state):
        raise ValueError(f"{path!r} does not hold transformers BEiT weights (no beit.* keys)")
    return from_hf_state_dict(state, config), config


def segmentation_out_indices(config: Mapping[str, Any]) -> list[int]:
    """Our 0-based feature blocks of a transformers ``BeitForSemanticSegmentation`` config."""
    layers = int(config.get("num_hidden_layers", 12))
    ours = []
    for i in config.get("out_indices") or []:
        i = int(i)
        if i < 0:
            i += layers + 1
        if i == 0:  # hidden_states[-1]: the last layer
            ours.append(layers - 1)
        elif i == 1:
            raise ValueError("out index 1 takes the patch embeddings (hidden_states[0]), which BeitUperNet cannot take")
        else:
            ours.append(i - 2)
    return ours


def check_segmentation_out_indices(model: nn.Module, path: str | os.PathLike) -> str | None:
    """A message when ``model`` (a BeitUperNet) takes other blocks than the transformers checkpoint
    at ``path`` was configured with, else ``None``."""
    config_file = hf_config_file(os.fspath(path))
    if config_file is None or not isinstance(model, BeitUperNet):
        return None
    with open(config_file) as f:
        config = json.load(f)
    if "out_indices" not in config:
        return None
    expected = segmentation_out_indices(config)
    if list(model.out_indices) != expected:
        return (
            f"the transformers checkpoint takes features of blocks {expected} (its out_indices {config['out_indices']} "
            f"select hidden_states[i - 1], i.e. our 0-based block i - 2), but the model takes {list(model.out_indices)}: "
            f"build BeitUperNet(out_indices={expected}), or use create_model_from_hf"
        )
    return None
