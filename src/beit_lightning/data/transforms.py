"""BEiT's pre-training transform: two views of one random-resized crop, plus the mask.

Following the paper and the official ``RandomResizedCropAndInterpolationWithTwoPic``: color
jitter and a horizontal flip are applied to the image, then one random-resized crop is taken and
resized twice, to ``input_size`` with bicubic interpolation for the backbone (then normalised)
and to ``tokenizer_size`` with Lanczos for the tokenizer (kept in [0, 1]). Random draws use
torch's and Python's global generators, which PyTorch/Lightning seed per worker and rank.

``fast_decode=True`` computes the same sample distribution with less work per image (see
:meth:`BeitPretrainTransform.fast_views`): the random draws are the same (same generator, same
order, crop drawn on the full-resolution size), but the pixels are computed differently:

- a JPEG handed over still undecoded (``Image.open`` without ``convert``/``load``) is decoded at
  1/2, 1/4 or 1/8 scale by libjpeg's DCT scaling (``Image.draft``) when the crop stays at least
  ``input_size`` pixels on each side at that scale; otherwise (small crops, PNG and other formats,
  images already decoded) it is decoded at full resolution;
- the crop is resized straight from the decoded image (``resize(box=...)``, no crop copy), the flip
  mirrors the crop box and the (small) views instead of the whole image;
- colour jitter is applied to the two resized views instead of the whole image before the crop,
  in float (torchvision's tensor semantics: clamp to [0, 1] after each step, no rounding to 8 bits
  in between). Brightness and saturation are per-pixel maps, so only their clipping and rounding
  differ from jitter-then-resize; contrast blends with the grey mean *of the whole image* at that
  step, as the official order does, and this mean is taken from a thumbnail of the whole image
  with the preceding steps applied to it (not the mean of the crop, which would change the
  augmentation).

``tests/test_fast_decode.py`` bounds the pixel difference against the exact path.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from .masking import BlockwiseMaskGenerator

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BEIT_MEAN = (0.5, 0.5, 0.5)
BEIT_STD = (0.5, 0.5, 0.5)

_INTERPOLATIONS = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "lanczos": InterpolationMode.LANCZOS,
    "nearest": InterpolationMode.NEAREST,
}


_PIL_RESAMPLE = {
    InterpolationMode.BICUBIC: Image.Resampling.BICUBIC,
    InterpolationMode.BILINEAR: Image.Resampling.BILINEAR,
    InterpolationMode.LANCZOS: Image.Resampling.LANCZOS,
    InterpolationMode.NEAREST: Image.Resampling.NEAREST,
}
_DRAFT_SCALES = (8, 4, 2)
_THUMBNAIL_SIDE = 64  # contrast's whole-image grey mean is taken at about this size


def _is_undecoded_jpeg(img: Image.Image) -> bool:
    """``img`` is a JPEG opened by PIL whose pixels are not decoded yet (``draft`` still works)."""
    return img.format == "JPEG" and bool(getattr(img, "tile", None)) and not getattr(img, "decoderconfig", ())


def draft_scale(image_size: tuple[int, int], crop: tuple[int, int, int, int], min_side: int) -> int:
    """The largest JPEG DCT reduction (8, 4, 2 or 1) that keeps the ``(top, left, height, width)``
    crop of an image of ``image_size`` (width, height) at least ``min_side`` pixels on each side."""
    _, _, height, width = crop
    for s in _DRAFT_SCALES:
        if min(height, width) >= s * min_side and min(image_size) >= s:
            return s
    return 1


def decode_rgb(img: Image.Image, crop: tuple[int, int, int, int] | None = None, min_side: int = 0) -> tuple[Image.Image, int]:
    """Decode ``img`` to RGB, at a reduced scale when it is an undecoded JPEG and ``crop`` allows
    it (see :func:`draft_scale`). Returns the image and the scale (1: full resolution)."""
    scale = 1
    if crop is not None and _is_undecoded_jpeg(img):
        scale = draft_scale(img.size, crop, min_side)
        if scale > 1:
            full = img.size
            img.draft("RGB", (full[0] // scale, full[1] // scale))
            if img.size != ((full[0] + scale - 1) // scale, (full[1] + scale - 1) // scale):  # pragma: no cover
                raise RuntimeError(f"JPEG draft gave {img.size} for {full} at 1/{scale}")
    if img.mode != "RGB":
        img = img.convert("RGB")
    else:
        img.load()
    return img, scale


def _to_float(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 CxHxW tensor of its 8-bit levels (0..255)."""
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).to(torch.float32)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """PIL's ``convert("L")`` of a CxHxW tensor of 8-bit levels (ITU-R 601-2 luma, rounded)."""
    return (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).add_(0.5).floor_()


