"""BEiT's masked image modeling on top of a timm backbone: ``Beit``, ``VisionTransformer`` (ViT,
DeiT and distilled DeiT) or ``Xcit``.

The backbone is a plain timm model (for BEiT a ``timm.models.beit.Beit`` with its blocks, patch
embedding and shared relative position bias), so its state dict is a timm state dict and
fine-tuning code can use it directly. This module adds only what pre-training needs: the learned
mask token that replaces masked patch embeddings, and the LM head that predicts visual tokens,
run on masked positions only. With a ``Beit`` it is the official BEiT model exactly.

The BEiT sizes timm does not ship (``beit_lightning_{micro,tiny,small}_*``) are registered in
:mod:`beit_lightning.models.timm_sizes`.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
import torch.utils.checkpoint
from timm.layers import trunc_normal_
from torch import nn

from .attention import check_attention, set_attention
from .backbones import FAMILIES, backbone_family, family_of_name
from .timm_sizes import TIMM_SIZES  # noqa: F401 - importing registers the beit_lightning_* timm names

__all__ = ["BeitForMaskedImageModeling", "MIM_BACKBONE_DEFAULTS", "PRETRAIN_BACKBONE_DEFAULTS", "beit_init_", "gather_masked"]

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

#: timm arguments of the other families for pre-training: no head, and a final LayerNorm on every
#: token (``fc_norm=False`` keeps ViT's ``norm`` even for average-pooling variants)
MIM_BACKBONE_DEFAULTS: dict[str, dict[str, Any]] = {
    "beit": PRETRAIN_BACKBONE_DEFAULTS,
    "vit": dict(num_classes=0, fc_norm=False),
    "xcit": dict(num_classes=0),
}


def trunc_normal_std_(tensor: torch.Tensor, std: float) -> None:
    """BEiT's truncated normal: cut at +-std (timm's default cut is +-2 in absolute value)."""
    trunc_normal_(tensor, mean=0.0, std=std, a=-std, b=std)


def beit_init_(backbone: nn.Module, init_std: float = 0.02) -> None:
    """Re-initialise a timm ``Beit`` (or ``VisionTransformer``) the way BEiT pre-training does.

    Linear weights, the patch-embedding convolution, the cls token and position tables get a
    normal of ``init_std`` truncated at +-``init_std`` (the official ``_init_weights`` has a Conv2d
    branch); biases are zero, LayerNorms are (1, 0); ``attn.proj`` and ``mlp.fc2`` of
    block ``l`` (1-based) are divided by ``sqrt(2 l)``. Layer-scale values are left as timm set
    them (``init_values``); the relative position tables start at zero as in the official code.
    A ViT's distillation and register tokens are treated as the cls token.
    """
    with torch.no_grad():
        for module in backbone.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                trunc_normal_std_(module.weight, init_std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
        if backbone.cls_token is not None:  # a ViT may have none (global average pooling)
            trunc_normal_std_(backbone.cls_token, init_std)
        if backbone.pos_embed is not None:
            trunc_normal_std_(backbone.pos_embed, init_std)
        for name in ("dist_token", "reg_token"):  # DeiT, ViT with registers
            if getattr(backbone, name, None) is not None:
                trunc_normal_std_(getattr(backbone, name), init_std)
        for block in backbone.blocks:
            if getattr(block.attn, "q_bias", None) is not None:
                block.attn.q_bias.zero_()
                block.attn.v_bias.zero_()
        backbone.fix_init_weight()


class BeitForMaskedImageModeling(nn.Module):
    """A timm backbone with a mask token and an LM head over the visual-token vocabulary.

    Args:
        backbone: a timm model name of a supported family: BEiT (``beit_base_patch16_224``,
            ``beit_lightning_small_patch16_224``, ...), ViT / DeiT (``vit_small_patch16_224``,
            ``deit_base_patch16_224``, ``deit_base_distilled_patch16_224``, ...) or XCiT
            (``xcit_small_12_p16_224``, ...).
        vocab_size: size of the tokenizer's vocabulary (DALL-E: 8192).
        init_std: std of BEiT's truncated-normal initialisation.
        arch: architecture-specific timm arguments (``model.arch`` of the model config: sizes,
            XCiT's ``eta``, ...). For BEiT, pre-training's own position-bias choice
            (:data:`PRETRAIN_BACKBONE_DEFAULTS`: one shared relative position bias) replaces the
            fine-tuning one ``arch`` holds; sizes (``depth``, ...) pass through.
        attention: the attention kernel of a BEiT backbone (:mod:`beit_lightning.models.attention`):
            ``"sdpa"`` (timm's), ``"sdpa_efficient"`` (memory-efficient / cuDNN SDPA on CUDA) or
            ``"flex"`` (FlexAttention, the bias as a ``score_mod``). Other families: ``"sdpa"`` only.
        **backbone_kwargs: passed to ``timm.create_model`` on top of the family's
            :data:`MIM_BACKBONE_DEFAULTS` (e.g. ``drop_path_rate``, ``img_size``). ``init_values``
            is the layer-scale initial value (timm's ``eta`` for XCiT; ``None``: no layer scale
            for ViT, the model's own for XCiT).

    ``forward(pixel_values, bool_masked_pos)`` returns ``logits[bool_masked_pos]``: one row of
    ``vocab_size`` logits per masked patch, batch-major.

    Per family:

    * BEiT: the official BEiT model (``modeling_pretrain.py``), initialised by :func:`beit_init_`.
    * ViT / DeiT: the mask token replaces the masked patch embeddings before the class (and
      distillation / register) tokens and the absolute position embedding are added, as in BEiT;
      the final norm is applied to every token; BEiT's initialisation is applied.
    * XCiT: the masked patches' pixels are also set to 0 (the normalised mean) before the
      convolutional patch embedding, whose 3x3 convolutions would otherwise let the neighbours
      of a masked patch see its pixels; then the mask token, the Fourier position encoding, the
      cross-covariance blocks and the final norm. The class-attention blocks and the class token
      read only the class token (they never change a patch token's prediction), so they are left
      out of pre-training (timm's ``prune_intermediate_layers``): fine-tuning starts them fresh.
      timm's XCiT initialisation is kept (its convolutional stem has BatchNorm).
    """

    def __init__(
        self,
        backbone: str = "beit_base_patch16_224",
        vocab_size: int = 8192,
        init_std: float = 0.02,
        arch: dict[str, Any] | None = None,
        attention: str = "sdpa",
        **backbone_kwargs: Any,
    ) -> None:
        super().__init__()
        family = family_of_name(backbone)
        if family is None:
            raise ValueError(
                f"backbone must be a timm BEiT model name (beit_*) or a ViT / DeiT / XCiT name "
                f"(vit_*, deit_*, xcit_*: the timm modules {sorted(m for ms in FAMILIES.values() for m in ms)}); "
                f"got {backbone!r}"
            )
        check_attention(attention, family)
        if family == "beit":
            kwargs = {**(arch or {}), **PRETRAIN_BACKBONE_DEFAULTS, **backbone_kwargs}
        else:
            kwargs = {**MIM_BACKBONE_DEFAULTS[family], **(arch or {}), **backbone_kwargs}
            if family == "xcit":
                layer_scale = kwargs.pop("init_values", None)
                if layer_scale is not None:
                    kwargs.setdefault("eta", layer_scale)
        kwargs.pop("pretrained", None)
        self.backbone = timm.create_model(backbone, pretrained=False, **kwargs)
        if backbone_family(self.backbone) != family:
            raise TypeError(f"{backbone!r} did not build a timm {family} model but {type(self.backbone).__name__}")
        self.family = family
        self.attention = attention
        set_attention(self.backbone, attention)  # BEiT: the kernel of the relative position bias
        if family == "vit":
            from timm.layers import PatchEmbed

            if type(self.backbone.patch_embed) is not PatchEmbed:
                raise ValueError(f"{backbone!r} embeds patches with {type(self.backbone.patch_embed).__name__}: only "
                                 "ViTs with a plain (non-overlapping) patch embedding can be pre-trained here")
            if not isinstance(self.backbone.patch_drop, nn.Identity):
                raise ValueError("patch dropout (patch_drop_rate > 0) cannot be combined with masked image modeling")
        if family == "xcit":  # the class-attention stage reads only the class token: not pre-trained
            self.backbone.prune_intermediate_layers(len(self.backbone.blocks), prune_norm=False, prune_head=True)
        self.vocab_size = vocab_size
        self.init_std = init_std
        embed_dim = self.backbone.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.lm_head = nn.Linear(embed_dim, vocab_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.family in ("beit", "vit"):
            beit_init_(self.backbone, self.init_std)
        with torch.no_grad():
            trunc_normal_std_(self.mask_token, self.init_std)
            trunc_normal_std_(self.lm_head.weight, self.init_std)
            self.lm_head.bias.zero_()

    @property
    def patch_grid(self) -> tuple[int, int]:
        """The patch grid ``(h, w)`` that masks must have."""
        embed = self.backbone.patch_embed
        if hasattr(embed, "grid_size"):
            return tuple(embed.grid_size)
        return (embed.img_size[0] // self.patch_size, embed.img_size[1] // self.patch_size)  # XCiT

    @property
    def patch_size(self) -> int:
        size = self.backbone.patch_embed.patch_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def image_size(self) -> int:
        return int(self.backbone.patch_embed.img_size[0])

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens in :meth:`forward_features` (class, distillation, registers)."""
        return {"beit": 1, "xcit": 0}.get(self.family, getattr(self.backbone, "num_prefix_tokens", 1))

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters exempt from weight decay besides 1-d tensors and biases: the cls token and the
        absolute position embedding, as the official ``modeling_pretrain.py`` (the mask token and
        the shared relative position table are decayed there, and so here). Other families: the
        backbone's own list (ViT / DeiT: position embedding, class, distillation and register
        tokens; XCiT: the class token); the mask token is decayed as in BEiT."""
        if self.family == "beit":
            return {"backbone.pos_embed", "backbone.cls_token"}
        return {f"backbone.{name}" for name in self.backbone.no_weight_decay()}

    def _replace_masked(self, x: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
        """Masked patch embeddings (``x``: ``B x N x D`` or ``B x H x W x D``) -> the mask token."""
        w = bool_masked_pos.reshape(*x.shape[:-1], 1).to(x.dtype)
        return x * (1.0 - w) + self.mask_token.to(x.dtype).reshape(*([1] * (x.ndim - 1)), -1) * w

    def forward_features(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
        """Encode images whose masked patches are replaced by the mask token; returns all tokens
        (the :attr:`num_prefix_tokens` prefix tokens first; BEiT: cls) after the final LayerNorm,
        ``B x (P + N) x D``."""
        if self.family == "vit":
            return self._forward_features_vit(pixel_values, bool_masked_pos)
        if self.family == "xcit":
            return self._forward_features_xcit(pixel_values, bool_masked_pos)
        return self.backbone.norm(self._forward_beit_blocks(pixel_values, bool_masked_pos)[0])

    def _forward_beit_blocks(
        self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor, keep_layer: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The BEiT backbone over masked inputs, stopping before the final norm: ``(last, kept,
        rel_pos_bias)``, the last block's tokens, those after block ``keep_layer`` (1-based; ``None``
        keeps none) and the shared relative position bias (``None`` without one). Heads built on top
        (BEiT v2's patch aggregation) read an intermediate layer and run more blocks with the bias."""
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
        kept = None
        for i, block in enumerate(backbone.blocks):
            x = self._beit_block(block, x, rel_pos_bias)
            if i + 1 == keep_layer:
                kept = x
        return x, kept, rel_pos_bias

    def _beit_block(self, block: nn.Module, x: torch.Tensor, rel_pos_bias: torch.Tensor | None) -> torch.Tensor:
        """One BEiT block with the shared relative position bias, under the backbone's activation checkpointing."""
        if self.backbone.grad_checkpointing and not torch.jit.is_scripting():
            return torch.utils.checkpoint.checkpoint(block, x, rel_pos_bias, use_reentrant=False)
        return block(x, shared_rel_pos_bias=rel_pos_bias)

    def _forward_features_vit(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
        backbone = self.backbone
        x = self._replace_masked(backbone.patch_embed(pixel_values), bool_masked_pos)
        x = backbone._pos_embed(x)  # class / distillation / register tokens, position embedding, dropout
        x = backbone.norm_pre(x)
        for block in backbone.blocks:
            if backbone.grad_checkpointing and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return backbone.norm(x)

    def _forward_features_xcit(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
        backbone = self.backbone
        p = self.patch_size
        keep = (~bool_masked_pos).to(pixel_values.dtype).repeat_interleave(p, 1).repeat_interleave(p, 2)
        x, (hp, wp) = backbone.patch_embed(pixel_values * keep.unsqueeze(1))
        x = self._replace_masked(x, bool_masked_pos)
        if backbone.pos_embed is not None:
            x = x + backbone.pos_embed(x.shape[0], hp, wp).reshape(x.shape[0], -1, x.shape[1]).permute(0, 2, 1).to(x.dtype)
        x = backbone.pos_drop(x)
        for block in backbone.blocks:
            if backbone.grad_checkpointing and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(block, x, hp, wp, use_reentrant=False)
            else:
                x = block(x, hp, wp)
        return backbone.norm(x)

    def forward(
        self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor, num_masked: int | None = None
    ) -> torch.Tensor:
        """``num_masked``: every mask has exactly this many masked patches (pre-training's exact
        blockwise masks), so the rows are gathered without a host synchronisation."""
        patch_tokens = self.forward_features(pixel_values, bool_masked_pos)[:, self.num_prefix_tokens:]
        if num_masked is not None:
            return self.lm_head(gather_masked(patch_tokens, bool_masked_pos, num_masked))
        return self.lm_head(patch_tokens[bool_masked_pos.flatten(1)])


def gather_masked(x: torch.Tensor, bool_masked_pos: torch.Tensor, num_masked: int) -> torch.Tensor:
    """``x[bool_masked_pos.flatten(1)]`` (``x``: ``B x N x ...``) for masks with exactly ``num_masked``
    masked positions each. Boolean indexing waits for the device to count the output rows; here the
    count is known, and a stable sort puts each row's masked positions first, in their order."""
    index = bool_masked_pos.flatten(1).to(torch.uint8).argsort(dim=1, descending=True, stable=True)[:, :num_masked]
    index = index.reshape(*index.shape, *([1] * (x.ndim - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, index).flatten(0, 1)
