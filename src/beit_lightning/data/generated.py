"""A small, deterministic, labelled image data set drawn on the fly, so that every command runs
with no download.

Each class is a kind of structure (disc, square, triangle, ring, cross, stripes in three
orientations, checkerboard, dots) drawn in random colours, positions and sizes on a gradient
background with mild noise. Image ``i`` depends only on ``(seed, i)``, so workers and ranks see
the same data set.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

CLASS_NAMES = (
    "disc", "square", "triangle", "ring", "cross",
    "horizontal_stripes", "vertical_stripes", "diagonal_stripes", "checkerboard", "dots",
)


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, size=3))


def draw_shape_image(label: int, size: int, rng: np.random.Generator) -> Image.Image:
    """One image of class ``label`` (see :data:`CLASS_NAMES`) at ``size`` x ``size`` pixels."""
    bg0, bg1, fg = np.array(_colour(rng)), np.array(_colour(rng)), _colour(rng)
    while np.abs(np.array(fg) - (bg0 + bg1) / 2).sum() < 150:  # keep the structure visible
        fg = _colour(rng)
    ramp = np.linspace(0.0, 1.0, size)[:, None, None]
    if rng.random() < 0.5:
        ramp = ramp.transpose(1, 0, 2)
    background = bg0 * (1 - ramp) + bg1 * ramp
    img = Image.fromarray(np.broadcast_to(background, (size, size, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    r = rng.uniform(0.18, 0.4) * size
    cx, cy = rng.uniform(r, size - r, size=2)
    box = [cx - r, cy - r, cx + r, cy + r]
    period = max(3, int(rng.uniform(0.08, 0.2) * size))
    width = max(1, period // 2)
    name = CLASS_NAMES[label]
    if name == "disc":
        draw.ellipse(box, fill=fg)
    elif name == "square":
        draw.rectangle(box, fill=fg)
    elif name == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    elif name == "ring":
        draw.ellipse(box, outline=fg, width=max(2, int(r / 3)))
    elif name == "cross":
        t = max(2, int(r / 3))
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fg)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fg)
    elif name == "horizontal_stripes":
        for y in range(int(rng.integers(0, period)), size, period):
            draw.rectangle([0, y, size, y + width - 1], fill=fg)
    elif name == "vertical_stripes":
        for x in range(int(rng.integers(0, period)), size, period):
            draw.rectangle([x, 0, x + width - 1, size], fill=fg)
    elif name == "diagonal_stripes":
        for d in range(-size, 2 * size, period):
            draw.line([(d, 0), (d + size, size)], fill=fg, width=width)
    elif name == "checkerboard":
        for y in range(0, size, period):
            for x in range((y // period) % 2 * period, size, 2 * period):
                draw.rectangle([x, y, x + period - 1, y + period - 1], fill=fg)
    elif name == "dots":
        for _ in range(int(rng.integers(3, 7))):
            dx, dy = rng.uniform(0, size, size=2)
            dr = rng.uniform(0.05, 0.1) * size
            draw.ellipse([dx - dr, dy - dr, dx + dr, dy + dr], fill=fg)
    array = np.asarray(img, dtype=np.int16) + rng.integers(-8, 9, size=(size, size, 3))
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))


class GeneratedImages(Dataset):
    """``num_samples`` images of :data:`CLASS_NAMES` (balanced), deterministic in ``(seed, index)``.

    Returns ``(PIL image, label)``; ``transform`` is applied to the image when given.
    """

    def __init__(self, num_samples: int, image_size: int = 64, num_classes: int = 10, seed: int = 0, transform=None):
        if not 1 <= num_classes <= len(CLASS_NAMES):
            raise ValueError(f"num_classes must be in [1, {len(CLASS_NAMES)}]; got {num_classes}")
        if num_samples < 1 or image_size < 8:
            raise ValueError(f"need num_samples >= 1 and image_size >= 8; got {num_samples}, {image_size}")
        self.num_samples, self.image_size = num_samples, image_size
        self.num_classes, self.seed, self.transform = num_classes, seed, transform
        self.classes = list(CLASS_NAMES[:num_classes])

    def __len__(self) -> int:
        return self.num_samples

    def label(self, index: int) -> int:
        return index % self.num_classes

    def image(self, index: int) -> Image.Image:
        rng = np.random.default_rng([self.seed, index])
        return draw_shape_image(self.label(index), self.image_size, rng)

    def __getitem__(self, index: int):
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        img = self.image(index)
        return (self.transform(img) if self.transform is not None else img), self.label(index)