def _blend(x: torch.Tensor, base: torch.Tensor | float, factor: float) -> torch.Tensor:
    """PIL's ``Image.blend(base, x, factor)`` on 8-bit levels: clipped to [0, 255], truncated."""
    return x.sub_(base).mul_(factor).add_(base).clamp_(0, 255).floor_()


def jitter_views(views: Sequence[torch.Tensor], params, whole: torch.Tensor) -> list[torch.Tensor]:
    """Apply colour jitter (``T.ColorJitter.get_params``'s draws; no hue) to CxHxW float tensors of
    8-bit levels, step by step as PIL's ``ImageEnhance`` does (each step clipped and truncated to
    an 8-bit level, so the only difference from jitter-then-resize is where clipping and
    truncation meet the resampling). Contrast pivots on the grey mean of ``whole`` (a thumbnail of
    the whole image) after the steps that precede it, rounded as ``ImageEnhance.Contrast`` does."""
    order, brightness, contrast, saturation, hue = params
    if hue is not None and hue != 0:  # pragma: no cover - BeitPretrainTransform draws no hue
        raise NotImplementedError("fast colour jitter has no hue step")
    views = list(views) + [whole.clone()]
    for fn_id in order.tolist():
        if fn_id == 0 and brightness is not None:
            views = [_blend(v, 0.0, brightness) for v in views]
        elif fn_id == 1 and contrast is not None:
            mean = float(torch.floor(_grey(views[-1]).mean() + 0.5))
            views = [_blend(v, mean, contrast) for v in views]
        elif fn_id == 2 and saturation is not None:
            views = [_blend(v, _grey(v), saturation) for v in views]
    return views[:-1]


def _interpolation(name: str) -> InterpolationMode:
    try:
        return _INTERPOLATIONS[name]
    except KeyError:
        raise ValueError(f"unknown interpolation {name!r}; choose one of {sorted(_INTERPOLATIONS)}") from None


