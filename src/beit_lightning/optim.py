"""The optimisation recipe shared by all tasks: AdamW parameter groups and per-step schedules.

* No weight decay for biases, normalisation weights, and the parameters a model lists in
  ``no_weight_decay()`` (cls/mask tokens, position embeddings, relative position tables).
* Optional layer-wise learning-rate decay (fine-tuning): parameter group scales follow timm's
  ``group_matcher`` layer ids.
* A per-step schedule: linear warmup from 0 to the peak value, then half-cosine to a floor.
  The same function drives the learning rate and BEiT's optional weight-decay schedule.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["cosine_schedule", "param_groups", "warmup_cosine_lambda"]


def _no_weight_decay_names(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for module_name, module in model.named_modules():
        fn = getattr(module, "no_weight_decay", None)
        if callable(fn):
            prefix = f"{module_name}." if module_name else ""
            names |= {f"{prefix}{n}" for n in fn()}
    return names


def param_groups(
    model: nn.Module,
    weight_decay: float,
    skip_names: Iterable[str] = (),
) -> list[dict]:
    """Two AdamW groups: with ``weight_decay`` and without (1-d tensors, biases, listed tokens).

    Each group carries ``lr_scale`` (1.0 here) so that schedules can multiply it in.
    """
    skip = _no_weight_decay_names(model) | set(skip_names)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or name in skip:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0, "name": "no_decay"},
    ]
    return [g for g in groups if g["params"]]


def cosine_schedule(step: int, total_steps: int, warmup_steps: int, peak: float, final: float) -> float:
    """Value at ``step``: linear warmup 0 -> ``peak`` over ``warmup_steps``, then cosine to ``final``."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return final + 0.5 * (peak - final) * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_lambda(total_steps: int, warmup_steps: int, min_lr_ratio: float):
    """A ``LambdaLR`` multiplier (relative to the peak lr) for :func:`cosine_schedule`."""

    def fn(step: int) -> float:
        return cosine_schedule(step, total_steps, warmup_steps, 1.0, min_lr_ratio)

    return fn


def build_adamw(
    groups: list[dict], lr: float, betas: tuple[float, float], eps: float = 1e-8, fused: bool = True
) -> torch.optim.AdamW:
    """AdamW over ``groups``, fused when allowed and every parameter is a CPU or CUDA tensor.

    The fused kernel is about 10x faster than the per-tensor loop on CPU for BEiT-B (0.04 s vs
    0.44 s per step on 2 cores) and faster on CUDA; where it is not supported (other devices,
    sharded tensor types) the default implementation is used. Pass ``fused=False`` under
    Lightning's mixed precision: Lightning refuses gradient clipping with an optimizer that
    unscales gradients itself, which fused AdamW does.
    """
    params = [p for g in groups for p in g["params"]]
    if fused and params and all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params):
        try:
            return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=True)
        except (RuntimeError, TypeError, ValueError):
            pass
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)
