"""Fixes to timm's automatic augmentation (RandAugment, AutoAugment, AugMix) that keep the
official recipes' behaviour on every Pillow version.

timm builds these policies from ``AugmentOp`` objects, each holding an operation name
(``.name``) and the function that applies it (``.aug_fn``). :func:`patch_auto_augment` walks a
transform built by ``timm.data.create_transform`` and swaps the function of selected ops for ours,
on that transform only: timm itself is not modified.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from PIL import Image, ImageOps

POSTERIZE_OPS = ("Posterize", "PosterizeIncreasing", "PosterizeOriginal")


def posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """Keep the ``bits_to_keep`` high bits of every colour value; 0 bits gives a black image.

    A drop-in for timm's ``posterize`` op (extra keyword arguments such as ``fillcolor`` and
    ``resample`` are ignored, as timm does). For 1 to 8 bits it is exactly
    ``PIL.ImageOps.posterize``. For 0 bits (and below) it returns an image of the same mode and
    size with every colour value 0, i.e. black for RGB and L (alpha bands and palette alpha kept).

    Why: timm's ``PosterizeIncreasing`` maps the magnitude to ``4 - int(0.4 * m)`` bits, and with
    magnitude noise (BEiT's and DeiT's fine-tuning policy ``rand-m9-mstd0.5-inc1``) ``m`` is
    sometimes drawn at its cap of 10, i.e. 0 bits (about 0.15% of images). Up to Pillow 12,
    ``ImageOps.posterize(img, 0)`` masked every value with ``& 0`` and returned a black image; the
    official BEiT and DeiT runs trained with those black images. Pillow 13 raises ``ValueError:
    bits must be between or equal to 1 and 8`` instead, which would stop training. We keep the old
    result rather than clamping to 1 bit, so that the augmentation distribution is the one the
    published numbers were obtained with, whichever Pillow is installed.

    It is a module-level function, so transforms holding it pickle into data-loader workers.
    """
    bits = int(bits_to_keep)
    if bits >= 8:
        return img
    if bits >= 1:
        return ImageOps.posterize(img, bits)
    return _black(img)


def _black(img: Image.Image) -> Image.Image:
    """Every colour value of ``img`` set to 0 (what a lookup table of ``v & 0`` gives)."""
    if img.mode == "P":
        out = img.copy()
        palette_mode = out.palette.mode if out.palette is not None else "RGB"
        colours = out.getpalette(palette_mode) or []
        channels = len(palette_mode)
        out.putpalette([v if palette_mode[i % channels] == "A" else 0 for i, v in enumerate(colours)], palette_mode)
        return out
    bands = img.getbands()
    if "A" not in bands and "a" not in bands:
        return Image.new(img.mode, img.size, 0)
    zero = Image.new("L", img.size, 0)
    parts = [band if name in ("A", "a") else zero for name, band in zip(bands, img.split(), strict=True)]
    return Image.merge(img.mode, parts)


def _augment_ops(transform: Any, seen: set[int] | None = None) -> Iterator[Any]:
    """timm ``AugmentOp``-like objects (with ``.name`` and ``.aug_fn``) anywhere inside ``transform``:
    in ``Compose.transforms``, ``RandAugment.ops``, ``AugMixAugment.ops``, ``AutoAugment.policy``
    and the ``.transform`` of wrappers such as :class:`~beit_lightning.data.ClassificationTransform`."""
    seen = set() if seen is None else seen
    if id(transform) in seen:
        return
    seen.add(id(transform))
    if isinstance(transform, list | tuple):
        for item in transform:
            yield from _augment_ops(item, seen)
        return
    if hasattr(transform, "aug_fn") and hasattr(transform, "name"):
        yield transform
        return
    for attr in ("transforms", "ops", "policy", "transform"):
        child = getattr(transform, attr, None)
        if child is not None:
            yield from _augment_ops(child, seen)


def patch_auto_augment(transform: Any, replacements: dict[str, Callable] | None = None) -> int:
    """Replace the ``aug_fn`` of the auto-augmentation ops inside ``transform`` in place.

    Args:
        transform: e.g. the ``Compose`` that ``timm.data.create_transform`` returns.
        replacements: op name -> function; default: every posterize variant -> :func:`posterize`.

    Returns:
        How many ops were replaced.
    """
    replacements = {name: posterize for name in POSTERIZE_OPS} if replacements is None else replacements
    count = 0
    for op in _augment_ops(transform):
        fn = replacements.get(op.name)
        if fn is not None:
            op.aug_fn = fn
            count += 1
    return count
