"""SplitMask (El-Nouby et al., "Are Large-scale Datasets Necessary for Self-Supervised
Pre-training?", arXiv 2112.10740): split, inpaint, match.

The patches of an image are split into two disjoint halves A and B (the batch's ``mask`` is B).
The encoder, a plain timm ``Beit`` or ``VisionTransformer``, sees the patches of one half only: no
mask tokens enter it (section 4.2), so it never sees the other half's pixels. A shallow decoder
(2 blocks of the encoder's width, section 5.5) takes one half's encodings plus mask tokens at the
other half's positions and predicts the other half's visual tokens, in both directions; the mean
of each direction's decoder outputs (observed and inpainted patches, section 4.3) is the global
vector that the task's InfoNCE loss matches across the two halves.

Everything that is not the encoder lives in ``lm_head`` (:class:`SplitMaskDecoder`), the name the
checkpoint loaders drop when they fill a classifier, a linear probe or a segmenter: the encoder's
state dict is a timm state dict exactly as :class:`~beit_lightning.models.BeitForMaskedImageModeling`'s.

Position information on a subset of patches:

* absolute position embeddings (the paper's encoder, section 4.2 "standard vision transformer,
  with absolute positional embeddings") are added to all patch embeddings before the subset is
  taken, so each kept patch keeps its own position;
* BEiT's shared relative position bias (this project's default BEiT pre-training backbone) is
  computed for the whole grid and gathered, per sample, at the kept positions (and the class
  token), so attention between kept patches gets the bias of their true offsets. Per-block
  relative position tables are refused (pre-training uses the shared one).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import timm
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from .backbones import backbone_family, family_of_name
from .beit import MIM_BACKBONE_DEFAULTS, PRETRAIN_BACKBONE_DEFAULTS, beit_init_

__all__ = ["SplitMaskDecoder", "SplitMaskModel", "info_nce", "split_indices"]


def split_indices(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat patch indices of half A (``~mask``) and half B (``mask``), each ascending, ``B x n_A`` and
    ``B x n_B``. Every sample must have the same number of patches in B (the split generator's
    fixed count), so that the halves batch."""
    flat = mask.flatten(1)
    counts = flat.sum(1)
    if flat.shape[0] and not bool((counts == counts[0]).all()):
        raise ValueError(
            f"every sample's split must put the same number of patches in half B; got {sorted(set(counts.tolist()))}: "
            "draw splits with beit_lightning.data.RandomSplitGenerator (data.masking=split)"
        )
    n_b = int(counts[0]) if flat.shape[0] else 0
    order = torch.argsort(flat.to(torch.int8), dim=1, stable=True)  # A positions first, then B, each ascending
    return order[:, : flat.shape[1] - n_b], order[:, flat.shape[1] - n_b :]


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b]]`` for ``x``: ``B x N x D``, ``index``: ``B x k``."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def info_nce(queries: torch.Tensor, keys: torch.Tensor, temperature: float, offset: int = 0) -> torch.Tensor:
    """InfoNCE (paper eq. 2) of each query against all ``keys``: query ``i``'s positive is key
    ``offset + i``, the other keys (the other images of the batch) are its negatives. Vectors are
    L2-normalised first (cosine similarity, as MoCo v3, whose temperature the paper takes). Mean
    over queries of ``-log softmax``."""
    q, k = F.normalize(queries.float(), dim=-1), F.normalize(keys.float(), dim=-1)
    logits = q @ k.t() / temperature
    labels = torch.arange(q.shape[0], device=q.device) + offset
    return F.cross_entropy(logits, labels)


class SplitMaskDecoder(nn.Module):
    """The shallow decoder and LM head: mask token, learned position embedding of the patch grid,
    ``depth`` ViT blocks of the encoder's width, a LayerNorm and the linear LM head.

    The position embedding is added to every token of the decoder's input (the encodings of the
    observed half and the mask tokens), so that the mask tokens carry their positions as the paper
    asks (section 4.2) also when the encoder has relative positions only. The encoder's class-token
    output leads the sequence (no position)."""

    def __init__(self, num_patches: int, dim: int, num_heads: int, vocab_size: int, depth: int = 2,
                 mlp_ratio: float = 4.0, init_std: float = 0.02) -> None:
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, dim))
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, vocab_size)
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    trunc_normal_(module.weight, std=init_std, a=-init_std, b=init_std)
                    if module.bias is not None:
                        module.bias.zero_()
            for p in (self.mask_token, self.pos_embed):
                trunc_normal_(p, std=init_std, a=-init_std, b=init_std)

    def forward(self, cls: torch.Tensor, encoded: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """Decoder outputs at every patch position, ``B x N x D`` (after the final norm).

        ``cls``: ``B x 1 x D``; ``encoded``: ``B x n_seen x D`` at the flat positions ``seen``;
        every other position gets the mask token."""
        batch, num_patches, dim = encoded.shape[0], self.pos_embed.shape[1], encoded.shape[-1]
        x = self.mask_token.to(encoded.dtype).expand(batch, num_patches, dim)
        x = x.scatter(1, seen.unsqueeze(-1).expand(-1, -1, dim), encoded)
        x = torch.cat((cls, x + self.pos_embed.to(x.dtype)), dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, 1:])


