"""BEiT for masked image modeling on top of timm's ``Beit``.

The backbone is a plain ``timm.models.beit.Beit`` (its blocks, patch embedding and shared
relative position bias), so its state dict is a timm state dict and fine-tuning code can use it
directly. This module adds only what pre-training needs: the learned mask token that replaces
masked patch embeddings, and the LM head that predicts visual tokens, run on masked positions only.

It also registers BEiT sizes that timm does not ship (``beit_lightning_{micro,tiny,small}_*``)
under names that cannot collide with timm's own ``beit_*`` models.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
import torch.utils.checkpoint
from timm.layers import trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.beit import Beit, checkpoint_filter_fn
from torch import nn

__all__ = ["BeitForMaskedImageModeling", "PRETRAIN_BACKBONE_DEFAULTS", "beit_init_"]

#: timm ``Beit`` arguments of BEiT pre-training (paper section 2.5 and the official
#: ``modeling_pretrain.py``): shared relative position bias, no absolute position embedding,
#: layer scale 0.1, drop path 0.1, final LayerNorm on every token (no pooling head).
PRETRAIN_BACKBONE_DEFAULTS: dict[str, Any] = dict(
    num_classes=0,
    use_abs_pos_emb=False,
    use_rel_pos_bias=False,
    use_shared_rel_pos_bias=True,
    init_values=0.1,
    drop_path_rate=0.1,
    use_fc_norm=False,
)


def _trunc_normal_std_(tensor: torch.Tensor, std: float) -> None:
    """BEiT's truncated normal: cut at +-std (timm's default cut is +-2 in absolute value)."""
    trunc_normal_(tensor, mean=0.0, std=std, a=-std, b=std)


def beit_init_(backbone: Beit, init_std: float = 0.02) -> None:
    """Re-initialise a timm ``Beit`` the way BEiT pre-training does.

    Linear weights, the patch-embedding convolution, the cls token and position tables get a
    normal of ``init_std`` truncated at +-``init_std`` (the official ``_init_weights`` has a Conv2d
    branch); biases are zero, LayerNorms are (1, 0); ``attn.proj`` and ``mlp.fc2`` of
    block ``l`` (1-based) are divided by ``sqrt(2 l)``. Layer-scale values are left as timm set
    them (``init_values``); the relative position tables start at zero as in the official code.
    """
    with torch.no_grad():
        for module in backbone.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                _trunc_normal_std_(module.weight, init_std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
        _trunc_normal_std_(backbone.cls_token, init_std)
        if backbone.pos_embed is not None:
            _trunc_normal_std_(backbone.pos_embed, init_std)
        for block in backbone.blocks:
            if block.attn.q_bias is not None:
                block.attn.q_bias.zero_()
                block.attn.v_bias.zero_()
        backbone.fix_init_weight()


class BeitForMaskedImageModeling(nn.Module):
    """A timm BEiT backbone with a mask token and an LM head over the visual-token vocabulary.

    Args:
        backbone: a timm model name of the BEiT family (``beit_base_patch16_224``,
            ``beit_large_patch16_224``, ``beit_lightning_small_patch16_224``, ...).
        vocab_size: size of the tokenizer's vocabulary (DALL-E: 8192).
        init_std: std of BEiT's truncated-normal initialisation.
        **backbone_kwargs: passed to ``timm.create_model`` on top of
            :data:`PRETRAIN_BACKBONE_DEFAULTS` (e.g. ``drop_path_rate``, ``img_size``).

    ``forward(pixel_values, bool_masked_pos)`` returns ``logits[bool_masked_pos]``: one row of
    ``vocab_size`` logits per masked patch, batch-major.
    """

    def __init__(
        self,
        backbone: str = "beit_base_patch16_224",
        vocab_size: int = 8192,
        init_std: float = 0.02,
        **backbone_kwargs: Any,
    ) -> None:
        super().__init__()
        if not backbone.startswith(("beit", "beitv2")):
            raise ValueError(f"backbone must be a timm BEiT model name (beit_*); got {backbone!r}")
        kwargs = {**PRETRAIN_BACKBONE_DEFAULTS, **backbone_kwargs}
        kwargs.pop("pretrained", None)
        self.backbone: Beit = timm.create_model(backbone, pretrained=False, **kwargs)
        if not isinstance(self.backbone, Beit):
            raise TypeError(f"{backbone!r} did not build a timm Beit but {type(self.backbone).__name__}")
        self.vocab_size = vocab_size
        self.init_std = init_std
        embed_dim = self.backbone.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.lm_head = nn.Linear(embed_dim, vocab_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        beit_init_(self.backbone, self.init_std)
        with torch.no_grad():
            _trunc_normal_std_(self.mask_token, self.init_std)
            _trunc_normal_std_(self.lm_head.weight, self.init_std)
            self.lm_head.bias.zero_()

    @property
    def patch_grid(self) -> tuple[int, int]:
        """The patch grid ``(h, w)`` that masks must have."""
        return tuple(self.backbone.patch_embed.grid_size)

    @property
    def patch_size(self) -> int:
        return int(self.backbone.patch_embed.patch_size[0])

    @property
    def image_size(self) -> int:
        return int(self.backbone.patch_embed.img_size[0])

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters exempt from weight decay besides 1-d tensors and biases: the cls token and the
        absolute position embedding, as the official ``modeling_pretrain.py`` (the mask token and
        the shared relative position table are decayed there, and so here)."""
        return {"backbone.pos_embed", "backbone.cls_token"}

    def forward_features(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
        """Encode images whose masked patches are replaced by the mask token; returns all tokens
        (cls first) after the final LayerNorm, ``B x (1 + N) x D``."""
        backbone = self.backbone
        x = backbone.patch_embed(pixel_values)
        batch, num_patches, _ = x.shape
        w = bool_masked_pos.reshape(batch, num_patches, 1).to(x.dtype)
        x = x * (1.0 - w) + self.mask_token.to(x.dtype) * w
        x = torch.cat((backbone.cls_token.expand(batch, -1, -1).to(x.dtype), x), dim=1)
        if backbone.pos_embed is not None:
            x = x + backbone.pos_embed
        x = backbone.pos_drop(x)
        rel_pos_bias = backbone.rel_pos_bias() if backbone.rel_pos_bias is not None else None
        for block in backbone.blocks:
            if backbone.grad_checkpointing and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(block, x, rel_pos_bias, use_reentrant=False)
            else:
                x = block(x, shared_rel_pos_bias=rel_pos_bias)
        return backbone.norm(x)

    def forward(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
        patch_tokens = self.forward_features(pixel_values, bool_masked_pos)[:, 1:]
        return self.lm_head(patch_tokens[bool_masked_pos.flatten(1)])


# --- timm registrations for sizes timm lacks -------------------------------------------------

def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        **kwargs,
    }


_SIZES: dict[str, dict[str, Any]] = {
    # A minute model for tests and the demo: 32px-64px images, 8px patches.
    "beit_lightning_micro_patch8_32": dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2),
    # DeiT-Ti and DeiT-S sizes with BEiT's block (relative position bias, layer scale).
    "beit_lightning_tiny_patch16_224": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "beit_lightning_small_patch16_224": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
}

