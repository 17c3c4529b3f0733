"""Hugging Face ``transformers`` interop: our BEiT models to and from transformers' BEiT classes.

Three of our model kinds have a transformers class that computes the same function:

* :class:`~beit_lightning.models.BeitForMaskedImageModeling` (pre-trained encoder + LM head) ->
  ``BeitForMaskedImageModeling``. Ours applies the final LayerNorm to every token and the LM head to
  the masked patches; transformers' has the same LayerNorm as its own ``layernorm`` (with
  ``use_mean_pooling=True``, so the encoder adds none of its own) and runs the LM head on every patch:
  its ``logits[bool_masked_pos]`` are ours. The shared relative position bias stays shared.
* a timm ``Beit`` classifier -> ``BeitForImageClassification``: mean pooling of the patch tokens +
  ``fc_norm`` (BEiT's fine-tuning) is ``use_mean_pooling=True`` with ``beit.pooler.layernorm``;
  the CLS token after the final norm is ``use_mean_pooling=False`` with ``beit.layernorm``.
* :class:`~beit_lightning.models.BeitUperNet` (patch 16) -> ``BeitForSemanticSegmentation``.

Names: timm's fused ``attn.qkv`` is split into ``q_proj``/``k_proj``/``v_proj`` (the key has no bias,
as BEiT's), ``gamma_1/2`` are ``lambda_1/2``, ``norm1/2`` are ``layernorm_before/after``; the
segmentation neck and heads follow transformers 5 (``fpn.fpn1.conv_transpose1``,
``decode_head.psp_bottleneck``, ``...convolution``/``...normalization``, ``classifier``).
Reading also accepts the transformers 4.x names of the checkpoints on the Hub
(``beit.encoder.layer.N.attention.attention.query``, ``fpn1.0``, ``...conv``/``...bn``).

**Segmentation feature blocks.** transformers takes ``hidden_states[i - 1]`` for each of its
``out_indices`` ``i``, and ``hidden_states[0]`` is the embedding output, so its index ``i`` is our
0-based block ``i - 2``; its config only allows indices up to ``num_hidden_layers``, so it cannot
select the last block, which the official recipes use (base 3, 5, 7, 11 of 12). When our last out
index is ``depth - 1``, :func:`export_hf` appends one *identity layer* (all-zero attention and MLP
weights: its output equals its input exactly) so that ``num_hidden_layers = depth + 1`` and our
last block is transformers' index ``depth + 1``; the logits are the same, and ``config.json``
names the padded layer under ``"beit_lightning"`` so that our loader drops it again. With
``pad_last_block=False`` such a model is refused instead (:class:`HFExportError`).

The folder also holds ``preprocessor_config.json`` (``BeitImageProcessor`` with the evaluation
transform of the recipe the model was trained with) and a model card (``README.md``).
"""

from __future__ import annotations

import contextlib
import csv
import glob
import json
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from timm.models.beit import Beit
from torch import nn

from .models.beit import BeitForMaskedImageModeling
from .models.segmentation import BeitUperNet

__all__ = [
    "HF_CLASSES",
    "HFExportError",
    "create_model_from_hf",
    "export_hf",
    "export_hf_checkpoint",
    "from_hf_state_dict",
    "image_processor_config",
    "is_hf_checkpoint",
    "model_kind",
    "read_hf_checkpoint",
    "to_hf",
]

#: our model kind -> the transformers class that computes the same function
HF_CLASSES = {
    "mim": "BeitForMaskedImageModeling",
    "classification": "BeitForImageClassification",
    "segmentation": "BeitForSemanticSegmentation",
}

#: the entry of config.json where we note what transformers' config cannot say (padded layers)
CONFIG_KEY = "beit_lightning"

#: PIL resampling codes, as transformers' image processors store them
_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3}

_BEIT_MEAN = (0.5, 0.5, 0.5)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class HFExportError(ValueError):
    """The model has no exact transformers counterpart; the message says which part and what to do."""


# --- names ------------------------------------------------------------------------------------------

#: timm block parameter -> transformers layer parameter (``blocks.N.<k>`` -> ``beit.layers.N.<v>``)
_BLOCK_TO_HF = {
    "norm1.weight": "layernorm_before.weight",
    "norm1.bias": "layernorm_before.bias",
    "norm2.weight": "layernorm_after.weight",
    "norm2.bias": "layernorm_after.bias",
    "gamma_1": "lambda_1",
    "gamma_2": "lambda_2",
    "attn.q_bias": "attention.q_proj.bias",
    "attn.v_bias": "attention.v_proj.bias",
    "attn.proj.weight": "attention.o_proj.weight",
    "attn.proj.bias": "attention.o_proj.bias",
    "attn.relative_position_bias_table": "relative_position_bias.relative_position_bias_table",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
}
_BLOCK_FROM_HF = {v: k for k, v in _BLOCK_TO_HF.items()}

#: flat (timm / official) names outside the blocks -> transformers names
_TOP_TO_HF = {
    "cls_token": "beit.embeddings.cls_token",
    "mask_token": "beit.embeddings.mask_token",
    "pos_embed": "beit.embeddings.position_embeddings",
    "patch_embed.proj.weight": "beit.embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "beit.embeddings.patch_embeddings.projection.bias",
    "rel_pos_bias.relative_position_bias_table": "beit.shared_position_bias.relative_position_bias_table",
    "fc_norm.weight": "beit.pooler.layernorm.weight",
    "fc_norm.bias": "beit.pooler.layernorm.bias",
    "head.weight": "classifier.weight",
    "head.bias": "classifier.bias",
    "lm_head.weight": "lm_head.weight",
    "lm_head.bias": "lm_head.bias",
}
_TOP_FROM_HF = {v: k for k, v in _TOP_TO_HF.items()}

