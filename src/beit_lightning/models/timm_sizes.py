"""BEiT sizes that timm does not ship, registered as timm models.

``beit_lightning_{micro,tiny,small}_*`` use timm's ``Beit`` with BEiT's fine-tuning block (relative
position bias per layer, layer scale). Importing ``beit_lightning`` (or this module) registers them, so
``timm.create_model("beit_lightning_micro_patch8_32")`` works; the names cannot collide with timm's own
``beit_*`` models. This module imports nothing of the package, so any module may import it.
"""

from __future__ import annotations

from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.beit import Beit, checkpoint_filter_fn

__all__ = ["TIMM_SIZES", "beit_lightning_micro_patch8_32", "beit_lightning_small_patch16_224", "beit_lightning_tiny_patch16_224"]


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


TIMM_SIZES: dict[str, dict[str, Any]] = {
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
    args.update(TIMM_SIZES[variant])
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

