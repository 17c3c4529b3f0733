"""The semantic-segmentation transforms of BEiT's ADE20K recipe (mmseg 0.11's pipeline).

Training (``SegmentationTrainTransform``), in mmseg's order and with its random draws:

1. ``reduce_zero_label`` (ADE20K): label 0 ("other objects") becomes 255 (ignored), every other
   value ``v`` becomes ``v - 1``; 255 stays 255.
2. Resize keeping the aspect ratio: a ratio ``r`` drawn uniformly from ``ratio_range`` gives the
   target scale ``(int(long * r), int(short * r))`` of ``img_scale``, and the image is rescaled as
   large as it fits in it (long side <= target long, short side <= target short; mmcv's
   ``imrescale``). The image is interpolated bilinearly (as OpenCV's ``INTER_LINEAR``: no
   antialiasing), the label map with nearest neighbours (as ``INTER_NEAREST``): no label value
   is ever interpolated.
3. Random crop of ``crop_size``: up to 10 more crops are drawn while the crop's label map holds one
   class only, or one class covers ``cat_max_ratio`` or more of its labelled pixels (255 not
   counted).
4. Horizontal flip of image and label with probability ``hflip``.
5. Photometric distortion (:class:`PhotoMetricDistortion`).
6. Normalisation with ``mean``/``std`` (in [0, 1] units; BEiT's ADE20K config uses ImageNet's).
7. Padding to ``crop_size`` at the bottom and right: image 0 (after normalisation), label 255.

Evaluation (``SegmentationEvalTransform``): the image is rescaled to fit ``img_scale`` (ADE20K:
short side 512 unless the long side would pass 2048) and normalised; the label map keeps its
original size, since metrics are computed at the original resolution after the model's logits
are resized back.

Random draws come from NumPy's global generator, as in mmseg; the data modules seed it per
sample (see :mod:`.streaming`), so augmentation is reproducible sample by sample.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .transforms import IMAGENET_MEAN, IMAGENET_STD

IGNORE_INDEX = 255

__all__ = [
    "IGNORE_INDEX",
    "PhotoMetricDistortion",
    "SegmentationEvalTransform",
    "SegmentationTrainTransform",
    "reduce_zero_label",
    "rescale_size",
]


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """ADE20K's label convention: 0 -> 255 (ignored), ``v`` -> ``v - 1``, 255 stays 255."""
    label = np.asarray(label)
    out = label.astype(np.int64) - 1
    out[(label == 0) | (label == IGNORE_INDEX)] = IGNORE_INDEX
    return out.astype(label.dtype if label.dtype == np.uint8 else np.int64)


def rescale_size(width: int, height: int, scale: Sequence[int]) -> tuple[int, int]:
    """``(width, height)`` rescaled as large as it fits in ``scale`` = (long, short) edges, keeping the
    aspect ratio (mmcv's ``rescale_size``: long side <= max(scale), short side <= min(scale))."""
    factor = min(max(scale) / max(width, height), min(scale) / min(width, height))
    return int(width * factor + 0.5), int(height * factor + 0.5)


def resize_image(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear resize of an ``H x W x 3`` uint8 image (half-pixel centres, no antialiasing, like
    OpenCV's ``INTER_LINEAR``), rounded back to uint8."""
    if img.shape[:2] == (height, width):
        return img
    x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None]  # uint8 in, uint8 out (rounded)
    x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=False)
    return x[0].permute(1, 2, 0).contiguous().numpy()


def resize_label(label: np.ndarray, width: int, height: int) -> np.ndarray:
    """Nearest-neighbour resize of an ``H x W`` label map (OpenCV's ``INTER_NEAREST``: source index
    ``floor(dst * src / dst_size)``): every output value is one of the input's."""
    h, w = label.shape
    if (h, w) == (height, width):
        return label
    ys = np.minimum((np.arange(height) * (h / height)).astype(np.int64), h - 1)
    xs = np.minimum((np.arange(width) * (w / width)).astype(np.int64), w - 1)
    return label[ys[:, None], xs[None, :]]