#: our segmentation neck/head names -> transformers 5 (applied in order)
_HEADS_TO_HF = [
    (r"^neck\.fpn1\.0\.", "fpn.fpn1.conv_transpose1."),
    (r"^neck\.fpn1\.1\.", "fpn.fpn1.normalization."),
    (r"^neck\.fpn1\.3\.", "fpn.fpn1.conv_transpose2."),
    (r"^neck\.fpn2\.0\.", "fpn.fpn2."),
    (r"^decode_head\.psp_modules\.(\d+)\.1\.conv\.", r"decode_head.psp_modules.blocks.\1.conv.convolution."),
    (r"^decode_head\.psp_modules\.(\d+)\.1\.bn\.", r"decode_head.psp_modules.blocks.\1.conv.normalization."),
    (r"^decode_head\.bottleneck\.", "decode_head.psp_bottleneck."),
    (r"\.conv_seg\.", ".classifier."),
    (r"\.conv\.weight$", ".convolution.weight"),
    (r"\.bn\.", ".normalization."),
]

#: transformers 5 and 4.x segmentation names -> ours (applied in order)
_HEADS_FROM_HF = [
    (r"^fpn\.fpn1\.conv_transpose1\.", "neck.fpn1.0."),
    (r"^fpn\.fpn1\.normalization\.", "neck.fpn1.1."),
    (r"^fpn\.fpn1\.conv_transpose2\.", "neck.fpn1.3."),
    (r"^fpn\.fpn2\.", "neck.fpn2.0."),
    (r"^fpn([12])\.(\d)\.", r"neck.fpn\1.\2."),  # transformers 4.x: the official names
    (r"^decode_head\.psp_modules\.blocks\.(\d+)\.conv\.convolution\.", r"decode_head.psp_modules.\1.1.conv."),
    (r"^decode_head\.psp_modules\.blocks\.(\d+)\.conv\.normalization\.", r"decode_head.psp_modules.\1.1.bn."),
    (r"^decode_head\.psp_bottleneck\.", "decode_head.bottleneck."),
    (r"\.classifier\.", ".conv_seg."),
    (r"\.convolution\.", ".conv."),
    (r"\.normalization\.", ".bn."),
]

#: transformers 4.x encoder names -> transformers 5 (as transformers' own conversion mapping)
_LEGACY_ENCODER = [
    (r"^beit\.encoder\.layer\.(\d+)\.", r"beit.layers.\1."),
    (r"^beit\.encoder\.relative_position_bias\.", "beit.shared_position_bias."),
    (r"\.attention\.attention\.relative_position_bias\.", ".relative_position_bias."),
    (r"\.attention\.attention\.query\.", ".attention.q_proj."),
    (r"\.attention\.attention\.key\.", ".attention.k_proj."),
    (r"\.attention\.attention\.value\.", ".attention.v_proj."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"^(beit\.layers\.\d+)\.output\.dense\.", r"\1.mlp.fc2."),
]

_SEG_PREFIXES = ("neck.", "decode_head.", "auxiliary_head.")


def _sub_all(key: str, rules: Sequence[tuple[str, str]]) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def model_kind(model: nn.Module) -> str:
    """``"mim"``, ``"classification"`` or ``"segmentation"``: which transformers class ``model`` maps to."""
    if isinstance(model, BeitForMaskedImageModeling):
        if not isinstance(model.backbone, Beit):
            raise HFExportError(f"transformers' BeitForMaskedImageModeling is BEiT's; this model's backbone is a timm "
                                f"{type(model.backbone).__name__}")
        return "mim"
    if isinstance(model, BeitUperNet):
        return "segmentation"
    if isinstance(model, Beit):
        return "classification"
    raise HFExportError(
        f"export_hf takes a BeitForMaskedImageModeling, a timm Beit classifier or a BeitUperNet; got {type(model).__name__} "
        "(a linear probe's heads are per block: export the pre-trained encoder instead)"
    )


def _backbone(model: nn.Module) -> Beit:
    return model if isinstance(model, Beit) else model.backbone


def _block_problems(backbone: Beit) -> list[str]:
    """Parts of timm's Beit that transformers' BEiT has no setting for."""
    problems = []
    block = backbone.blocks[0]
    dim = backbone.embed_dim
    if block.attn.qkv.weight.shape[0] != 3 * dim:
        problems.append("an attention head width other than embed_dim / num_heads (attn_head_dim)")
    mlp = block.mlp
    if not (hasattr(mlp, "fc1") and hasattr(mlp, "fc2")) or not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
        problems.append("a SwiGLU or normalised MLP (swiglu_mlp / scale_mlp)")
    elif not (isinstance(getattr(mlp, "act", None), nn.GELU) and mlp.act.approximate == "none"):
        problems.append(f"an MLP activation other than exact GELU ({type(getattr(mlp, 'act', None)).__name__})")
    if not isinstance(block.norm1, nn.LayerNorm):
        problems.append(f"a block norm other than LayerNorm ({type(block.norm1).__name__})")
    patch = tuple(backbone.patch_embed.patch_size)
    if patch[0] != patch[1]:
        problems.append(f"a non-square patch {patch}")
    return problems


