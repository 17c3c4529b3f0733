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

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from timm.models.beit import Beit
from torch import nn

from ..models.segmentation import BeitUperNet
from .hf_names import (
    BLOCK_TO_HF,
    CONFIG_KEY,
    HEADS_TO_HF,
    HF_CLASSES,
    SEG_PREFIXES,
    TOP_TO_HF,
    HFExportError,
    backbone_of,
    model_kind,
    sub_all,
)
from .loader import load_checkpoint
from .model_card import class_names, config_value, image_processor_config, model_card
from .run_folder import checkpoint_metrics, find_run_config, run_folder_of
from .safety import load_weights_file
from .sources import resolve_weights

__all__ = ["export_hf", "export_hf_checkpoint", "to_hf"]


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
            elif rest in BLOCK_TO_HF:
                hf[f"beit.layers.{layer}.{BLOCK_TO_HF[rest]}"] = value
            else:
                unknown.append(key)
        elif key in TOP_TO_HF:
            hf[TOP_TO_HF[key]] = value
        elif key.startswith("norm.") and norm_name is not None:
            hf[norm_name + key[len("norm."):]] = value
        elif key.startswith(SEG_PREFIXES):
            hf[sub_all(key, HEADS_TO_HF)] = value
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
    backbone = backbone_of(model)
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
        count = (backbone_of(model).num_classes if kind == "classification" else model.decode_head.conv_seg.out_channels)
        names = class_names(run_config, count)
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

    node = config_value(run_config, "task.model")
    if not isinstance(node, Mapping) or "_target_" not in node:
        raise ValueError("the run configuration has no task.model to build the network from")
    if str(config_value(run_config, "task._target_", "")).endswith("LinearProbe"):
        raise HFExportError("a linear probe trains one head per block on a frozen encoder: export the pre-trained "
                            "encoder's checkpoint instead")
    from ..models.timm_sizes import TIMM_SIZES  # noqa: F401 - registers our model sizes with timm

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

    path = resolve_weights(checkpoint)
    ckpt: Mapping[str, Any] = {}
    if os.path.isfile(path) and not path.endswith(".safetensors"):
        ckpt = load_weights_file(path)
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
        metrics_source = (f"`{os.path.relpath(metrics_source, run_folder_of(path))}` (the last value of each column "
                          "logged before the checkpoint's step)")
    step = {"epoch": ckpt.get("epoch"), "global_step": ckpt.get("global_step")} if "global_step" in ckpt else None
    return export_hf(model.eval(), folder, run_config=run_config, metrics=metrics, metrics_source=metrics_source,
                     pad_last_block=pad_last_block, verify=verify, source=path, hparams=ckpt.get("hyper_parameters"),
                     step=step)
