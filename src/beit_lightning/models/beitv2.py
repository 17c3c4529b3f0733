"""BEiT v2's pre-training model: BEiT's masked image modeling plus the patch-aggregation head.

BEiT v2 (microsoft/unilm ``beit2/modeling_pretrain.py``, ``VisionTransformerForMaskedImageModelingCLS``)
keeps the v1 network and adds a small Transformer head that must predict the masked tokens from
the *last* layer's class token joined with the patch tokens of an *early* layer. The patch tokens
of that early layer carry no global summary yet, so the only way for the head to do well is for
the class token to aggregate the image: that is what makes the class token a good image
representation (linear probing). The head is used in pre-training only; fine-tuning drops it.

Official details reproduced here (``early_layers`` / ``head_layers`` / ``shared_lm_head`` are the
arguments of ``run_beitv2_pretraining.py``):

* the head's blocks are BEiT blocks of the backbone's width, with the shared relative position
  bias of the backbone, layer scale ``init_values``, and drop-path rates
  ``linspace(0, drop_path_rate, max(depth, early + head))[early + i]``;
* its input is ``cat(last_layer[:, :1], early_layer[:, 1:])`` before any final norm, its output
  goes through the backbone's final norm and LM head (``shared_lm_head=True``) or its own
  ``cls_pt_norm`` / ``cls_pt_lm_head``;
* initialisation: the head's blocks keep PyTorch's default initialisation (the official code does
  not apply its truncated normal to them), their ``attn.proj`` and ``mlp.fc2`` weights divided by
  ``sqrt(2 (early_layers + i + 1))``; a separate norm / LM head gets BEiT's truncated normal.

Parameter names follow the official checkpoint (``cls_pt_layers.N.*``, ``cls_pt_norm.*``,
``cls_pt_lm_head.*``), so the released v2 pre-training files load key for key.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
from timm.models.beit import Block
from torch import nn

from .attention import set_attention
from .beit import PRETRAIN_BACKBONE_DEFAULTS, BeitForMaskedImageModeling, gather_masked, trunc_normal_std_

__all__ = ["BeitV2ForMaskedImageModeling", "PATCH_AGGREGATION_PREFIXES"]

#: parameter names of the patch-aggregation head (pre-training only; a classifier has no use for them)
PATCH_AGGREGATION_PREFIXES = ("cls_pt_layers.", "cls_pt_norm.", "cls_pt_lm_head.")


class BeitV2ForMaskedImageModeling(BeitForMaskedImageModeling):
    """BEiT v2's masked-image-modeling network: a BEiT backbone, its LM head and the
    patch-aggregation head.

    Args:
        backbone: a timm BEiT name (``beit_base_patch16_224``, ``beit_lightning_micro_patch8_32``, ...).
        vocab_size: the tokenizer's vocabulary (VQ-KD: 8192).
        early_layers: the backbone block (1-based count) whose patch tokens feed the head
            (official: 9 for base, 21 for large); must be below the backbone's depth.
        head_layers: blocks of the head (official: 2).
        shared_lm_head: the head's tokens go through the backbone's final norm and LM head
            (official: True); False gives the head its own norm and LM head.
        init_std, arch, **backbone_kwargs: as :class:`BeitForMaskedImageModeling`.

    ``forward(pixel_values, bool_masked_pos)`` is v1's (the backbone's logits at masked patches), so
    code written for :class:`BeitForMaskedImageModeling` keeps working; :meth:`forward_with_aggregation`
    returns ``(logits, aggregation_logits)``, the same rows from both, for BEiT v2's loss (the sum of
    the two cross-entropies, :class:`~beit_lightning.tasks.MaskedImageModelingV2`).
    """

    def __init__(
        self,
        backbone: str = "beit_base_patch16_224",
        vocab_size: int = 8192,
        early_layers: int = 9,
        head_layers: int = 2,
        shared_lm_head: bool = True,
        init_std: float = 0.02,
        arch: dict[str, Any] | None = None,
        **backbone_kwargs: Any,
    ) -> None:
        super().__init__(backbone, vocab_size=vocab_size, init_std=init_std, arch=arch, **backbone_kwargs)
        if self.family != "beit":
            raise ValueError(f"BEiT v2's patch-aggregation head needs a BEiT backbone (beit_*); got {backbone!r}")
        depth = len(self.backbone.blocks)
        if not 1 <= early_layers < depth:
            raise ValueError(f"early_layers must be between 1 and depth - 1 = {depth - 1} (official: 9 of 12 for "
                             f"base, 21 of 24 for large); got {early_layers}")
        if head_layers < 1:
            raise ValueError(f"head_layers must be at least 1 (official: 2); got {head_layers}")
        kwargs = {**(arch or {}), **PRETRAIN_BACKBONE_DEFAULTS, **backbone_kwargs}
        drop_path_rate = float(kwargs.get("drop_path_rate") or 0.0)
        dpr = torch.linspace(0, drop_path_rate, max(depth, early_layers + head_layers), device="cpu").tolist()
        first = self.backbone.blocks[0]
        dim = self.backbone.embed_dim
        norm = first.norm1
        norm_layer = partial(type(norm), eps=norm.eps)
        self.early_layers, self.head_layers, self.shared_lm_head = early_layers, head_layers, shared_lm_head
        self._head_init_values = kwargs.get("init_values")
        self.cls_pt_layers = nn.ModuleList([
            Block(
                dim, num_heads=first.attn.num_heads, qkv_bias=first.attn.q_bias is not None,
                mlp_ratio=first.mlp.fc1.out_features / dim, drop_path=dpr[i], init_values=self._head_init_values,
                norm_layer=norm_layer, attn_head_dim=first.attn.qkv.out_features // 3 // first.attn.num_heads,
            )
            for i in range(early_layers, early_layers + head_layers)
        ])
        set_attention(self.cls_pt_layers, getattr(self, "attention", "sdpa"))  # the backbone's attention kernel
        if not shared_lm_head:
            self.cls_pt_norm = norm_layer(dim)
            self.cls_pt_lm_head = nn.Linear(dim, vocab_size)
        self.reset_head_parameters()

    def reset_head_parameters(self) -> None:
        """The official initialisation of the patch-aggregation head (see the module docstring)."""
        with torch.no_grad():
            for module in self.cls_pt_layers.modules():
                if module is not self.cls_pt_layers and hasattr(module, "reset_parameters"):
                    module.reset_parameters()
            for i, block in enumerate(self.cls_pt_layers):
                scale = math.sqrt(2.0 * (self.early_layers + i + 1))
                block.attn.proj.weight.div_(scale)
                block.mlp.fc2.weight.div_(scale)
            if not self.shared_lm_head:
                self.cls_pt_norm.reset_parameters()
                trunc_normal_std_(self.cls_pt_lm_head.weight, self.init_std)
                self.cls_pt_lm_head.bias.zero_()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "cls_pt_layers"):  # the base class calls this before the head exists
            self.reset_head_parameters()

    def forward_features_v2(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens, aggregated)``, both ``B x (1 + N) x D`` after their final norm: the backbone's
        output and the patch-aggregation head's (last-layer cls token + early-layer patches)."""
        x, early, rel_pos_bias = self._forward_beit_blocks(pixel_values, bool_masked_pos, keep_layer=self.early_layers)
        y = torch.cat((x[:, :1], early[:, 1:]), dim=1)
        for block in self.cls_pt_layers:
            y = self._beit_block(block, y, rel_pos_bias)
        norm = self.backbone.norm
        return norm(x), (norm(y) if self.shared_lm_head else self.cls_pt_norm(y))

    def forward_with_aggregation(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor,
        num_masked: int | None = None,
        positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, aggregation_logits)`` at the masked patches (or at ``positions``), batch-major,
        each ``num x vocab_size``: the backbone's prediction and the patch-aggregation head's
        (the official ``forward`` returns this pair). ``num_masked``: every mask has this many."""
        tokens, aggregated = self.forward_features_v2(pixel_values, bool_masked_pos)
        tokens, aggregated = tokens[:, 1:], aggregated[:, 1:]
        if positions is None and num_masked is not None:
            tokens = gather_masked(tokens, bool_masked_pos, num_masked)
            aggregated = gather_masked(aggregated, bool_masked_pos, num_masked)
        else:
            rows = (bool_masked_pos if positions is None else positions).flatten(1)
            tokens, aggregated = tokens[rows], aggregated[rows]
        return self.lm_head(tokens), (self.lm_head if self.shared_lm_head else self.cls_pt_lm_head)(aggregated)