def _backbone_config(backbone: Beit) -> dict[str, Any]:
    block = backbone.blocks[0]
    img = tuple(int(s) for s in backbone.patch_embed.img_size)
    drop_path = [float(getattr(b.drop_path1, "drop_prob", 0.0)) for b in backbone.blocks]
    return dict(
        hidden_size=backbone.embed_dim,
        num_hidden_layers=len(backbone.blocks),
        num_attention_heads=block.attn.num_heads,
        intermediate_size=block.mlp.fc1.out_features,
        hidden_act="gelu",
        layer_norm_eps=float(block.norm1.eps),
        image_size=img[0] if img[0] == img[1] else list(img),
        patch_size=int(backbone.patch_embed.patch_size[0]),
        num_channels=int(backbone.patch_embed.proj.in_channels),
        use_absolute_position_embeddings=backbone.pos_embed is not None,
        use_relative_position_bias=block.attn.relative_position_bias_table is not None,
        use_shared_relative_position_bias=backbone.rel_pos_bias is not None,
        layer_scale_init_value=0.1 if block.gamma_1 is not None else 0.0,
        drop_path_rate=round(max(drop_path, default=0.0), 6),
        hidden_dropout_prob=float(block.attn.proj_drop.p),
        attention_probs_dropout_prob=float(block.attn.attn_drop.p),
        initializer_range=0.02,
    )


def _segmentation_problems(model: BeitUperNet) -> list[str]:
    problems = []
    dim = model.backbone.embed_dim
    if int(model.backbone.patch_embed.patch_size[0]) != 16:
        problems.append(
            f"patch size {int(model.backbone.patch_embed.patch_size[0])}: transformers' neck is the patch-16 one "
            "(x4 deconvolutions, x2 deconvolution, identity, max-pool /2)"
        )
    channels = model.decode_head.conv_seg.in_channels
    if channels != dim:
        problems.append(f"a UperNet width of {channels}: transformers' UperNet is as wide as the encoder ({dim})")
    aux = model.auxiliary_head
    if aux is not None and (len(aux.convs) != 1 or aux.in_index != 2):
        problems.append("an auxiliary head other than one 3x3 ConvModule on the third map")
    return problems


def _segmentation_config(model: BeitUperNet, pad_last_block: bool) -> tuple[dict[str, Any], list[int]]:
    """Config entries of the heads, and the identity layers to append (see the module docstring)."""
    depth = len(model.backbone.blocks)
    ours = list(model.out_indices)
    identity: list[int] = []
    if ours[-1] > depth - 2:
        if not pad_last_block:
            raise HFExportError(
                f"out_indices {ours} take the output of the last block ({depth - 1}, 0-based), which transformers' "
                "BeitForSemanticSegmentation cannot select: it takes hidden_states[i - 1] for each out index i (our "
                f"block i - 2) and allows i <= num_hidden_layers ({depth}), i.e. blocks up to {depth - 2}. Export with "
                "pad_last_block=True (one appended identity layer makes the index reachable, same logits), or train a "
                f"model whose last out index is at most {depth - 2}"
            )
        identity = [depth]
    aux = model.auxiliary_head
    cfg = dict(
        out_indices=[b + 2 for b in ours],
        pool_scales=[int(m[0].output_size) for m in model.decode_head.psp_modules],
        use_auxiliary_head=aux is not None,
        auxiliary_channels=int(aux.convs[0].conv.out_channels) if aux is not None else 256,
        auxiliary_num_convs=1,
        auxiliary_concat_input=False,
        semantic_loss_ignore_index=255,
        use_mean_pooling=True,  # the encoder adds no final norm: features come from inside it
    )
    return cfg, identity


def _flat_state(model: nn.Module, kind: str) -> dict[str, torch.Tensor]:
    """The model's tensors under flat timm names (blocks.N..., mask_token, lm_head, neck...)."""
    out = {}
    for key, value in model.state_dict().items():
        if kind != "classification" and key.startswith("backbone."):
            key = key[len("backbone."):]
        if key.endswith(("relative_position_index", ".k_bias")):
            continue
        out[key] = value.detach()
    return out


def _flat_to_hf(flat: Mapping[str, torch.Tensor], norm_name: str | None) -> dict[str, torch.Tensor]:
    hf: dict[str, torch.Tensor] = {}
    unknown = []
    layers = set()
    for key, value in flat.items():
        match = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if match:
            layer, rest = match[1], match[2]
            layers.add(layer)
            if rest == "attn.qkv.weight":
                for name, part in zip(("q", "k", "v"), value.chunk(3), strict=True):
                    hf[f"beit.layers.{layer}.attention.{name}_proj.weight"] = part
            elif rest in _BLOCK_TO_HF:
                hf[f"beit.layers.{layer}.{_BLOCK_TO_HF[rest]}"] = value
            else:
                unknown.append(key)
        elif key in _TOP_TO_HF:
            hf[_TOP_TO_HF[key]] = value
        elif key.startswith("norm.") and norm_name is not None:
            hf[norm_name + key[len("norm."):]] = value
        elif key.startswith(_SEG_PREFIXES):
            hf[_sub_all(key, _HEADS_TO_HF)] = value
        else:
            unknown.append(key)
    if unknown:
        raise HFExportError(f"no transformers counterpart for {', '.join(sorted(unknown))}")
    for layer in layers:  # transformers' query and value always have a bias (zero if timm's qkv has none)
        weight = hf[f"beit.layers.{layer}.attention.q_proj.weight"]
        for name in ("q", "v"):
            hf.setdefault(f"beit.layers.{layer}.attention.{name}_proj.bias", weight.new_zeros(weight.shape[0]))
    return hf


def _identity_layer(hf: Mapping[str, torch.Tensor], template: int, index: int) -> dict[str, torch.Tensor]:
    """Layer ``index`` shaped as layer ``template`` with zero attention and MLP weights: ``x -> x`` exactly."""
    prefix = f"beit.layers.{template}."
    out = {}
    for key, value in hf.items():
        if key.startswith(prefix):
            rest = key[len(prefix):]
            fill = 1.0 if rest in ("layernorm_before.weight", "layernorm_after.weight") else 0.0
            out[f"beit.layers.{index}.{rest}"] = torch.full_like(value, fill)
    return out


