"""Attention kernels for BEiT's relative position bias.

timm's ``Beit`` attention adds the relative position bias (``heads x N x N``, trainable) as a float
``attn_mask`` of ``F.scaled_dot_product_attention``. On CUDA a float mask rules out the flash kernel,
and PyTorch's default choice among the remaining ones is not always the fastest for BEiT's shape
(197 tokens, head dim 64). :func:`set_attention` switches the attention modules of a timm ``Beit``
between three implementations of the same function:

* ``"sdpa"``: timm's own path, unchanged (the default).
* ``"sdpa_efficient"``: the same call inside ``torch.nn.attention.sdpa_kernel`` restricted to the
  memory-efficient kernel (first) and cuDNN, both of which take an additive bias and return its
  gradient. Only on CUDA: on a CPU neither kernel exists, so the call runs on torch's default CPU
  choice (identical to ``"sdpa"``).
* ``"flex"``: ``torch.nn.attention.flex_attention`` with the bias added by a ``score_mod``
  (``score + bias[h, q, kv]``), compiled on CUDA (inlined when the whole model is compiled). On a CPU,
  FlexAttention runs its eager reference, which in torch 2.14 refuses a backward pass; when gradients
  are needed there, the same ``score_mod`` is applied to the materialised score matrix instead
  (:func:`dense_score_mod_attention`, slower than ``"sdpa"``: for tests, not for CPU training).

The modules keep their class's parameters and buffers (only the class is swapped for a subclass
that overrides ``forward``), so state dicts, checkpoints and ``export_timm`` are unaffected.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.models.beit import Attention as TimmBeitAttention
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import flex_attention

__all__ = ["ATTENTION_IMPLEMENTATIONS", "BeitBiasAttention", "check_attention", "dense_score_mod_attention",
           "set_attention"]

#: values of ``BeitForMaskedImageModeling(attention=...)`` / ``model.attention``
ATTENTION_IMPLEMENTATIONS = ("sdpa", "sdpa_efficient", "flex")

ScoreMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def check_attention(attention: str, family: str = "beit") -> None:
    """Fail early, with the fix, for an unknown implementation or one the model family cannot use."""
    if attention not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention must be one of {ATTENTION_IMPLEMENTATIONS}; got {attention!r}")
    if attention != "sdpa" and family != "beit":
        raise ValueError(
            f"attention={attention!r} replaces the attention of BEiT backbones (the relative position bias); a "
            f"{family} backbone has no such bias and keeps timm's own attention: set model.attention=sdpa"
        )


def set_attention(backbone: nn.Module, attention: str) -> int:
    """Switch every BEiT attention module of ``backbone`` (a timm ``Beit``) to ``attention``; returns
    how many modules were switched. ``"sdpa"`` restores timm's class. Raises if ``attention`` is not
    ``"sdpa"`` and ``backbone`` has no BEiT attention module, or for ``"flex"`` with attention dropout
    (FlexAttention has none)."""
    check_attention(attention)
    modules = [m for m in backbone.modules() if isinstance(m, TimmBeitAttention)]
    if attention == "sdpa":
        for module in modules:
            module.__class__ = TimmBeitAttention
        return len(modules)
    if not modules:
        raise ValueError(f"attention={attention!r} needs a timm Beit backbone (timm.models.beit.Attention modules); "
                         f"{type(backbone).__name__} has none: use attention='sdpa'")
    if attention == "flex" and any(m.attn_drop.p > 0 for m in modules):
        raise ValueError("attention='flex' has no attention dropout: set attn_drop_rate=0 or use attention='sdpa_efficient'")
    for module in modules:
        module.__class__ = BeitBiasAttention
        module.attn_impl = attention
    return len(modules)


class BeitBiasAttention(TimmBeitAttention):
    """timm's BEiT attention with the bias-aware kernels of :func:`set_attention` (same parameters,
    buffers and state dict keys; build it by switching a timm module with :func:`set_attention`)."""

    attn_impl: str = "sdpa_efficient"

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        batch, tokens, _ = x.shape
        if self.q_bias is None:
            qkv = self.qkv(x)
        else:
            qkv_bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
            if self.qkv_bias_separate:
                qkv = self.qkv(x) + qkv_bias
            else:
                qkv = F.linear(x, weight=self.qkv.weight, bias=qkv_bias)
        q, k, v = qkv.reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self._position_bias(shared_rel_pos_bias, tokens)
        if self.attn_impl == "flex":
            x = flex_bias_attention(q, k, v, bias)
        else:
            x = efficient_bias_attention(q, k, v, bias, self.attn_drop.p if self.training else 0.0)
        x = x.transpose(1, 2).reshape(batch, tokens, -1)
        return self.proj_drop(self.proj(x))

    def _position_bias(self, shared: torch.Tensor | None, tokens: int) -> torch.Tensor | None:
        """The block's own relative position bias plus the shared one, ``heads x N x N`` (or None)."""
        bias = self._get_rel_pos_bias() if self.relative_position_bias_table is not None else None
        if shared is not None:
            bias = shared if bias is None else bias + shared
        return None if bias is None else bias.reshape(-1, tokens, tokens)


