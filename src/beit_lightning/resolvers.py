"""OmegaConf resolvers the shipped configs use (registered when ``beit_lightning`` is imported, so
before Hydra composes anything): values that follow the model's patch grid, so that one experiment
fits models of any patch size, e.g. ``experiment=smoke`` for ``model=beit_micro`` (8 px patches at
64 px: an 8x8 grid) and for ``model=xcit_nano`` (16 px patches: 4x4).

* ``${bl.patch_grid:IMG,PATCH}``: ``IMG // PATCH``, the side of the patch grid;
* ``${bl.mul:A,B}``: ``A * B`` (e.g. the tokenizer's view: grid x 8 px per DALL-E code);
* ``${bl.masked_patches:IMG,PATCH,RATIO}``: ``round(RATIO * grid ** 2)``, at least 1 (BEiT masks 0.4:
  75 of 196 at 14x14, 26 of 64 at 8x8, 6 of 16 at 4x4).
"""

from __future__ import annotations

from omegaconf import OmegaConf

__all__ = ["register_resolvers"]


def _patch_grid(img_size: int, patch_size: int) -> int:
    if int(img_size) % int(patch_size):
        raise ValueError(f"image size {img_size} is not a multiple of the patch size {patch_size}")
    return int(img_size) // int(patch_size)


def _masked_patches(img_size: int, patch_size: int, ratio: float) -> int:
    grid = _patch_grid(img_size, patch_size)
    return max(1, round(float(ratio) * grid * grid))


def register_resolvers() -> None:
    """Register the ``bl.*`` resolvers (idempotent)."""
    for name, fn in (("bl.patch_grid", _patch_grid), ("bl.mul", lambda a, b: a * b),
                     ("bl.masked_patches", _masked_patches)):
        OmegaConf.register_new_resolver(name, fn, replace=True)


register_resolvers()
