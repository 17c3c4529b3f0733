"""A small, deterministic, labelled image data set drawn on the fly, so that every command runs
with no download.

Each class is a kind of structure (disc, square, triangle, ring, cross, stripes in three
orientations, checkerboard, dots) drawn in random colours, positions and sizes on a gradient
background with mild noise. Image ``i`` depends only on ``(seed, i)``, so workers and ranks see
the same data set.

For image retrieval, :class:`GeneratedRetrievalImages` draws the same structures in a colour of one
of six hue families: a class is a (structure, hue) pair, and training and test classes are disjoint
pairs (:func:`retrieval_split`).

For segmentation, :class:`GeneratedSegmentation` draws scenes of a few large textured regions
with their pixel label maps, in the ADE20K convention (0 = not evaluated).
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


def draw_shape_image(label: int, size: int, rng: np.random.Generator,
                     colours: tuple[np.ndarray, np.ndarray, tuple[int, int, int]] | None = None) -> Image.Image:
    """One image of class ``label`` (see :data:`CLASS_NAMES`) at ``size`` x ``size`` pixels.

    ``colours``: ``(background start, background end, foreground)``; drawn from ``rng`` when ``None``
    (the generated classification data), given by the retrieval data (:func:`draw_retrieval_image`).
    """
    if colours is None:
        bg0, bg1, fg = np.array(_colour(rng)), np.array(_colour(rng)), _colour(rng)
        while np.abs(np.array(fg) - (bg0 + bg1) / 2).sum() < 150:  # keep the structure visible
            fg = _colour(rng)
    else:
        bg0, bg1, fg = colours
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


# --- generated retrieval data ---------------------------------------------------------------------
#: hue families of the generated retrieval data: a retrieval class is a (structure, hue family) pair
RETRIEVAL_HUES = ("red", "yellow", "green", "cyan", "blue", "magenta")


def retrieval_class_name(label: int) -> str:
    """``"<hue>_<structure>"`` of a retrieval class: ``label = hue * 10 + structure`` (:data:`CLASS_NAMES`)."""
    return f"{RETRIEVAL_HUES[label // len(CLASS_NAMES)]}_{CLASS_NAMES[label % len(CLASS_NAMES)]}"


def retrieval_split(num_hues: int = len(RETRIEVAL_HUES)) -> tuple[list[int], list[int]]:
    """(training classes, test classes) of the generated retrieval data: disjoint sets of (structure,
    hue) pairs, each structure and each hue in both (structure + hue even: training), so that test
    classes are new combinations of what training saw, as SOP's test products are new products."""
    if not 2 <= num_hues <= len(RETRIEVAL_HUES):
        raise ValueError(f"num_hues must be in [2, {len(RETRIEVAL_HUES)}]; got {num_hues}")
    labels = range(num_hues * len(CLASS_NAMES))
    train = [c for c in labels if (c // len(CLASS_NAMES) + c % len(CLASS_NAMES)) % 2 == 0]
    return train, [c for c in labels if c not in set(train)]


def draw_retrieval_image(label: int, size: int, rng: np.random.Generator) -> Image.Image:
    """One image of retrieval class ``label``: structure ``label % 10`` (:func:`draw_shape_image`)
    in a foreground colour of hue family ``label // 10`` (:data:`RETRIEVAL_HUES`: hue within a sixth
    of the family's centre, saturation 0.6-1, value 0.7-1) on a random gradient background."""
    import colorsys

    family = label // len(CLASS_NAMES)
    hue = (family + rng.uniform(-0.25, 0.25)) / len(RETRIEVAL_HUES) % 1.0
    fg = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.7, 1.0)))
    bg0, bg1 = np.array(_colour(rng)), np.array(_colour(rng))
    while np.abs(np.array(fg) - (bg0 + bg1) / 2).sum() < 150:  # keep the structure visible
        bg0, bg1 = np.array(_colour(rng)), np.array(_colour(rng))
    return draw_shape_image(label % len(CLASS_NAMES), size, rng, colours=(bg0, bg1, fg))


class GeneratedRetrievalImages(Dataset):
    """``images_per_class`` images of each of ``classes`` (retrieval labels, see
    :func:`retrieval_split`), deterministic in ``(seed, index)``; returns ``(PIL image, label)``.
    Sample ``i`` is of class ``classes[i % len(classes)]``."""

    def __init__(self, classes: list[int], images_per_class: int, image_size: int = 32, seed: int = 0) -> None:
        if not classes or images_per_class < 1 or image_size < 8:
            raise ValueError(f"need classes, images_per_class >= 1 and image_size >= 8; got {classes}, "
                             f"{images_per_class}, {image_size}")
        self.class_ids, self.images_per_class, self.image_size, self.seed = list(classes), images_per_class, image_size, seed
        self.classes = [retrieval_class_name(c) for c in self.class_ids]

    def __len__(self) -> int:
        return len(self.class_ids) * self.images_per_class

    def label(self, index: int) -> int:
        return self.class_ids[index % len(self.class_ids)]

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, index])
        return draw_retrieval_image(self.label(index), self.image_size, rng), self.label(index)


# --- generated segmentation data ------------------------------------------------------------------
#: classes of the generated segmentation data, after ADE20K's label reduction (index = training label):
#: a smooth background and textures whose orientation or layout, not colour, tells them apart
SEGMENTATION_CLASS_NAMES = (
    "background", "horizontal_stripes", "vertical_stripes", "diagonal_stripes", "antidiagonal_stripes",
    "checkerboard", "dots",
)