default_cfgs = generate_default_cfgs(
    {
        "beit_lightning_micro_patch8_32.untrained": _cfg(input_size=(3, 32, 32), num_classes=10),
        "beit_lightning_tiny_patch16_224.untrained": _cfg(),
        "beit_lightning_small_patch16_224.untrained": _cfg(),
    }
)


def _create(variant: str, pretrained: bool, **kwargs: Any) -> Beit:
    args = dict(mlp_ratio=4, use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1)
    args.update(_SIZES[variant])
    args.update(kwargs)
    return build_model_with_cfg(Beit, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **args)


@register_model
def beit_lightning_micro_patch8_32(pretrained: bool = False, **kwargs: Any) -> Beit:
    """BEiT, 64-d, 2 blocks, 2 heads, 32px images with 8px patches (tests and the demo)."""
    return _create("beit_lightning_micro_patch8_32", pretrained, **kwargs)


@register_model
def beit_lightning_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> Beit:
    """BEiT at DeiT-Tiny size: 192-d, 12 blocks, 3 heads."""
    return _create("beit_lightning_tiny_patch16_224", pretrained, **kwargs)


@register_model
def beit_lightning_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> Beit:
    """BEiT at DeiT-Small size: 384-d, 12 blocks, 6 heads."""
    return _create("beit_lightning_small_patch16_224", pretrained, **kwargs)