class BeitPretrainTransform:
    """PIL image -> ``{"image", "tokenizer_image", "mask"}`` (the batch format of DESIGN.md).

    Args:
        input_size: side of the backbone view (224).
        tokenizer_size: side of the tokenizer view (112 for DALL-E on a 14x14 grid).
        mask_generator: draws the blockwise mask (or SplitMask's split: any callable returning a
            boolean patch grid); ``None`` leaves ``mask`` out.
        scale, ratio: random-resized-crop ranges (torchvision's defaults, as in BEiT).
        color_jitter: brightness/contrast/saturation strength (0.4); 0 disables.
        hflip: probability of a horizontal flip.
        mean, std: normalisation of the backbone view (BEiT's code default: 0.5/0.5).
        fast_decode: compute the views the fast way (reduced-scale JPEG decoding where the crop
            allows it, resize straight from the decoded image, colour jitter on the views; see
            the module's docstring). Same random draws and distribution; pixels differ slightly.
            Give it the image from ``Image.open`` before ``convert``/``load`` to let it decode.
    """

    def __init__(
        self,
        input_size: int = 224,
        tokenizer_size: int = 112,
        mask_generator: BlockwiseMaskGenerator | None = None,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        color_jitter: float = 0.4,
        hflip: float = 0.5,
        mean: Sequence[float] = BEIT_MEAN,
        std: Sequence[float] = BEIT_STD,
        interpolation: str = "bicubic",
        tokenizer_interpolation: str = "lanczos",
        fast_decode: bool = False,
    ) -> None:
        self.fast_decode = bool(fast_decode)
        self.input_size = int(input_size)
        self.tokenizer_size = int(tokenizer_size)
        self.mask_generator = mask_generator
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.color_jitter = T.ColorJitter(color_jitter, color_jitter, color_jitter) if color_jitter else None
        self.hflip = float(hflip)
        self.mean, self.std = list(mean), list(std)
        self.interpolation = _interpolation(interpolation)
        self.tokenizer_interpolation = _interpolation(tokenizer_interpolation)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(input_size={self.input_size}, tokenizer_size={self.tokenizer_size}, "
            f"scale={self.scale}, color_jitter={self.color_jitter is not None}, hflip={self.hflip}, "
            f"mask_generator={self.mask_generator}, fast_decode={self.fast_decode})"
        )

    def crop_params(self, img: Image.Image) -> tuple[int, int, int, int]:
        """The shared crop ``(top, left, height, width)``."""
        return T.RandomResizedCrop.get_params(img, self.scale, self.ratio)

    def two_views(self, img: Image.Image, crop: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        top, left, height, width = crop
        view = TF.resized_crop(img, top, left, height, width, [self.input_size] * 2, self.interpolation)
        token_view = TF.resized_crop(img, top, left, height, width, [self.tokenizer_size] * 2, self.tokenizer_interpolation)
        image = TF.normalize(TF.to_tensor(view), self.mean, self.std)
        return image, TF.to_tensor(token_view)

    def fast_views(self, img: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        """The two views of :meth:`__call__`'s exact path, computed the fast way (module docstring).

        The draws are those of the exact path, in its order: colour-jitter parameters, flip, crop
        on the full-resolution size."""
        jitter = self.color_jitter
        params = T.ColorJitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) if jitter else None
        flip = bool(self.hflip and torch.rand(()) < self.hflip)
        top, left, height, width = self.crop_params(img)
        full_width = img.size[0]
        if flip:  # the crop of the flipped image is the flipped crop of the mirrored box
            left = full_width - left - width
        img, scale = decode_rgb(img, (top, left, height, width), self.input_size)
        box = (left / scale, top / scale, (left + width) / scale, (top + height) / scale)
        views = [
            img.resize((size, size), _PIL_RESAMPLE[interpolation], box=box)
            for size, interpolation in ((self.input_size, self.interpolation), (self.tokenizer_size, self.tokenizer_interpolation))
        ]
        if flip:
            views = [v.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for v in views]
        tensors = [_to_float(v) for v in views]
        if params is not None:
            reduce = max(1, min(img.size) // _THUMBNAIL_SIDE)
            whole = _to_float(img.reduce(reduce) if reduce > 1 else img)
            tensors = jitter_views(tensors, params, whole)
        image, tokenizer_image = tensors
        std = torch.tensor(self.std).view(3, 1, 1)
        shift = torch.tensor(self.mean).view(3, 1, 1) / std
        return image.mul_(1 / 255 / std).sub_(shift), tokenizer_image.mul_(1 / 255)

    def __call__(self, img: Image.Image) -> dict[str, torch.Tensor]:
        if self.fast_decode:
            image, tokenizer_image = self.fast_views(img)
        else:
            img = img.convert("RGB")
            if self.color_jitter is not None:
                img = self.color_jitter(img)
            if self.hflip and torch.rand(()) < self.hflip:
                img = TF.hflip(img)
            image, tokenizer_image = self.two_views(img, self.crop_params(img))
        sample = {"image": image, "tokenizer_image": tokenizer_image}
        if self.mask_generator is not None:
            sample["mask"] = self.mask_generator()
        return sample


class TokenizerViewTransform:
    """PIL image -> ``{"tokenizer_image"}``: one random-resized crop (Lanczos) in [0, 1], for
    training a tokenizer on the same kind of view it will encode during pre-training."""

    def __init__(self, size: int = 112, scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                 hflip: float = 0.5, interpolation: str = "lanczos") -> None:
        self.size, self.scale, self.ratio, self.hflip = int(size), tuple(scale), tuple(ratio), float(hflip)
        self.interpolation = _interpolation(interpolation)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, scale={self.scale}, hflip={self.hflip})"

    def __call__(self, img: Image.Image) -> dict[str, torch.Tensor]:
        img = img.convert("RGB")
        if self.hflip and torch.rand(()) < self.hflip:
            img = TF.hflip(img)
        top, left, height, width = T.RandomResizedCrop.get_params(img, self.scale, self.ratio)
        view = TF.resized_crop(img, top, left, height, width, [self.size] * 2, self.interpolation)
        return {"tokenizer_image": TF.to_tensor(view)}


class GanImageTransform:
    """PIL image -> ``{"image"}`` for GAN training (``mode="gan"``): an optional horizontal flip,
    a resize of the whole image to ``size`` (no crop, no colour change: the generator must learn
    the data as it is), then normalised with ``mean``/``std`` (0.5/0.5 puts it in [-1, 1], the
    range GAN tasks expect). ViTGAN's CIFAR-10 uses flips only (official ``cifar10_hflip``)."""

    def __init__(self, size: int = 32, hflip: float = 0.5, mean: Sequence[float] = BEIT_MEAN,
                 std: Sequence[float] = BEIT_STD, interpolation: str = "bicubic") -> None:
        self.size, self.hflip, self.mean, self.std = int(size), float(hflip), tuple(mean), tuple(std)
        self.interpolation = _interpolation(interpolation)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, hflip={self.hflip}, mean={self.mean}, std={self.std})"

    def __call__(self, img: Image.Image) -> dict[str, torch.Tensor]:
        img = img.convert("RGB")
        if self.hflip and torch.rand(()) < self.hflip:
            img = TF.hflip(img)
        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), _PIL_RESAMPLE[self.interpolation])
        return {"image": TF.normalize(TF.to_tensor(img), self.mean, self.std)}