def _texture(name: str, size: int, period: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean ``size`` x ``size`` pattern of texture ``name`` (see :data:`SEGMENTATION_CLASS_NAMES`)."""
    y, x = np.mgrid[0:size, 0:size]
    y, x = y + int(rng.integers(0, period)), x + int(rng.integers(0, period))
    half = period / 2
    if name == "horizontal_stripes":
        return (y // half) % 2 == 0
    if name == "vertical_stripes":
        return (x // half) % 2 == 0
    if name == "diagonal_stripes":
        return ((x + y) // period) % 2 == 0
    if name == "antidiagonal_stripes":
        return ((x - y + size) // period) % 2 == 0
    if name == "checkerboard":
        return ((x // half) + (y // half)) % 2 == 0
    if name == "dots":
        dy, dx = y % period - half, x % period - half
        return dy * dy + dx * dx <= (0.3 * period) ** 2
    raise ValueError(f"unknown texture {name!r}")


def _region(size: int, rng: np.random.Generator) -> np.ndarray:
    """A large random disc, ellipse, rectangle or triangle as a boolean mask."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    rx, ry = rng.uniform(0.2, 0.4, size=2) * size
    cx, cy = rng.uniform(0.15, 0.85, size=2) * size
    kind = int(rng.integers(0, 3))
    if kind == 0:
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=1)
    elif kind == 1:
        draw.rectangle([cx - rx, cy - ry, cx + rx, cy + ry], fill=1)
    else:
        draw.polygon([(cx, cy - ry), (cx - rx, cy + ry), (cx + rx, cy + ry)], fill=1)
    return np.asarray(mask, dtype=bool)


def draw_segmentation_sample(size: int, num_classes: int, rng: np.random.Generator, top: int | None = None
                             ) -> tuple[Image.Image, np.ndarray]:
    """One generated scene and its label map in the ADE20K convention (uint8).

    1 to 3 regions (disc, ellipse, rectangle or triangle, large), each filled with a different
    texture class in two random colours, on a noisy gradient background. Label values: 1 =
    background, ``1 + k`` = texture class ``k`` (1 <= k < ``num_classes``), and 0 (not evaluated, as
    ADE20K's "other") on a one-pixel band on either side of every region boundary. After
    ``reduce_zero_label`` the labels are the indices of :data:`SEGMENTATION_CLASS_NAMES`.

    Args:
        size: side of the image.
        num_classes: classes including the background (2 .. len(SEGMENTATION_CLASS_NAMES)).
        rng: the sample's generator.
        top: texture class (1-based) of the top region; random when ``None``.
    """
    bg0, bg1 = np.array(_colour(rng)), np.array(_colour(rng))
    ramp = np.linspace(0.0, 1.0, size)[:, None, None]
    if rng.random() < 0.5:
        ramp = ramp.transpose(1, 0, 2)
    image = np.broadcast_to(bg0 * (1 - ramp) + bg1 * ramp, (size, size, 3)).copy()
    label = np.ones((size, size), np.uint8)
    textures = np.arange(1, num_classes)
    count = min(int(rng.integers(1, 4)), len(textures))
    chosen = [int(k) for k in rng.choice(textures, size=count, replace=False)]
    if top is not None:  # drawn last, so it is on top and always visible
        chosen = [k for k in chosen if k != top][: count - 1] + [top]
    for k in chosen:
        mask = _region(size, rng)
        a = np.array(_colour(rng))
        b = np.array(_colour(rng))
        while np.abs(a - b).sum() < 200:  # keep the pattern visible
            b = np.array(_colour(rng))
        period = max(4, int(round(rng.uniform(0.12, 0.19) * size)))
        pattern = _texture(SEGMENTATION_CLASS_NAMES[k], size, period, rng)
        image[mask] = np.where(pattern[..., None], a, b)[mask]
        label[mask] = 1 + k
    edge = np.zeros_like(label, dtype=bool)
    edge[:, 1:] |= label[:, 1:] != label[:, :-1]
    edge[:, :-1] |= label[:, 1:] != label[:, :-1]
    edge[1:] |= label[1:] != label[:-1]
    edge[:-1] |= label[1:] != label[:-1]
    label[edge] = 0
    image = image + rng.integers(-8, 9, size=(size, size, 3))
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)), label


class GeneratedSegmentation(Dataset):
    """``num_samples`` generated scenes (:func:`draw_segmentation_sample`), deterministic in
    ``(seed, index)``; returns ``(PIL image, uint8 label map)`` in the ADE20K convention. Sample
    ``i``'s top region has texture class ``1 + i % (num_classes - 1)``, so every class occurs.
    """

    def __init__(self, num_samples: int, image_size: int = 64, num_classes: int = len(SEGMENTATION_CLASS_NAMES),
                 seed: int = 0) -> None:
        if not 2 <= num_classes <= len(SEGMENTATION_CLASS_NAMES):
            raise ValueError(f"num_classes must be in [2, {len(SEGMENTATION_CLASS_NAMES)}] (background included); got {num_classes}")
        if num_samples < 1 or image_size < 16:
            raise ValueError(f"need num_samples >= 1 and image_size >= 16; got {num_samples}, {image_size}")
        self.num_samples, self.image_size, self.num_classes, self.seed = num_samples, image_size, num_classes, seed
        self.classes = list(SEGMENTATION_CLASS_NAMES[:num_classes])

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[Image.Image, np.ndarray]:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, index])
        return draw_segmentation_sample(self.image_size, self.num_classes, rng, top=1 + index % (self.num_classes - 1))
