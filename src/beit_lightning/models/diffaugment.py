"""Differentiable augmentation (DiffAugment; Zhao et al., "Differentiable Augmentation for
Data-Efficient GAN Training", NeurIPS 2020) for images in [-1, 1].

ViTGAN trains its discriminator on DiffAugment'ed real and generated images (Lee et al., ICLR
2022, arXiv 2107.04589, sec. 4.1 and the experiment setup; the official PyTorch reproduction,
``mlpc-ucsd/ViTGAN`` ``augment/__init__.py``: ``diffaug()`` with the policy
``"color,translation,cutout"``). Every operation is differentiable in the pixels, so the
generator's gradient flows through it. The operations follow the DiffAugment paper's:

* ``color``: brightness ``x + U(-0.5, 0.5)``, saturation ``(x - mean_c) * U(0, 2) + mean_c``,
  contrast ``(x - mean) * U(0.5, 1.5) + mean``, one draw per image;
* ``translation``: an integer shift of up to 1/8 of the side in each direction, zero filled;
* ``cutout``: a zeroed square of half the side at a random centre (clipped at the border).

``probability`` applies each operation to each image with that probability (1.0 in DiffAugment;
the official ViTGAN code uses 0.8 for colour and translation, 0.3 for cutout, and adds a flip).
Random draws use torch's global generator (seeded per rank by Lightning).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["POLICIES", "DiffAugment"]

POLICIES = ("color", "translation", "cutout")


def _uniform(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device) * (high - low) + low


def _color(x: torch.Tensor) -> torch.Tensor:
    x = x + _uniform(x, -0.5, 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * _uniform(x, 0.0, 2.0) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * _uniform(x, 0.5, 1.5) + mean


def _translation(x: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    b, c, h, w = x.shape
    sy, sx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    ty = torch.randint(-sy, sy + 1, (b, 1, 1), device=x.device)
    tx = torch.randint(-sx, sx + 1, (b, 1, 1), device=x.device)
    gy = torch.arange(h, device=x.device).view(1, h, 1) + ty
    gx = torch.arange(w, device=x.device).view(1, 1, w) + tx
    valid = ((gy >= 0) & (gy < h) & (gx >= 0) & (gx < w)).unsqueeze(1)
    index = (gy.clamp(0, h - 1) * w + gx.clamp(0, w - 1)).view(b, 1, h * w).expand(b, c, h * w)
    shifted = x.flatten(2).gather(2, index).view(b, c, h, w)
    return shifted * valid.to(x.dtype)


def _cutout(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = torch.randint(0, h + (1 - ch % 2), (b, 1, 1), device=x.device)
    cx = torch.randint(0, w + (1 - cw % 2), (b, 1, 1), device=x.device)
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    inside = (ys >= cy - ch // 2) & (ys < cy - ch // 2 + ch) & (xs >= cx - cw // 2) & (xs < cx - cw // 2 + cw)
    return x * (~inside).unsqueeze(1).to(x.dtype)


_OPS = {"color": _color, "translation": _translation, "cutout": _cutout}


class DiffAugment(nn.Module):
    """Apply the operations of ``policy`` (comma separated, from :data:`POLICIES`) in order.

    Args:
        policy: e.g. ``"color,translation,cutout"`` (DiffAugment's and ViTGAN's); ``""``: identity.
        probability: chance that each operation is applied to each image.
    """

    def __init__(self, policy: str = "color,translation,cutout", probability: float = 1.0) -> None:
        super().__init__()
        self.ops = [p.strip() for p in policy.split(",") if p.strip()]
        unknown = [p for p in self.ops if p not in _OPS]
        if unknown:
            raise ValueError(f"unknown DiffAugment operation(s) {unknown} in policy {policy!r}; choose from {POLICIES}")
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1]; got {probability}")
        self.policy, self.probability = policy, float(probability)

    def extra_repr(self) -> str:
        return f"policy={self.policy!r}, probability={self.probability}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.ops:
            augmented = _OPS[name](x)
            if self.probability >= 1.0:
                x = augmented
            else:
                keep = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < self.probability
                x = torch.where(keep, augmented, x)
        return x