def to_hf(model: nn.Module, pad_last_block: bool = True, id2label: Mapping[int, str] | None = None,
          ) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """``(transformers class name, BeitConfig arguments, state dict)`` of ``model``.

    Raises :class:`HFExportError` for a model transformers cannot express exactly (see the module
    docstring); nothing is ever approximated.
    """
    kind = model_kind(model)
    backbone = _backbone(model)
    problems = _block_problems(backbone)
    config = _backbone_config(backbone)
    norm_name: str | None = None
    identity: list[int] = []
    if kind == "mim":
        if not isinstance(backbone.norm, nn.LayerNorm):
            problems.append("a pre-training encoder without its final LayerNorm (use_fc_norm=True)")
        norm_name = "layernorm."
        config.update(use_mask_token=True, use_mean_pooling=True, vocab_size=model.lm_head.out_features)
    elif kind == "classification":
        pool = backbone.global_pool
        if backbone.num_classes == 0:
            problems.append("a classifier without a head (num_classes=0): export the pre-trained encoder, or give it classes")
        if pool == "avg" and isinstance(backbone.fc_norm, nn.LayerNorm) and isinstance(backbone.norm, nn.Identity):
            config.update(use_mean_pooling=True)
        elif pool == "token" and isinstance(backbone.norm, nn.LayerNorm) and isinstance(backbone.fc_norm, nn.Identity):
            config.update(use_mean_pooling=False)
            norm_name = "beit.layernorm."
        else:
            problems.append(
                f"pooling {pool!r} with norm={type(backbone.norm).__name__}, fc_norm={type(backbone.fc_norm).__name__}: "
                "transformers has mean pooling + fc_norm (use_mean_pooling) or the CLS token after the final norm"
            )
        config.update(num_labels=backbone.num_classes)
    else:
        problems += _segmentation_problems(model)
        if not problems:
            seg, identity = _segmentation_config(model, pad_last_block)
            config.update(seg, num_labels=model.decode_head.conv_seg.out_channels)
    if problems:
        raise HFExportError(
            f"{type(model).__name__} cannot be written as transformers' {HF_CLASSES[kind]} without changing what it "
            "computes: " + "; ".join(problems)
        )
    state = _flat_to_hf(_flat_state(model, kind), norm_name)
    for index in identity:
        state.update(_identity_layer(state, index - 1, index))
    if identity:
        config["num_hidden_layers"] += len(identity)
        config[CONFIG_KEY] = {
            "identity_layers": identity,
            "note": "appended layers with zero attention and MLP weights (output = input), so that out_indices can "
            "select our last block; beit_lightning's load_checkpoint drops them",
        }
    if "num_labels" in config:
        count = config.pop("num_labels")
        labels = dict(id2label) if id2label else {i: f"LABEL_{i}" for i in range(count)}
        if sorted(int(i) for i in labels) != list(range(count)):
            raise HFExportError(f"id2label must name the {count} classes 0..{count - 1}; got keys {sorted(labels)}")
        config["id2label"] = {int(i): str(name) for i, name in labels.items()}
        config["label2id"] = {str(name): int(i) for i, name in labels.items()}
    return HF_CLASSES[kind], config, {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}


# --- reading transformers checkpoints -------------------------------------------------------------

def is_hf_state_dict(state: Mapping[str, Any]) -> bool:
    """Whether ``state`` uses transformers' BEiT names (``beit.*``, or a bare ``BeitModel``'s)."""
    return any(isinstance(k, str) and (k.startswith("beit.") or k.startswith("embeddings.patch_embeddings.")) for k in state)


def _hf_config_file(path: str) -> str | None:
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    candidate = os.path.join(folder, "config.json")
    return candidate if os.path.isfile(candidate) else None


def is_hf_checkpoint(path: str | os.PathLike) -> bool:
    """A folder with a transformers BEiT ``config.json`` and weights (``save_pretrained``'s layout)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return False
    config = _hf_config_file(path)
    if config is None:
        return False
    try:
        with open(config) as f:
            return json.load(f).get("model_type") == "beit"
    except (OSError, ValueError):
        return False


def _load_weights(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _folder_weights(folder: str) -> dict[str, torch.Tensor]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(folder, index_name)
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for name in files:
                state.update(_load_weights(os.path.join(folder, name)))
            return state
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(folder, name)):
            return _load_weights(os.path.join(folder, name))
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
        key = _sub_all(key, _LEGACY_ENCODER)
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
            elif rest in _BLOCK_FROM_HF:
                flat[f"blocks.{layer}.{_BLOCK_FROM_HF[rest]}"] = value
            else:
                flat[key] = value  # reported by the loader as not used
        elif key in _TOP_FROM_HF:
            flat[_TOP_FROM_HF[key]] = value
        elif key.startswith(("layernorm.", "beit.layernorm.")):
            norms.append(key)
            flat["norm." + key.rsplit(".", 1)[1]] = value
        elif key.startswith(("fpn", "decode_head.", "auxiliary_head.")):
            flat[_sub_all(key, _HEADS_FROM_HF)] = value
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
        if _hf_config_file(path) is None:
            raise FileNotFoundError(f"{path!r} is a folder without config.json: not a transformers checkpoint")
        state = _folder_weights(path)
    elif os.path.isfile(path):
        state = _load_weights(path)
    else:
        raise FileNotFoundError(f"checkpoint not found: {path!r}")
    config_file = _hf_config_file(path)
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
    config_file = _hf_config_file(os.fspath(path))
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


def create_model_from_hf(path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Build our model from a transformers BEiT folder (its ``config.json``) and load its weights:
    a :class:`BeitForMaskedImageModeling`, a timm ``Beit`` classifier or a :class:`BeitUperNet`."""
    import timm

    from .checkpoints import load_checkpoint

    path = os.fspath(path)
    if _hf_config_file(path) is None:
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


# --- recipe, preprocessing, model card ------------------------------------------------------------

def _get(cfg: Mapping[str, Any] | None, dotted: str, default: Any = None) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node or node[part] is None:
            return default
        node = node[part]
    return node


