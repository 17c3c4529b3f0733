"""Classification networks for fine-tuning and linear probing, built from any timm model name.

The arguments that only one architecture family understands (BEiT's relative position bias and
layer scale, say) live in the model config (``model.arch`` in ``conf/model/*.yaml``), not in the
task configs, so that one task config serves BEiT, ViT, DeiT (distilled too) and XCiT (README: "Backbones").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import timm
from torch import nn

__all__ = ["create_classifier"]


def create_classifier(
    model_name: str,
    num_classes: int,
    img_size: int | None = None,
    drop_path_rate: float = 0.0,
    arch: Mapping[str, Any] | None = None,
) -> nn.Module:
    """``timm.create_model(model_name, num_classes=..., img_size=..., drop_path_rate=..., **arch)``
    with random weights (load pre-trained ones with ``init_checkpoint`` / ``load_checkpoint``).

    Args:
        model_name: a timm model name (``beit_base_patch16_224``, ``deit_base_patch16_224``, ...).
        num_classes: classes of the head (0: no head, features only).
        img_size: input side; ``None`` keeps the model's default.
        drop_path_rate: stochastic depth.
        arch: architecture-specific timm arguments of this family (e.g. for BEiT
            ``use_rel_pos_bias``, ``use_abs_pos_emb``, ``init_values``; for XCiT ``eta``; sizes such
            as ``depth`` for the micro test models).
    """
    kwargs: dict[str, Any] = dict(arch or {})
    if img_size is not None:
        kwargs["img_size"] = img_size
    try:
        return timm.create_model(model_name, pretrained=False, num_classes=num_classes, drop_path_rate=drop_path_rate, **kwargs)
    except TypeError as err:
        raise TypeError(
            f"timm cannot build {model_name!r} with {sorted(kwargs)}: {err}. Architecture-specific arguments belong "
            "in the model config's `arch` (e.g. model=deit_base has none of BEiT's)"
        ) from err