class SplitMaskModel(nn.Module):
    """SplitMask's network: a timm BEiT or ViT encoder run on one half of the patches, and
    :class:`SplitMaskDecoder` (``lm_head``).

    Args:
        backbone: a timm BEiT (``beit_base_patch16_224``, ``beit_lightning_micro_patch8_32``, ...) or
            ViT / DeiT name (``vit_base_patch16_224``, ...).
        vocab_size: the tokenizer's vocabulary (8192 for DALL-E and the paper's tokenizers, section 5.5).
        decoder_depth: decoder blocks (the paper: 2, section 5.5).
        init_std: BEiT's truncated-normal initialisation std.
        arch: the model config's family arguments (``model.arch``); for BEiT, pre-training's position
            choice (:data:`~beit_lightning.models.PRETRAIN_BACKBONE_DEFAULTS`: one shared relative
            position bias) replaces the fine-tuning one, as in ``BeitForMaskedImageModeling``.
        **backbone_kwargs: on top, passed to ``timm.create_model``; e.g. the paper's absolute
            position embedding with ``use_abs_pos_emb=True, use_shared_rel_pos_bias=False``.

    ``forward(pixel_values, mask)`` has BEiT's interface: logits of the ``mask`` half predicted from
    the other half, ``num_masked x vocab_size`` batch-major. :meth:`forward_split` gives both
    directions and the two global vectors.
    """

    def __init__(self, backbone: str = "beit_base_patch16_224", vocab_size: int = 8192, decoder_depth: int = 2,
                 init_std: float = 0.02, arch: dict[str, Any] | None = None, **backbone_kwargs: Any) -> None:
        super().__init__()
        family = family_of_name(backbone)
        if family not in ("beit", "vit"):
            raise ValueError(
                f"SplitMask's encoder must be a timm BEiT (beit_*) or ViT / DeiT (vit_*, deit_*) model; got {backbone!r}. "
                "XCiT's convolutional patch embedding lets each patch see its neighbours' pixels, so one half "
                "would see the other"
            )
        if family == "beit":
            kwargs = {**(arch or {}), **PRETRAIN_BACKBONE_DEFAULTS, **backbone_kwargs}
        else:
            kwargs = {**MIM_BACKBONE_DEFAULTS["vit"], **(arch or {}), **backbone_kwargs}
        kwargs.pop("pretrained", None)
        self.backbone = timm.create_model(backbone, pretrained=False, **kwargs)
        if backbone_family(self.backbone) != family:
            raise TypeError(f"{backbone!r} did not build a timm {family} model but {type(self.backbone).__name__}")
        self.family = family
        if family == "beit" and any(b.attn.relative_position_bias_table is not None for b in self.backbone.blocks):
            raise ValueError(
                "SplitMask cannot run per-block relative position tables on a subset of patches: use the shared "
                "relative position bias (use_rel_pos_bias=False, use_shared_rel_pos_bias=True, the default) or the "
                "paper's absolute position embedding (use_abs_pos_emb=True, use_shared_rel_pos_bias=False)"
            )
        if family == "vit":
            from timm.layers import PatchEmbed

            if type(self.backbone.patch_embed) is not PatchEmbed or not isinstance(self.backbone.patch_drop, nn.Identity):
                raise ValueError(f"{backbone!r}: SplitMask needs a plain patch embedding and no patch dropout")
        self.vocab_size, self.init_std = vocab_size, init_std
        if family in ("beit", "vit"):
            beit_init_(self.backbone, init_std)
        embed = self.backbone.patch_embed
        num_heads = self.backbone.blocks[0].attn.num_heads
        self.lm_head = SplitMaskDecoder(embed.num_patches, self.backbone.embed_dim, num_heads, vocab_size,
                                        depth=decoder_depth, init_std=init_std)

    @property
    def patch_grid(self) -> tuple[int, int]:
        return tuple(self.backbone.patch_embed.grid_size)

    @property
    def image_size(self) -> int:
        return int(self.backbone.patch_embed.img_size[0])

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Exempt from weight decay besides 1-d tensors and biases: the encoder's as in BEiT
        (``pos_embed``, ``cls_token``; ViT: timm's list) and the decoder's position embedding."""
        own = {"backbone.pos_embed", "backbone.cls_token"} if self.family == "beit" else {
            f"backbone.{n}" for n in self.backbone.no_weight_decay()}
        return own | {"lm_head.pos_embed"}

    # --- the encoder on one half ---------------------------------------------------------------
    def _prefix_and_patches(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix tokens (class, ...) and patch embeddings, each with its absolute position added."""
        bb = self.backbone
        x = bb.patch_embed(pixel_values)
        batch = x.shape[0]
        if self.family == "beit":
            prefix = bb.cls_token.expand(batch, -1, -1).to(x.dtype)
            if bb.pos_embed is not None:
                prefix, x = prefix + bb.pos_embed[:, :1], x + bb.pos_embed[:, 1:]
            return prefix, x
        tokens = [t for t in (bb.cls_token, getattr(bb, "dist_token", None), bb.reg_token) if t is not None]
        prefix = torch.cat([t.expand(batch, -1, -1) for t in tokens], 1).to(x.dtype) if tokens else x[:, :0]
        if bb.pos_embed is not None:
            if bb.no_embed_class:
                x = x + bb.pos_embed
            else:
                prefix, x = prefix + bb.pos_embed[:, : prefix.shape[1]], x + bb.pos_embed[:, prefix.shape[1] :]
        return prefix, x

    def _shared_bias(self, keep: torch.Tensor) -> torch.Tensor | None:
        """BEiT's shared relative position bias at the kept patches (and the class token), per
        sample: ``B x heads x (1 + k) x (1 + k)``."""
        if self.family != "beit" or self.backbone.rel_pos_bias is None:
            return None
        full = self.backbone.rel_pos_bias()  # heads x (1 + N) x (1 + N)
        tokens = torch.cat((keep.new_zeros(keep.shape[0], 1), keep + 1), dim=1)
        return full[:, tokens[:, :, None], tokens[:, None, :]].permute(1, 0, 2, 3)

    def encode(self, pixel_values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Encode the patches at the flat positions ``keep`` (``B x k``) only: ``B x (P + k) x D``
        after the final norm, the ``P`` prefix tokens (class token) first."""
        return self._encode_embedded(*self._prefix_and_patches(pixel_values), keep)

    def _encode_embedded(self, prefix: torch.Tensor, patches: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """:meth:`encode` from the embeddings of :meth:`_prefix_and_patches` (both halves of an image
        share one patch embedding)."""
        bb = self.backbone
        x = torch.cat((prefix, _gather(patches, keep)), dim=1)
        x = bb.pos_drop(x)
        if self.family == "vit":
            x = bb.norm_pre(x)
        bias = self._shared_bias(keep)
        for block in bb.blocks:
            args = (x, bias) if self.family == "beit" else (x,)
            if bb.grad_checkpointing and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
            else:
                x = block(*args)
        return bb.norm(x)

    # --- split, inpaint ------------------------------------------------------------------------
    def forward_split(self, pixel_values: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Both directions. Returns ``logits_b`` (the ``mask`` half, predicted from the other;
        batch-major like ``tokens[mask]``), ``logits_a`` (the other half, like ``tokens[~mask]``),
        and the global vectors ``pooled_a`` / ``pooled_b`` (``B x D``: mean decoder output over all
        patches, from the encodings of half A / half B)."""
        idx_a, idx_b = split_indices(mask)
        prefix = self.num_prefix_tokens
        embedded = self._prefix_and_patches(pixel_values)  # one patch embedding for both halves
        if idx_a.shape[1] == idx_b.shape[1]:  # one encoder pass over both halves
            both = [t.repeat(2, 1, 1) for t in embedded]
            enc_a, enc_b = self._encode_embedded(*both, torch.cat((idx_a, idx_b))).chunk(2)
        else:
            enc_a, enc_b = self._encode_embedded(*embedded, idx_a), self._encode_embedded(*embedded, idx_b)
        if idx_a.shape[1] == idx_b.shape[1]:  # one decoder pass over both directions
            decoded_a, decoded_b = self.lm_head(torch.cat((enc_a[:, :1], enc_b[:, :1])),
                                                torch.cat((enc_a[:, prefix:], enc_b[:, prefix:])),
                                                torch.cat((idx_a, idx_b))).chunk(2)
        else:
            decoded_a = self.lm_head(enc_a[:, :1], enc_a[:, prefix:], idx_a)
            decoded_b = self.lm_head(enc_b[:, :1], enc_b[:, prefix:], idx_b)
        # decoded_a comes from half A's encodings: its predictions are for half B, and vice versa
        return {
            "logits_b": self.lm_head.head(_gather(decoded_a, idx_b)).flatten(0, 1),
            "logits_a": self.lm_head.head(_gather(decoded_b, idx_a)).flatten(0, 1),
            "pooled_a": decoded_a.mean(1),
            "pooled_b": decoded_b.mean(1),
        }

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if self.family == "beit" else int(getattr(self.backbone, "num_prefix_tokens", 1))

    def forward(self, pixel_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits of the ``mask`` half predicted from the other half (BEiT's interface)."""
        idx_a, idx_b = split_indices(mask)
        enc = self.encode(pixel_values, idx_a)
        decoded = self.lm_head(enc[:, :1], enc[:, self.num_prefix_tokens :], idx_a)
        return self.lm_head.head(_gather(decoded, idx_b)).flatten(0, 1)
