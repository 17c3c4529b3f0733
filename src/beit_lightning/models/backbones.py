"""What each supported timm backbone family looks like from the outside: BEiT, ViT / DeiT, XCiT.

Three families are supported by every task (pre-training, fine-tuning, linear probing):

* ``beit``: ``timm.models.beit.Beit`` (``beit_*``, ``beitv2_*``, ``beit_lightning_*``);
* ``vit``: ``timm.models.vision_transformer.VisionTransformer`` with a plain patch embedding,
  including DeiT and its distilled variant ``VisionTransformerDistilled`` (a class and a
  distillation token, two heads);
* ``xcit``: ``timm.models.xcit.Xcit``: a convolutional patch embedding (with BatchNorm), ``L``
  cross-covariance blocks over the patch tokens only (their local patch interaction has BatchNorm
  too), then ``C`` class-attention blocks (CaiT's) that bring in the class token.

This module holds the few facts that differ between them, in one place:

* :func:`layer_ids`: the layer id of every parameter for layer-wise lr decay (BEiT's rule, as the
  official ``get_num_layer_for_vit``, extended to XCiT's class-attention blocks);
* :func:`probe_features` / :func:`probe_dims`: what the linear probe reads after each layer;
* :func:`fit_state_dict`: a flat state dict made to fit a ViT / XCiT target (position-embedding
  resize, the official XCiT names, heads that start fresh).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import timm
import torch
from torch import nn

__all__ = [
    "FAMILIES",
    "backbone_family",
    "family_of_name",
    "fit_state_dict",
    "layer_ids",
    "num_probe_layers",
    "probe_dims",
    "probe_features",
]

#: the supported families and the timm modules that define their models
FAMILIES: dict[str, tuple[str, ...]] = {
    "beit": ("beit", "timm_sizes"),  # timm_sizes: our beit_lightning_* registrations
    "vit": ("vision_transformer", "deit"),
    "xcit": ("xcit",),
}

#: parameters of the embedding stage (layer id 0): tokens, position embeddings, patch embedding
_STEM = ("cls_token", "dist_token", "reg_token", "mask_token", "pos_embed", "patch_embed", "norm_pre")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_CLS_ATTN_BLOCK = re.compile(r"^cls_attn_blocks\.(\d+)\.")


def family_of_name(model_name: str) -> str | None:
    """The family of a timm model name (``None``: not one of :data:`FAMILIES`)."""
    import beit_lightning.models.timm_sizes  # noqa: F401 - registers the beit_lightning_* names

    for family, modules in FAMILIES.items():
        if timm.models.is_model_in_modules(model_name, list(modules)):
            return family
    return None


def backbone_family(model: nn.Module) -> str | None:
    """``"beit"``, ``"vit"`` or ``"xcit"`` for a timm model of those families, else ``None``."""
    from timm.models.beit import Beit
    from timm.models.vision_transformer import VisionTransformer
    from timm.models.xcit import Xcit

    if isinstance(model, Beit):
        return "beit"
    if isinstance(model, VisionTransformer):
        return "vit"
    if isinstance(model, Xcit):
        return "xcit"
    return None


def _num_cls_attn_blocks(model: nn.Module) -> int:
    blocks = getattr(model, "cls_attn_blocks", None)
    return len(blocks) if blocks is not None else 0


def layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """``({parameter name: layer id}, top)`` for layer-wise lr decay of a supported backbone.

    The rule of BEiT's fine-tuning code (``get_num_layer_for_vit`` in ``beit/optim_factory.py``,
    and the segmentation ``LayerDecayOptimizerConstructor``), for ``L`` blocks:

    * 0: the embedding stage: ``cls_token``, ``dist_token`` (DeiT), ``reg_token``, ``mask_token``,
      ``pos_embed`` (XCiT: its Fourier encoding's projection), ``patch_embed`` (XCiT: the
      convolutional stem with its BatchNorms), ``norm_pre``;
    * ``i + 1``: block ``i``;
    * ``L + 1 + j``: XCiT's class-attention block ``j`` (they run after the ``L`` patch blocks);
    * ``top = L + C + 1`` (``C`` class-attention blocks, 0 outside XCiT): everything else, i.e. the
      final norm, ``fc_norm``, the heads (DeiT's ``head_dist`` too) and BEiT's shared relative
      position bias, as the official rule puts ``rel_pos_bias`` with the head.

    A parameter at layer ``l`` gets the lr scale ``layer_decay ** (top - l)``. timm's own
    ``group_matcher`` differs in two places: it merges the final ``norm`` into the last block and
    puts ``rel_pos_bias`` in the stem.
    """
    if backbone_family(model) is None:
        raise TypeError(f"layer ids are known for timm Beit, VisionTransformer (DeiT) and Xcit; got {type(model).__name__}")
    depth = len(model.blocks)
    top = depth + _num_cls_attn_blocks(model) + 1
    ids = {}
    for name, _ in model.named_parameters():
        block = _BLOCK.match(name)
        cls_block = _CLS_ATTN_BLOCK.match(name)
        if name.startswith(_STEM):
            ids[name] = 0
        elif block:
            ids[name] = int(block.group(1)) + 1
        elif cls_block:
            ids[name] = depth + 1 + int(cls_block.group(1))
        else:
            ids[name] = top
    return ids, top


# --- linear probing ------------------------------------------------------------------------------

def num_probe_layers(model: nn.Module) -> int:
    """How many layers the linear probe can read: the blocks, and for XCiT also its class-attention
    blocks (numbered after the patch blocks)."""
    family = backbone_family(model)
    if family is None:
        raise TypeError(f"the linear probe reads timm Beit, VisionTransformer (DeiT) and Xcit models; got {type(model).__name__}")
    return len(model.blocks) + (_num_cls_attn_blocks(model) if family == "xcit" else 0)


def _has_cls_token(model: nn.Module) -> bool:
    return getattr(model, "cls_token", None) is not None


def probe_dims(model: nn.Module, layers: list[int]) -> list[int]:
    """Feature width of each probed layer (see :func:`probe_features`)."""
    dim = model.embed_dim
    if backbone_family(model) == "xcit":
        depth = len(model.blocks)
        return [dim if layer < depth else 2 * dim for layer in layers]
    return [2 * dim if _has_cls_token(model) else dim for _ in layers]


def probe_features(model: nn.Module, images: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
    """The linear probe's features after each of ``layers`` (raw block outputs, no final norm).

    * BEiT, ViT, DeiT: concat(class token, mean of the patch tokens), as BEiT's
      ``run_linear_eval.py``; DeiT's distillation token and ViT's register tokens are left out of
      both (a ViT without a class token gives the mean patch token alone);
    * XCiT: its patch blocks never see the class token, so layer ``i < L`` gives the mean patch
      token; layer ``L + j`` is class-attention block ``j`` and gives concat(class token, mean patch
      token) of its output (the class token after ``j + 1`` class-attention blocks).
    """
    family = backbone_family(model)
    if family in ("beit", "vit"):
        outs = model.forward_intermediates(
            images, indices=layers, return_prefix_tokens=model.num_prefix_tokens > 0, norm=False, output_fmt="NLC",
            intermediates_only=True,
        )
        if not model.num_prefix_tokens:
            return [patches.mean(1) for patches in outs]
        if _has_cls_token(model):
            return [torch.cat([prefix[:, 0], patches.mean(1)], dim=-1) for patches, prefix in outs]
        return [patches.mean(1) for patches, _ in outs]
    if family == "xcit":
        depth = len(model.blocks)
        patch_layers = [layer for layer in layers if layer < depth]
        cls_layers = [layer - depth for layer in layers if layer >= depth]
        wanted = sorted(set(patch_layers) | ({depth - 1} if cls_layers else set()))
        outs = dict(zip(wanted, model.forward_intermediates(
            images, indices=wanted, norm=False, output_fmt="NLC", intermediates_only=True), strict=True))
        feats = {layer: outs[layer].mean(1) for layer in patch_layers}
        if cls_layers:
            x = torch.cat([model.cls_token.expand(images.shape[0], -1, -1), outs[depth - 1]], dim=1)
            for j, block in enumerate(model.cls_attn_blocks[: max(cls_layers) + 1]):
                x = block(x)
                if j in cls_layers:
                    feats[depth + j] = torch.cat([x[:, 0], x[:, 1:].mean(1)], dim=-1)
        return [feats[layer] for layer in layers]
    raise TypeError(f"the linear probe reads timm Beit, VisionTransformer (DeiT) and Xcit models; got {type(model).__name__}")


# --- checkpoints -----------------------------------------------------------------------------------

#: keys of a classifier that a pre-training (masked image modeling) checkpoint does not have; they
#: start fresh when such a checkpoint is loaded (XCiT's pre-training has no class-attention stage)
CLASSIFIER_ONLY_PREFIXES: dict[str, tuple[str, ...]] = {
    "vit": ("head.", "head_dist.", "fc_norm."),
    "xcit": ("head.", "cls_attn_blocks.", "cls_token"),
}
_MIM_ONLY_PREFIXES = ("mask_token", "lm_head.")


def fit_state_dict(
    flat: Mapping[str, torch.Tensor], model: nn.Module
) -> tuple[dict[str, torch.Tensor], list[str], tuple[str, ...]]:
    """Make a flat state dict (timm names, no ``backbone.`` prefix) fit a ViT / DeiT / XCiT target:
    a timm classifier of those families or a :class:`~beit_lightning.models.BeitForMaskedImageModeling`
    over one. Returns ``(state dict in the target's names, dropped keys with the reason, prefixes
    of target keys that may start fresh)``.

    timm's own checkpoint filter of the family runs on the keys the target has: the ViT filter
    resamples the absolute position embedding to the target's grid (class and distillation tokens
    kept), the XCiT filter renames the official release's ``pos_embeder`` and splits the
    class-attention ``qkv``. Heads of another class count, a final norm the target does not have
    (it pools with ``fc_norm``) and, for a classifier, the mask token and LM head are dropped.
    """
    mim = hasattr(model, "lm_head") and hasattr(model, "backbone")
    target = model.backbone if mim else model
    family = backbone_family(target)
    flat = dict(flat)
    dropped: list[str] = []
    mim_keys = {k: flat.pop(k) for k in list(flat) if k.startswith(_MIM_ONLY_PREFIXES)}
    if not mim:
        dropped += sorted(mim_keys)
    target_state = target.state_dict()
    if family in ("vit", "xcit"):
        fits = {k: v for k, v in flat.items() if k in target_state or (family == "xcit" and k.startswith(("pos_embeder.", "cls_attn_blocks.")))}
        others = {k: v for k, v in flat.items() if k not in fits}
        if family == "vit":
            from timm.models.vision_transformer import checkpoint_filter_fn
        else:
            from timm.models.xcit import checkpoint_filter_fn
        flat = {**others, **checkpoint_filter_fn(fits, target)}
    for key in [k for k in flat if k.startswith("norm.") and k not in target_state]:
        flat.pop(key)
        dropped.append(f"{key} (the target has no final norm: it pools first, then applies fc_norm)")
    for key in [k for k in flat if k.startswith(("head.", "head_dist."))]:
        if key not in target_state or flat[key].shape != target_state[key].shape:
            dropped.append(f"{key} {tuple(flat.pop(key).shape)} (the target has another head)")
    if mim:
        return {**{f"backbone.{k}": v for k, v in flat.items()}, **mim_keys}, dropped, ()
    return flat, dropped, CLASSIFIER_ONLY_PREFIXES.get(family, ("head.",))