def efficient_bias_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, dropout_p: float = 0.0
) -> torch.Tensor:
    """SDPA with ``bias`` (``heads x N x N``) added to the scores; on CUDA only the memory-efficient
    kernel (preferred) or cuDNN may run it, so an unsupported case fails instead of silently falling
    back to the math kernel."""
    mask = None if bias is None else bias.to(q.dtype)
    if q.device.type != "cuda":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    # torch's priority order puts the memory-efficient kernel before cuDNN (no set_priority: torch.compile
    # traces this context manager only without it)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def bias_score_mod(bias: torch.Tensor) -> ScoreMod:
    """A FlexAttention ``score_mod`` that adds ``bias[h, q_idx, kv_idx]`` to each score."""

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[h, q_idx, kv_idx]

    return score_mod


_compiled_flex: Callable | None = None


def _flex_kernel() -> Callable:
    """``flex_attention`` compiled once per process (its fused kernel; eager flex is a reference)."""
    global _compiled_flex
    if torch.compiler.is_compiling():  # inside a compiled model: traced and fused with it
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def flex_bias_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """FlexAttention with ``bias`` (``heads x N x N``) as a ``score_mod``; see the module docstring for CPU."""
    score_mod = None if bias is None else bias_score_mod(bias)
    if q.device.type == "cuda":
        return _flex_kernel()(q, k, v, score_mod=score_mod)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, bias)
    )
    if needs_grad:
        warnings.warn(
            f"attention='flex' on {q.device.type}: FlexAttention has no backward pass there in torch "
            f"{torch.__version__}, so its score_mod runs on the materialised scores (slower than attention='sdpa')",
            stacklevel=2,
        )
        return dense_score_mod_attention(q, k, v, score_mod)
    return flex_attention(q, k, v, score_mod=score_mod)


def dense_score_mod_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, score_mod: ScoreMod | None = None, scale: float | None = None
) -> torch.Tensor:
    """``softmax(score_mod(q k^T * scale)) v`` on the full score matrix, the score_mod called once with
    broadcast index tensors (batch, head, query, key): FlexAttention's semantics, differentiable anywhere."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q * scale) @ k.transpose(-2, -1)
    if score_mod is not None:
        b, h, n, m = scores.shape
        index = dict(device=scores.device)
        scores = score_mod(
            scores, torch.arange(b, **index).view(b, 1, 1, 1), torch.arange(h, **index).view(1, h, 1, 1),
            torch.arange(n, **index).view(1, 1, n, 1), torch.arange(m, **index).view(1, 1, 1, m),
        )
    return scores.softmax(dim=-1).to(v.dtype) @ v