def _img_size(model: nn.Module) -> int:
    return int(_backbone(model).patch_embed.img_size[0])


def image_processor_config(model: nn.Module, run_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``BeitImageProcessor`` arguments reproducing the evaluation transform of the run (its resolved
    config: ``data.*``), or of our defaults when there is none.

    * classification: timm's evaluation transform: resize the shorter side to
      ``floor(input_size / crop_pct)`` (bicubic), centre crop ``input_size``, mean/std;
    * masked image modeling: our validation view is a centre square crop resized to ``input_size``;
      the processor resizes the shorter side to ``input_size`` and centre-crops it (the same region);
    * segmentation: mmseg's evaluation resize: fit ``img_scale`` = (long, short) keeping the aspect
      ratio (bilinear), no crop, mean/std, ``do_reduce_labels`` as the recipe's ``reduce_zero_label``.
    """
    kind = model_kind(model)
    data = _get(run_config, "data", {}) or {}
    img = int(data.get("input_size") or data.get("crop_size") or _img_size(model))
    pretrained_cfg = getattr(_backbone(model), "pretrained_cfg", {}) or {}
    if kind == "segmentation":
        mean, std = data.get("mean", _IMAGENET_MEAN), data.get("std", _IMAGENET_STD)
        scale = data.get("img_scale") or (4 * img, img)
        processor = dict(
            do_resize=True, size={"shortest_edge": int(min(scale)), "longest_edge": int(max(scale))},
            resample=_RESAMPLE["bilinear"], do_center_crop=False,
            do_reduce_labels=bool(data.get("reduce_zero_label", True)),
        )
    else:
        default_mean, default_std = (pretrained_cfg.get("mean", _BEIT_MEAN), pretrained_cfg.get("std", _BEIT_MEAN))
        mean, std = data.get("mean", default_mean), data.get("std", default_std)
        if kind == "classification":
            crop_pct = float(data.get("crop_pct", pretrained_cfg.get("crop_pct", 0.9)))
            short = math.floor(img / crop_pct)
        else:
            short = img
        processor = dict(
            do_resize=True, size={"shortest_edge": short}, resample=_RESAMPLE["bicubic"],
            do_center_crop=True, crop_size={"height": img, "width": img}, do_reduce_labels=False,
        )
    processor.update(do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                     image_mean=[float(v) for v in mean], image_std=[float(v) for v in std])
    return processor


def _class_names(run_config: Mapping[str, Any] | None, count: int) -> list[str] | None:
    names = _get(run_config, "task.class_names") or _get(run_config, "data.classes")
    if not names:
        target = str(_get(run_config, "data._target_", ""))
        from . import data as data_module

        known = {
            "ADE20KDataModule": data_module.ADE20K_CLASSES,
            "GeneratedSegmentationDataModule": data_module.SEGMENTATION_CLASS_NAMES,
            "GeneratedDataModule": data_module.CLASS_NAMES,
        }
        names = known.get(target.rsplit(".", 1)[-1])
    names = list(names)[:count] if names else None
    return names if names and len(names) == count else None


def _metrics_from_csv(run_dir: str, global_step: int | None) -> tuple[dict[str, float], str | None]:
    files = sorted(glob.glob(os.path.join(run_dir, "**", "metrics.csv"), recursive=True))
    if not files:
        return {}, None
    latest: dict[str, float] = {}
    with open(files[0]) as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            if global_step is not None and step not in (None, "") and int(float(step)) >= global_step:
                continue  # logged after this checkpoint was written
            for key, value in row.items():
                if key in ("step", "epoch") or value in (None, ""):
                    continue
                with contextlib.suppress(ValueError):  # a text column
                    latest[key] = float(value)
    return latest, files[0]


def checkpoint_metrics(checkpoint: Mapping[str, Any], path: str | None = None) -> tuple[dict[str, float], str | None]:
    """``(metrics, where from)``: the metrics a Lightning checkpoint stored at save time
    (``checkpoint["beit_lightning"]["metrics"]``, written by ``CheckpointMetadata``), else the last
    value of each column of the run's ``metrics.csv`` logged before the checkpoint's step."""
    meta = checkpoint.get(CONFIG_KEY)
    for stored in ((meta or {}).get("metrics") if isinstance(meta, Mapping) else None,
                   checkpoint.get("metrics"), checkpoint.get("callback_metrics")):
        if isinstance(stored, Mapping) and stored:
            return {k: float(v) for k, v in stored.items()}, "the checkpoint (the metrics logged when it was saved)"
    if path is None:
        return {}, None
    run_dir = _run_dir(path)
    if run_dir is None:
        return {}, None
    step = checkpoint.get("global_step")
    return _metrics_from_csv(run_dir, int(step) if step is not None else None)


def _run_dir(checkpoint_path: str) -> str | None:
    """The run folder of a checkpoint (``<run>/checkpoints/x.ckpt`` or ``<run>/hpc_ckpt_1.ckpt``)."""
    folder = os.path.dirname(os.path.abspath(checkpoint_path))
    for candidate in (folder, os.path.dirname(folder)):
        if os.path.isfile(os.path.join(candidate, "config_resolved.yaml")):
            return candidate
    return None


def find_run_config(checkpoint_path: str | os.PathLike) -> str | None:
    """``config_resolved.yaml`` of the run that wrote ``checkpoint_path``, or ``None``."""
    run_dir = _run_dir(os.fspath(checkpoint_path))
    return os.path.join(run_dir, "config_resolved.yaml") if run_dir else None


def _yaml(obj: Any) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(obj)).rstrip()


_TASK_NAMES = {
    "mim": "BEiT masked image modeling (pre-training)",
    "classification": "image classification",
    "segmentation": "semantic segmentation (BEiT + UperNet)",
}


def _recipe_lines(run_config: Mapping[str, Any] | None, hparams: Mapping[str, Any] | None) -> list[str]:
    lines = []
    if run_config:
        trainer = _get(run_config, "trainer", {}) or {}
        data = _get(run_config, "data", {}) or {}
        task = {k: v for k, v in (_get(run_config, "task", {}) or {}).items() if k not in ("model", "tokenizer", "_convert_")}
        lines += [
            f"- task: `{task.pop('_target_', '?')}`",
            f"- model: `{_get(run_config, 'model.name', '?')}` at {_get(run_config, 'model.img_size', '?')}px, "
            f"drop path {_get(run_config, 'model.drop_path_rate', '?')}",
            f"- data: `{data.get('_target_', '?')}`, batch {data.get('batch_size', '?')} per device x "
            f"{trainer.get('devices', '?')} device(s) x {trainer.get('num_nodes', 1)} node(s), "
            f"accumulation {trainer.get('accumulate_grad_batches', 1)}",
            f"- trainer: max_epochs {trainer.get('max_epochs', '?')}, max_steps {trainer.get('max_steps', '?')}, "
            f"precision {trainer.get('precision', '?')}, gradient clip {trainer.get('gradient_clip_val', None)}",
            "- optimisation: " + ", ".join(f"{k} {v}" for k, v in task.items() if not isinstance(v, Mapping)),
        ]
        if _get(run_config, "init_checkpoint"):
            lines.append(f"- initialised from `{_get(run_config, 'init_checkpoint')}`")
        if _get(run_config, "tokenizer._target_") and str(_get(run_config, "task._target_", "")).endswith("MaskedImageModeling"):
            lines.append(f"- visual tokenizer: `{_get(run_config, 'tokenizer._target_')}` (vocabulary {_get(run_config, 'tokenizer.vocab_size', '?')})")
    elif hparams:
        lines.append("- task hyper-parameters (no run configuration was found beside the checkpoint): "
                     + ", ".join(f"{k} {v}" for k, v in hparams.items() if not isinstance(v, Mapping)))
    else:
        lines.append("- no recipe is known: the weights did not come from one of our run folders")
    return lines


def model_card(
    model: nn.Module,
    class_name: str,
    config: Mapping[str, Any],
    processor: Mapping[str, Any],
    run_config: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    metrics_source: str | None = None,
    source: str | None = None,
    hparams: Mapping[str, Any] | None = None,
    step: Mapping[str, Any] | None = None,
) -> str:
    """The README.md of an exported folder: what the model is, its recipe, its metrics, how to load it."""
    kind = model_kind(model)
    backbone = _backbone(model)
    depth, dim, heads = len(backbone.blocks), backbone.embed_dim, backbone.blocks[0].attn.num_heads
    patch, img = int(backbone.patch_embed.patch_size[0]), _img_size(model)
    timm_name = _get(run_config, "model.name") or (getattr(backbone, "pretrained_cfg", {}) or {}).get("architecture") or "beit_base_patch16_224"
    pipeline = {"classification": "image-classification", "segmentation": "image-segmentation"}.get(kind)
    classes = len(config["id2label"]) if kind == "classification" else 0  # timm keeps a head of the file's size only
    lines = ["---", "library_name: transformers", "tags:", "- beit", "- beit-lightning", "- vision"]
    if pipeline:
        lines.append(f"pipeline_tag: {pipeline}")
    lines += ["---", "", f"# BEiT {dim}-d, {depth} blocks: {_TASK_NAMES[kind]}", ""]
    what = (f"A BEiT encoder ({dim}-d, {depth} blocks, {heads} heads, {patch}px patches, {img}px input) trained with "
            f"beit-lightning and exported as transformers' `{class_name}`.")
    lines += [what, ""]
    if kind == "mim":
        lines += [f"It predicts the visual tokens (vocabulary {config['vocab_size']}) of masked patches; the relative "
                  "position bias is shared by all blocks, as in BEiT pre-training. Fine-tune it for your task, or use it "
                  "as a feature extractor.", ""]
    elif kind == "classification":
        pooling = "mean of the patch tokens + LayerNorm" if config.get("use_mean_pooling") else "the CLS token after the final LayerNorm"
        lines += [f"A classifier over {len(config['id2label'])} classes; pooling: {pooling}.", ""]
    else:
        ours = list(model.out_indices)
        lines += [f"UperNet + FCN auxiliary head over {len(config['id2label'])} classes, on the outputs of blocks {ours} "
                  f"(0-based; transformers' `out_indices` {config['out_indices']} select `hidden_states[i - 1]`).", ""]
        if CONFIG_KEY in config:
            lines += [f"transformers cannot select the last block ({depth - 1}), so the export appends one identity layer "
                      f"(index {config[CONFIG_KEY]['identity_layers']}: zero attention and MLP weights, output = input): "
                      f"`num_hidden_layers` is {config['num_hidden_layers']}, the logits are unchanged, and beit-lightning "
                      "drops the layer when it loads this folder.", ""]
    if source:
        where = f"Exported from `{os.path.basename(source)}`"
        if step:
            where += f" (epoch {step.get('epoch')}, global step {step.get('global_step')})"
        lines += [where + ".", ""]
    lines += ["## Recipe", ""] + _recipe_lines(run_config, hparams) + [""]
    if run_config:
        lines += ["<details><summary>resolved configuration</summary>", "", "```yaml", _yaml(run_config), "```", "",
                  "</details>", ""]
    lines += ["## Metrics at save time", ""]
    if metrics:
        lines += [f"From {metrics_source}.", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.6g} |" for k, v in sorted(metrics.items())]
    else:
        lines.append("No metrics were stored with the checkpoint or logged in its run folder.")
    lines += ["", "## Preprocessing", "", "`preprocessor_config.json` (`BeitImageProcessor`):", "", "```json",
              json.dumps(dict(processor), indent=1), "```", ""]
    if kind == "segmentation":
        lines += [
            "It reproduces our evaluation resize (fit (long, short) = "
            f"({processor['size']['longest_edge']}, {processor['size']['shortest_edge']}), keep the aspect ratio, "
            "bilinear, no antialiasing) and normalisation exactly with transformers' default torchvision backend "
            "when the image is enlarged or kept, with two differences: transformers truncates the longer side where "
            "mmseg rounds it (one pixel at most: 400x300 becomes 682x512, not 683x512), and it antialiases when it "
            "shrinks an image (mmseg does not). Our reported mIoU comes from sliding windows "
            f"({img}px, stride {_get(run_config, 'task.stride', '?')}) over that image, labels at their original size; "
            "transformers runs the model on the whole image with interpolated position tables, which is not the same "
            "computation. Resize the logits to the label size before the argmax.", ""]
    elif kind == "classification":
        lines += [
            "It reproduces our evaluation transform (timm's: shorter side resized bicubic by Pillow, centre crop, "
            "normalisation) exactly with `backend=\"pil\"`, but for one case: when the crop's margin is odd, "
            "torchvision's `CenterCrop` rounds its offset half to even (11.5 -> 12) where transformers truncates (11), "
            "a one-pixel shift. transformers' default torchvision backend resizes with another bicubic "
            "implementation: up to 2 grey levels apart.", ""]
    else:
        lines += [
            "Our validation view for masked image modeling is the centre square of the image resized to "
            f"{img}px (crop, then resize); the processor resizes the shorter side to {img}px and crops the centre "
            "(the same region, resampled in the other order: close, not identical). It makes no mask: pass "
            "`bool_masked_pos` (batch x patches) yourself.", ""]
    lines += ["## Loading", "", "transformers:", "", "```python",
              f"from transformers import AutoImageProcessor, {class_name}",
              f'model = {class_name}.from_pretrained("<this folder>")',
              'processor = AutoImageProcessor.from_pretrained("<this folder>"'
              + (")  # the torchvision backend: mmseg's resize" if kind == "segmentation" else ', backend="pil")'),
              "```", "", "beit-lightning (our classes; `load_checkpoint` also reads this folder into a model you built):",
              "", "```python", "from beit_lightning.huggingface import create_model_from_hf",
              'model = create_model_from_hf("<this folder>")', "```", "", "timm (the encoder"
              + (" and classifier" if kind == "classification" else "") + "):", "", "```bash",
              f"beit-lightning-export <this folder> beit.safetensors --model {timm_name} --img-size {img}"
              + ("" if kind == "classification" else " --num-classes 0"), "```", "", "```python", "import timm",
              f'model = timm.create_model("{timm_name}", pretrained=True, img_size={img}, num_classes={classes},',
              f'                          pretrained_cfg_overlay=dict(file="beit.safetensors", num_classes={classes}))',
              "```", ""]
    if timm_name.startswith("beit_lightning_"):
        lines += [f"`{timm_name}` is registered with timm by `import beit_lightning.models`.", ""]
    return "\n".join(lines)


# --- export -----------------------------------------------------------------------------------------

def _require_transformers():
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - transformers is a dev dependency
        raise ImportError("export_hf needs Hugging Face transformers >= 5: pip install 'transformers>=5'") from err
    if int(transformers.__version__.split(".")[0]) < 5:
        raise ImportError(f"export_hf writes transformers 5 names; found transformers {transformers.__version__}: "
                          "pip install 'transformers>=5'")
    return transformers


def _verify(model: nn.Module, hf_model: nn.Module, kind: str, config: Mapping[str, Any]) -> float:
    """Run both models on one random input; return the largest logit difference (raise if not equal)."""
    size = config["image_size"]
    height, width = (size, size) if isinstance(size, int) else size
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, config.get("num_channels", 3), height, width, generator=gen)
    was_training = model.training
    model.eval()
    hf_model.eval()
    with torch.no_grad():
        if kind == "mim":
            grid = (height // config["patch_size"]) * (width // config["patch_size"])
            mask = torch.rand(1, grid, generator=gen) < 0.4
            ours = model(x, mask)
            theirs = hf_model(pixel_values=x, bool_masked_pos=mask).logits[mask]
        else:
            ours = model(x)
            theirs = hf_model(pixel_values=x).logits
    model.train(was_training)
    diff = float((ours.float() - theirs.float()).abs().max())
    scale = max(1.0, float(ours.abs().max()))
    if not diff <= 1e-4 * scale:
        raise HFExportError(f"the transformers model computes other logits than ours (max difference {diff:.3g}); "
                            "this is a bug of the export: please report it with the model configuration")
    return diff


def export_hf(
    model: nn.Module,
    folder: str | os.PathLike,
    *,
    run_config: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    metrics_source: str | None = None,
    id2label: Mapping[int, str] | Sequence[str] | None = None,
    pad_last_block: bool = True,
    verify: bool = True,
    source: str | None = None,
    hparams: Mapping[str, Any] | None = None,
    step: Mapping[str, Any] | None = None,
) -> str:
    """Write ``model`` as a transformers ``save_pretrained`` folder: ``config.json`` +
    ``model.safetensors`` (``BeitForMaskedImageModeling``, ``BeitForImageClassification`` or
    ``BeitForSemanticSegmentation``, which ``from_pretrained`` loads with no missing or unexpected
    keys), ``preprocessor_config.json`` (:func:`image_processor_config`) and ``README.md`` (model card).

    Args:
        model: a :class:`BeitForMaskedImageModeling`, a timm ``Beit`` classifier or a :class:`BeitUperNet`.
        folder: the output folder (created; existing files of the same names are replaced).
        run_config: the run's resolved configuration (``config_resolved.yaml``), for the recipe, the
            image processor and the class names.
        metrics: metrics to report in the card (e.g. :func:`checkpoint_metrics`).
        id2label: class names (default: the run's data set's, else ``LABEL_i``).
        pad_last_block: a segmentation model whose last out index is the last block gets one
            identity layer appended (see the module docstring); ``False`` raises instead.
        verify: run ours and transformers' on a random input and raise if the logits differ.

    Returns the folder. Raises :class:`HFExportError` when transformers cannot compute what ``model`` does.
    """
    transformers = _require_transformers()
    kind = model_kind(model)
    if isinstance(id2label, Sequence) and not isinstance(id2label, str):
        id2label = dict(enumerate(id2label))
    if id2label is None and kind != "mim":
        count = (_backbone(model).num_classes if kind == "classification" else model.decode_head.conv_seg.out_channels)
        names = _class_names(run_config, count)
        id2label = dict(enumerate(names)) if names else None
    class_name, config, state = to_hf(model, pad_last_block=pad_last_block, id2label=id2label)
    hf_config = transformers.BeitConfig(**config)
    hf_config.architectures = [class_name]
    with torch.device("meta"):
        hf_model = getattr(transformers, class_name)(hf_config)
    hf_model.load_state_dict(state, strict=True, assign=True)
    if verify:
        _verify(model, hf_model, kind, config)
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    hf_model.save_pretrained(folder)
    processor = image_processor_config(model, run_config)
    transformers.BeitImageProcessor(**processor).save_pretrained(folder)
    card = model_card(model, class_name, hf_config.to_dict(), processor, run_config, metrics, metrics_source,
                      source, hparams, step)
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(card)
    return folder


def _model_from_run_config(run_config: Mapping[str, Any]) -> nn.Module:
    from hydra.utils import instantiate

    node = _get(run_config, "task.model")
    if not isinstance(node, Mapping) or "_target_" not in node:
        raise ValueError("the run configuration has no task.model to build the network from")
    if str(_get(run_config, "task._target_", "")).endswith("LinearProbe"):
        raise HFExportError("a linear probe trains one head per block on a frozen encoder: export the pre-trained "
                            "encoder's checkpoint instead")
    from . import models  # noqa: F401 - registers our model sizes with timm

    return instantiate(dict(node))


def export_hf_checkpoint(
    checkpoint: str | os.PathLike,
    folder: str | os.PathLike,
    config: str | os.PathLike | None = None,
    pad_last_block: bool = True,
    verify: bool = True,
    ema: bool = False,
) -> str:
    """:func:`export_hf` for a checkpoint file of ours (Lightning ``.ckpt``): the network is rebuilt
    from the run's resolved configuration (stored in the checkpoint by ``CheckpointMetadata``, else
    ``config_resolved.yaml`` in the run folder, or ``config``), loaded with
    :func:`~beit_lightning.checkpoints.load_checkpoint`, and exported with the run's recipe and the
    metrics of the checkpoint (or of the run's ``metrics.csv`` up to its step). A checkpoint of a run
    with an EMA of the weights (``task.ema_decay``) exports the trained weights, or with ``ema`` the EMA."""
    from omegaconf import OmegaConf

    from .checkpoints import load_checkpoint

    path = os.fspath(checkpoint)
    ckpt: Mapping[str, Any] = {}
    if os.path.isfile(path) and not path.endswith(".safetensors"):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    meta = ckpt.get(CONFIG_KEY) if isinstance(ckpt.get(CONFIG_KEY), Mapping) else {}
    config_path = os.fspath(config) if config else find_run_config(path)
    if config:
        run_config = OmegaConf.to_container(OmegaConf.load(config_path), resolve=True)
    elif meta.get("config"):  # the run's resolved configuration, stored in the checkpoint itself
        run_config = OmegaConf.to_container(OmegaConf.create(meta["config"]), resolve=True)
    elif config_path is not None:
        run_config = OmegaConf.to_container(OmegaConf.load(config_path), resolve=True)
    else:
        raise FileNotFoundError(
            f"{path!r} holds no run configuration and there is no config_resolved.yaml beside it (in its folder or the "
            "one above): the network's architecture comes from the run's configuration; pass --config "
            "<run>/config_resolved.yaml"
        )
    model = _model_from_run_config(run_config)
    if isinstance(ckpt.get("state_dict"), Mapping):
        weights = dict(ckpt["state_dict"])
        averaged = {k[len("model_ema.module."):]: weights.pop(k) for k in list(weights) if k.startswith("model_ema.module.")}
        if ema and not averaged:
            raise ValueError(f"{path!r} holds no EMA weights (model_ema.*): the run had no task.ema_decay")
        if ema:
            weights = {**{k: v for k, v in weights.items() if not k.startswith("model.")},
                       **{f"model.{k}": v for k, v in averaged.items()}}
        ckpt = {**ckpt, "state_dict": weights}
    elif ema:
        raise ValueError(f"{path!r} is not a Lightning checkpoint: ema applies to a run with task.ema_decay")
    load_checkpoint(model, ckpt if ckpt else path)
    metrics, metrics_source = checkpoint_metrics(ckpt, path)
    if metrics_source and os.path.isfile(metrics_source):
        metrics_source = (f"`{os.path.relpath(metrics_source, _run_dir(path))}` (the last value of each column "
                          "logged before the checkpoint's step)")
    step = {"epoch": ckpt.get("epoch"), "global_step": ckpt.get("global_step")} if "global_step" in ckpt else None
    return export_hf(model.eval(), folder, run_config=run_config, metrics=metrics, metrics_source=metrics_source,
                     pad_last_block=pad_last_block, verify=verify, source=path, hparams=ckpt.get("hyper_parameters"),
                     step=step)