# --- HSV in OpenCV's 8-bit convention (H in 0..179, 2 degrees per unit; S and V in 0..255) ---------
def rgb_to_hsv(img: np.ndarray) -> np.ndarray:
    """uint8 RGB -> uint8 HSV as OpenCV's ``COLOR_RGB2HSV`` (up to its rounding tables, +-1)."""
    r, g, b = (img[..., c].astype(np.float32) for c in range(3))
    v = np.maximum(np.maximum(r, g), b)
    diff = v - np.minimum(np.minimum(r, g), b)
    s = np.where(v > 0, 255.0 * diff / np.maximum(v, 1), 0.0)
    safe = np.maximum(diff, 1)
    h = np.where(v == r, (g - b) / safe, np.where(v == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe)) * 30.0
    h = np.where(diff > 0, h, 0.0)
    h = np.rint(np.where(h < 0, h + 180.0, h)) % 180
    return np.stack([h, np.rint(s), v], -1).astype(np.uint8)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """uint8 HSV (OpenCV's 8-bit convention) -> uint8 RGB, as OpenCV's ``COLOR_HSV2RGB``."""
    h = hsv[..., 0].astype(np.float32) / 30.0  # sector 0..6
    s = hsv[..., 1].astype(np.float32) / 255.0
    v = hsv[..., 2].astype(np.float32)
    sector = np.floor(h).astype(np.int64) % 6
    f = h - np.floor(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = np.empty(hsv.shape, np.float32)
    for channel in range(3):
        out[..., channel] = np.choose(sector, [c[channel] for c in choices])
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


class PhotoMetricDistortion:
    """mmseg's ``PhotoMetricDistortion`` on an RGB uint8 image, with its defaults and random draws:
    random brightness (delta 32), then contrast (0.5-1.5) either before or after the HSV steps (mode
    drawn at random), saturation (0.5-1.5) and hue (delta 18, in OpenCV's 0-180 units); each applied
    with probability 0.5, every step clipped and truncated to uint8 as mmseg does.

    mmseg converts BGR to HSV with OpenCV; here the HSV round trip is done in NumPy in OpenCV's
    8-bit convention on RGB (the same HSV values, up to OpenCV's +-1 rounding), so no OpenCV is needed.
    """

    def __init__(self, brightness_delta: float = 32, contrast_range: Sequence[float] = (0.5, 1.5),
                 saturation_range: Sequence[float] = (0.5, 1.5), hue_delta: int = 18) -> None:
        self.brightness_delta = brightness_delta
        self.contrast_range, self.saturation_range = tuple(contrast_range), tuple(saturation_range)
        self.hue_delta = int(hue_delta)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(brightness_delta={self.brightness_delta}, contrast_range={self.contrast_range}, "
                f"saturation_range={self.saturation_range}, hue_delta={self.hue_delta})")

    @staticmethod
    def _convert(img: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def _contrast(self, img: np.ndarray) -> np.ndarray:
        if np.random.randint(2):
            return self._convert(img, alpha=np.random.uniform(*self.contrast_range))
        return img

    def __call__(self, img: np.ndarray) -> np.ndarray:
        if np.random.randint(2):
            img = self._convert(img, beta=np.random.uniform(-self.brightness_delta, self.brightness_delta))
        contrast_first = np.random.randint(2) == 1
        if contrast_first:
            img = self._contrast(img)
        if np.random.randint(2):
            hsv = rgb_to_hsv(img)
            hsv[..., 1] = self._convert(hsv[..., 1], alpha=np.random.uniform(*self.saturation_range))
            img = hsv_to_rgb(hsv)
        if np.random.randint(2):
            hsv = rgb_to_hsv(img)
            hsv[..., 0] = (hsv[..., 0].astype(np.int64) + np.random.randint(-self.hue_delta, self.hue_delta)) % 180
            img = hsv_to_rgb(hsv)
        if not contrast_first:
            img = self._contrast(img)
        return img


def _as_arrays(img: Image.Image | np.ndarray, label: Image.Image | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(img, Image.Image):
        img = np.array(img.convert("RGB"))
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"a label map must have one channel (H x W); got shape {label.shape}")
    if img.shape[:2] != label.shape:
        raise ValueError(f"image {img.shape[1]}x{img.shape[0]} and label map {label.shape[1]}x{label.shape[0]} differ in size")
    if label.dtype != np.uint8:
        label = label.astype(np.int64)
    return img, label


class _Normalise:
    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        # in 0-255 units, as mmseg's Normalize
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(3, 1, 1) * 255
        self.std = torch.tensor(list(std), dtype=torch.float32).view(3, 1, 1) * 255

    def __call__(self, img: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float()
        return x.sub_(self.mean).div_(self.std)


class SegmentationTrainTransform:
    """``(image, label map)`` -> ``{"image": 3 x crop x crop float, "label": crop x crop long}``; see
    the module docstring for the steps.

    Args:
        crop_size: side of the square crop (ADE20K: 512); an int or ``(height, width)``.
        img_scale: ``(long, short)`` edges of the resize target before the random ratio (ADE20K:
            (2048, 512)); ``None``: ``(4 * crop, crop)``.
        ratio_range: range of the random ratio applied to ``img_scale`` (0.5, 2.0).
        cat_max_ratio: largest share of one class in an accepted crop (0.75); 1 disables the check.
        hflip: probability of a horizontal flip.
        photometric: apply :class:`PhotoMetricDistortion`.
        mean, std: normalisation in [0, 1] units.
        reduce_zero_label: apply :func:`reduce_zero_label` first (ADE20K).
    """

    MAX_CROP_TRIES = 10

    def __init__(
        self,
        crop_size: int | Sequence[int] = 512,
        img_scale: Sequence[int] | None = (2048, 512),
        ratio_range: Sequence[float] | None = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        hflip: float = 0.5,
        photometric: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        reduce_zero_label: bool = True,
    ) -> None:
        self.crop_size = (int(crop_size), int(crop_size)) if isinstance(crop_size, int) else tuple(int(c) for c in crop_size)
        self.img_scale = tuple(img_scale) if img_scale is not None else (4 * max(self.crop_size), min(self.crop_size))
        self.ratio_range = tuple(ratio_range) if ratio_range is not None else None
        if self.ratio_range is not None and not 0 < self.ratio_range[0] <= self.ratio_range[1]:
            raise ValueError(f"ratio_range must be (min, max) with 0 < min <= max; got {ratio_range}")
        self.cat_max_ratio, self.hflip = float(cat_max_ratio), float(hflip)
        self.photometric = PhotoMetricDistortion() if photometric else None
        self.normalise = _Normalise(mean, std)
        self.reduce_zero_label = reduce_zero_label

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(crop_size={self.crop_size}, img_scale={self.img_scale}, ratio_range={self.ratio_range}, "
                f"cat_max_ratio={self.cat_max_ratio}, hflip={self.hflip}, photometric={self.photometric}, "
                f"reduce_zero_label={self.reduce_zero_label})")

    def random_scale(self) -> tuple[int, int]:
        """The (long, short) target of this sample's resize."""
        if self.ratio_range is None:
            return self.img_scale
        ratio = np.random.random_sample() * (self.ratio_range[1] - self.ratio_range[0]) + self.ratio_range[0]
        return int(self.img_scale[0] * ratio), int(self.img_scale[1] * ratio)

    def _crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        top = np.random.randint(0, max(height - self.crop_size[0], 0) + 1)
        left = np.random.randint(0, max(width - self.crop_size[1], 0) + 1)
        return top, top + self.crop_size[0], left, left + self.crop_size[1]

    def crop_box(self, label: np.ndarray) -> tuple[int, int, int, int]:
        """``(top, bottom, left, right)`` of the random crop, redrawn (up to 10 times) while one
        class covers ``cat_max_ratio`` or more of the crop's labelled pixels, or it has one class only."""
        box = self._crop_box(*label.shape)
        if self.cat_max_ratio < 1.0:
            for _ in range(self.MAX_CROP_TRIES):
                counts = np.bincount(label[box[0]:box[1], box[2]:box[3]].ravel())
                counts = counts[np.arange(len(counts)) != IGNORE_INDEX]
                counts = counts[counts > 0]
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                box = self._crop_box(*label.shape)
        return box

    def __call__(self, img: Image.Image | np.ndarray, label: Image.Image | np.ndarray) -> dict[str, torch.Tensor]:
        img, label = _as_arrays(img, label)
        if self.reduce_zero_label:
            label = reduce_zero_label(label)
        width, height = rescale_size(img.shape[1], img.shape[0], self.random_scale())
        img, label = resize_image(img, width, height), resize_label(label, width, height)
        top, bottom, left, right = self.crop_box(label)
        img, label = img[top:bottom, left:right], label[top:bottom, left:right]
        if np.random.rand() < self.hflip:
            img, label = img[:, ::-1], label[:, ::-1]
        if self.photometric is not None:
            img = self.photometric(img)
        # pad at the bottom and right: image 0 (after normalisation), label IGNORE_INDEX
        h, w = label.shape
        image = torch.zeros(3, *self.crop_size)
        image[:, :h, :w] = self.normalise(img)
        padded = torch.full(self.crop_size, IGNORE_INDEX, dtype=torch.long)
        padded[:h, :w] = torch.from_numpy(np.ascontiguousarray(label))
        return {"image": image, "label": padded}


class SegmentationEvalTransform:
    """``(image, label map)`` -> ``{"image": 3 x H' x W' float, "label": H x W long}``: the image
    rescaled to fit ``img_scale`` (keeping its aspect ratio, bilinear) and normalised; the label map
    at its original size (reduced when ``reduce_zero_label``). Sizes differ between images: batch 1.
    """

    def __init__(
        self,
        img_scale: Sequence[int] = (2048, 512),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        reduce_zero_label: bool = True,
    ) -> None:
        self.img_scale = tuple(img_scale)
        self.normalise = _Normalise(mean, std)
        self.reduce_zero_label = reduce_zero_label

    def __repr__(self) -> str:
        return f"{type(self).__name__}(img_scale={self.img_scale}, reduce_zero_label={self.reduce_zero_label})"

    def __call__(self, img: Image.Image | np.ndarray, label: Image.Image | np.ndarray) -> dict[str, torch.Tensor]:
        img, label = _as_arrays(img, label)
        if self.reduce_zero_label:
            label = reduce_zero_label(label)
        width, height = rescale_size(img.shape[1], img.shape[0], self.img_scale)
        image = self.normalise(resize_image(img, width, height))
        return {"image": image, "label": torch.from_numpy(np.ascontiguousarray(label)).long()}
