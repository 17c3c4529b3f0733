"""Our model built from a transformers BEiT folder's ``config.json``, with its weights."""

from __future__ import annotations

import os
import re
from functools import partial

from torch import nn

from ..models.beit import BeitForMaskedImageModeling
from ..models.segmentation import BeitUperNet
from .hf_format import hf_config_file, read_hf_checkpoint, segmentation_out_indices
from .hf_names import CONFIG_KEY
from .loader import load_checkpoint
from .sources import resolve_weights

__all__ = ["create_model_from_hf"]


def create_model_from_hf(path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Build our model from a transformers BEiT folder (its ``config.json``; a path or ``hf-hub:<repo>``)
    and load its weights:
    a :class:`BeitForMaskedImageModeling`, a timm ``Beit`` classifier or a :class:`BeitUperNet`."""
    import timm

    path = resolve_weights(path)
    if hf_config_file(path) is None:
        raise FileNotFoundError(f"no config.json at {path!r}: create_model_from_hf needs a save_pretrained folder")
    state, config = read_hf_checkpoint(path)
    # transformers' query and value always have a bias: all zero means a timm qkv without bias
    biases = [k for k in state if re.fullmatch(r"blocks\.\d+\.attn\.[qv]_bias", k)]
    qkv_bias = any(bool(state[k].any()) for k in biases)
    if not qkv_bias:
        for key in biases:
            del state[key]
    architecture = (config.get("architectures") or ["BeitModel"])[0]
    identity = config.get(CONFIG_KEY, {}).get("identity_layers", [])
    size = config.get("image_size", 224)
    hidden = int(config.get("hidden_size", 768))
    from timm.layers import LayerNorm

    kwargs = dict(
        embed_dim=hidden,
        depth=int(config.get("num_hidden_layers", 12)) - len(identity),
        num_heads=int(config.get("num_attention_heads", 12)),
        mlp_ratio=int(config.get("intermediate_size", 4 * hidden)) / hidden,
        patch_size=int(config.get("patch_size", 16)),
        img_size=tuple(size) if isinstance(size, (list, tuple)) else int(size),
        in_chans=int(config.get("num_channels", 3)),
        use_abs_pos_emb=bool(config.get("use_absolute_position_embeddings", False)),
        use_rel_pos_bias=bool(config.get("use_relative_position_bias", False)),
        use_shared_rel_pos_bias=bool(config.get("use_shared_relative_position_bias", False)),
        init_values=float(config.get("layer_scale_init_value", 0.1)) or None,
        drop_path_rate=float(config.get("drop_path_rate", 0.1)),
        norm_layer=partial(LayerNorm, eps=float(config.get("layer_norm_eps", 1e-12))),
        qkv_bias=qkv_bias,
    )
    num_labels = len(config.get("id2label") or {}) or 2
    name = "beit_base_patch16_224"  # the family; every size setting is given explicitly
    if architecture == "BeitForMaskedImageModeling":
        model: nn.Module = BeitForMaskedImageModeling(name, vocab_size=int(config.get("vocab_size", 8192)), **kwargs)
    elif architecture == "BeitForImageClassification":
        mean = bool(config.get("use_mean_pooling", True))
        model = timm.create_model(name, pretrained=False, num_classes=num_labels, global_pool="avg" if mean else "token", **kwargs)
    elif architecture == "BeitForSemanticSegmentation":
        if int(config.get("auxiliary_num_convs", 1)) != 1 or config.get("auxiliary_concat_input", False):
            raise ValueError("BeitUperNet's auxiliary head is one ConvModule without input concatenation")
        model = BeitUperNet(
            name, num_classes=num_labels, out_indices=segmentation_out_indices(config), channels=hidden,
            pool_scales=tuple(config.get("pool_scales", (1, 2, 3, 6))), aux_channels=int(config.get("auxiliary_channels", 256)),
            aux_head=bool(config.get("use_auxiliary_head", True)), **kwargs,
        )
    else:
        raise ValueError(f"{architecture} has no counterpart here (masked image modeling, image classification or semantic segmentation)")
    load_checkpoint(model, state, strict=strict)
    return model.eval()
