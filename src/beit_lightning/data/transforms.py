"""BEiT's pre-training transform: two views of one random-resized crop, plus the mask.

Following the paper and the official ``RandomResizedCropAndInterpolationWithTwoPic``: color
jitter and a horizontal flip are applied to the image, then one random-resized crop is taken and
resized twice, to ``input_size`` with bicubic interpolation for the backbone (then normalised)
and to ``tokenizer_size`` with Lanczos for the tokenizer (kept in [0, 1]). Random draws use
torch's and Python's global generators, which PyTorch/Lightning seed per worker and rank.

``fast_decode=True`` computes the same sample distribution with less work per image (see
:meth:`BeitPretrainTransform.fast_views` and :mod:`.decode`): the random draws are the same (same
generator, same order, crop drawn on the full-resolution size), but the pixels are computed
differently:

- an image handed over still undecoded (``Image.open`` on in-memory bytes, without
  ``convert``/``load``: what the data sets do when the transform is fast) is decoded inside the
  transform: a JPEG at 1/2, 1/4 or 1/8 scale by libjpeg's DCT scaling (``Image.draft``) when the
  crop stays at least ``input_size`` pixels on each side at that scale, else at full size by
  torchvision's ``decode_jpeg``; other formats and decoded images by Pillow;
- the crop is resized straight from the decoded pixels (no crop copy) by torchvision's uint8
  antialiased kernels (bicubic/bilinear: Pillow's filters); the flip mirrors the crop box and the
  224px view instead of the whole image;
- everything after that stays in float on 8-bit levels, with no round trip through PIL
  (:meth:`BeitPretrainTransform.finish_views`): colour jitter is applied to the resized view
  instead of the whole image before the crop, with Pillow's arithmetic (:func:`jitter_views`:
  each step clipped and truncated to a level, as ``ImageEnhance`` does). Brightness and
  saturation are per-pixel maps, so only their clipping and rounding differ from
  jitter-then-resize; contrast blends with the grey mean *of the whole image* at that step, as
  the official order does, taken from a strided sample of the whole image's pixels with the
  preceding steps applied to it (not the mean of the crop, which would change the augmentation);
- the tokenizer view, when smaller than the backbone view, is resized from the jittered, flipped
  backbone view (the official order: jitter, flip, resize) by :func:`~.decode.resize_float`
  (Pillow's Lanczos weights as two banded matrix products) instead of from the crop.

``tests/test_fast_decode.py`` bounds the pixel difference against the exact path; benchmarks/RESULTS.md
states it per view.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from .decode import (
    PIL_RESAMPLE,
    ImageDecodeError,
    decode_rgb,
    decode_tensor,
    draft_scale,
    image_payload,
    is_undecoded_jpeg,
    pil_to_tensor,
    resize_float,
    resize_uint8,
)
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


THUMBNAIL_SIDE = 64  # contrast's whole-image grey mean is taken on about this many pixels a side
# ``device_augment``: what a sample's ``params`` holds (jitter order: -1 where not drawn; factors: NaN)
DEVICE_PARAMS = ("top", "left", "height", "width", "flip", "order0", "order1", "order2", "order3",
                 "brightness", "contrast", "saturation")


_LUMA = torch.tensor((0.299, 0.587, 0.114))


def grey_levels(x: torch.Tensor) -> torch.Tensor:
    """PIL's ``convert("L")`` of a (N x) C x H x W tensor of 8-bit levels (ITU-R 601-2 luma,
    rounded), with the channel dimension kept (size 1) to broadcast against ``x``."""
    luma = _LUMA.to(x.device, x.dtype)
    grey = torch.tensordot(luma, x, dims=1) if x.dim() == 3 else torch.einsum("c,nchw->nhw", luma, x)
    return grey.add_(0.5).floor_().unsqueeze(-3)


def _blend(x: torch.Tensor, base: torch.Tensor | float, factor: float) -> torch.Tensor:
    """PIL's ``Image.blend(base, x, factor)`` on 8-bit levels, in place on ``x``: ``base + factor *
    (x - base)`` in float32 as Pillow computes it, clipped to [0, 255], truncated."""
    if isinstance(base, torch.Tensor):
        return torch.add(base, x.sub_(base), alpha=factor).clamp_(0, 255).floor_()
    return x.sub_(base).mul_(factor).add_(base).clamp_(0, 255).floor_()


def jitter_views(views: Sequence[torch.Tensor], params, whole: torch.Tensor) -> list[torch.Tensor]:
    """Apply colour jitter (``T.ColorJitter.get_params``'s draws; no hue) to CxHxW float tensors of
    8-bit levels, step by step as PIL's ``ImageEnhance`` does (each step clipped and truncated to
    an 8-bit level, so the only difference from jitter-then-resize is where clipping and
    truncation meet the resampling). Contrast pivots on the grey mean of ``whole`` (a strided
    sample of the whole image's pixels) after the steps that precede it, rounded as ``ImageEnhance.Contrast`` does."""
    order, brightness, contrast, saturation, hue = params
    if hue is not None and hue != 0:  # pragma: no cover - BeitPretrainTransform draws no hue
        raise NotImplementedError("fast colour jitter has no hue step")
    steps = [i for i in order.tolist() if (brightness, contrast, saturation, None)[i] is not None]
    # the whole image's sample only serves contrast's mean: it takes the steps before contrast
    contrast_at = steps.index(1) if 1 in steps else None
    views = list(views) + ([whole.clone()] if contrast_at is not None else [])
    for n, fn_id in enumerate(steps):
        if contrast_at is not None and n == contrast_at + 1:
            views = views[:-1]
        if fn_id == 0:  # a blend with black: levels stay >= 0
            views = [v.mul_(brightness).clamp_(max=255).floor_() for v in views]
        elif fn_id == 1:
            mean = float(torch.floor(grey_levels(views[-1]).mean() + 0.5))
            views = [_blend(v, mean, contrast) for v in views]
        else:
            views = [_blend(v, grey_levels(v), saturation) for v in views]
    return views[:-1] if contrast_at is not None and contrast_at == len(steps) - 1 else views


def interpolation_mode(name: str) -> InterpolationMode:
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
        fast_decode: compute the views the fast way (torchvision's JPEG decoder, or reduced-scale
            decoding where the crop allows it; torchvision's uint8 resize; the tokenizer view from
            the backbone view; colour jitter on the views; see the module's docstring). Same random
            draws and distribution; pixels differ by about a level. Give it the image from
            ``Image.open`` on in-memory bytes before ``convert``/``load`` to let it decode.
        device_augment: return only the draws and the encoded image (``{"encoded", "params",
            "mask"}``, see :meth:`device_sample`): decoding and the views happen on the device,
            a batch at a time (:class:`~.device_views.DeviceViews`, which the DataModules run in
            ``on_after_batch_transfer``). Same draws as the CPU paths.
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
        device_augment: bool = False,
    ) -> None:
        self.device_augment = bool(device_augment)
        self.fast_decode = bool(fast_decode) or self.device_augment
        self.input_size = int(input_size)
        self.tokenizer_size = int(tokenizer_size)
        self.mask_generator = mask_generator
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.color_jitter = T.ColorJitter(color_jitter, color_jitter, color_jitter) if color_jitter else None
        self.hflip = float(hflip)
        self.mean, self.std = list(mean), list(std)
        std = torch.tensor(self.std).view(3, 1, 1)  # the normalisation as x * scale + shift
        self._scale, self._shift = 1 / 255 / std, -torch.tensor(self.mean).view(3, 1, 1) / std
        self.interpolation = interpolation_mode(interpolation)
        self.tokenizer_interpolation = interpolation_mode(tokenizer_interpolation)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(input_size={self.input_size}, tokenizer_size={self.tokenizer_size}, "
            f"scale={self.scale}, color_jitter={self.color_jitter is not None}, hflip={self.hflip}, "
            f"mask_generator={self.mask_generator}, fast_decode={self.fast_decode}, device_augment={self.device_augment})"
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

    @property
    def accepts_undecoded(self) -> bool:
        """Data sets hand this transform images still undecoded (``Image.open`` on in-memory bytes)
        and catch :class:`~.decode.ImageDecodeError` from it: true on the fast path, which decodes
        (at reduced size where it can) inside."""
        return self.fast_decode

    def draw(self, img: Image.Image) -> tuple[tuple | None, bool, tuple[int, int, int, int]]:
        """One sample's random draws, those of the exact path in its order: colour-jitter
        parameters (``T.ColorJitter.get_params``, or ``None``), flip, crop ``(top, left, height,
        width)`` on the full-resolution size, its box mirrored when flipped (the crop of the
        flipped image is the flipped crop of the mirrored box)."""
        jitter = self.color_jitter
        params = T.ColorJitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) if jitter else None
        flip = bool(self.hflip and torch.rand(()) < self.hflip)
        top, left, height, width = self.crop_params(img)
        if flip:
            left = img.size[0] - left - width
        return params, flip, (top, left, height, width)

    def device_sample(self, img: Image.Image) -> dict:
        """``device_augment``: the draws of :meth:`draw` packed as ``params`` (a float tensor of
        :data:`DEVICE_PARAMS`; factors not drawn are NaN) and the image as ``encoded`` (the JPEG's
        bytes, or raw pixels: :func:`~.decode.image_payload`); the views are computed on the
        device from a whole batch (:class:`~.device_views.DeviceViews`)."""
        params, flip, crop = self.draw(img)
        order, factors = ([-1.0] * 4, [float("nan")] * 3) if params is None else (
            params[0].tolist() + [-1.0] * (4 - len(params[0])), [float("nan") if f is None else float(f) for f in params[1:4]])
        try:
            payload = image_payload(img)
        except Exception as err:  # noqa: BLE001 - as in fast_views: the data sets skip the sample
            raise ImageDecodeError(f"cannot decode the image ({type(err).__name__}: {err})") from err
        return {"encoded": payload, "params": torch.tensor([*crop, float(flip), *order, *factors], dtype=torch.float32)}

    def fast_views(self, img: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        """The two views of :meth:`__call__`'s exact path, computed the fast way (module docstring).

        The draws are those of the exact path, in its order: colour-jitter parameters, flip, crop
        on the full-resolution size. Decoding errors are raised as :class:`~.decode.ImageDecodeError`."""
        params, flip, (top, left, height, width) = self.draw(img)
        try:
            if is_undecoded_jpeg(img) and draft_scale(img.size, (top, left, height, width), self.input_size) > 1:
                views, whole = self._reduced_view(img, (top, left, height, width))
            else:
                views, whole = self._full_size_view(decode_tensor(img), (top, left, height, width))
        except Exception as err:  # noqa: BLE001 - whatever the decoder raises: the data sets skip the sample
            raise ImageDecodeError(f"cannot decode the image ({type(err).__name__}: {err})") from err
        return self.finish_views(views, whole, flip, params)

    def finish_views(self, views: list[torch.Tensor], whole: torch.Tensor, flip: bool, params) -> tuple[torch.Tensor, torch.Tensor]:
        """Flip, colour jitter (``params``: ``T.ColorJitter.get_params``'s draws, or ``None``), the
        tokenizer view and the normalisation, from the uint8 CxHxW backbone view (before the flip;
        and the tokenizer view where it is not made from the backbone view, see
        :meth:`_needs_own_tokenizer_view`) and a strided uint8 sample of the whole image (contrast's mean). All in float on 8-bit levels,
        with no round trip through PIL; the tokenizer view is resized from the jittered, flipped
        backbone view (the official order: jitter, flip, then resize) by :func:`~.decode.resize_float`
        (Pillow's Lanczos weights)."""
        views = [v.to(torch.float32, memory_format=torch.contiguous_format) for v in views]
        if flip:
            views = [v.flip(-1) for v in views]
        if params is not None:
            views = jitter_views(views, params, whole.float())
        x = views[0]
        if len(views) == 2:
            tokens = views[1]
        elif self.tokenizer_size == self.input_size and self.tokenizer_interpolation == self.interpolation:
            tokens = x
        else:
            tokens = resize_float(x, self.tokenizer_size, self.tokenizer_interpolation).clamp_(0, 255).round_()
        return torch.addcmul(self._shift, x, self._scale), tokens.mul_(1 / 255)

    def _full_size_view(self, pixels: torch.Tensor, crop: tuple[int, int, int, int]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The uint8 backbone view (and the tokenizer view, where it needs its own) resized from a view of full-resolution uint8 pixels (no crop copy),
        and a strided sample of the whole image (contrast's mean)."""
        top, left, height, width = crop
        crop_pixels = pixels[:, top : top + height, left : left + width]
        views = [resize_uint8(crop_pixels, self.input_size, self.interpolation)]
        if self._needs_own_tokenizer_view:
            views.append(resize_uint8(crop_pixels, self.tokenizer_size, self.tokenizer_interpolation))
        step = max(1, min(pixels.shape[1:]) // THUMBNAIL_SIDE)
        return views, pixels[:, ::step, ::step]

    @property
    def _needs_own_tokenizer_view(self) -> bool:
        """The tokenizer view is resized from the crop itself, not from the backbone view, when it
        is not smaller than the backbone view (it would lose detail) and not the same view."""
        same = self.tokenizer_size == self.input_size and self.tokenizer_interpolation == self.interpolation
        return self.tokenizer_size >= self.input_size and not same

    def _reduced_view(self, img: Image.Image, crop: tuple[int, int, int, int]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """As :meth:`_full_size_view` for a JPEG decoded at 1/2-1/8 scale (``Image.draft``): the
        crop box, scaled, is fractional, which Pillow's ``resize(box=...)`` takes as it is."""
        top, left, height, width = crop
        img, scale = decode_rgb(img, crop, self.input_size)
        box = (left / scale, top / scale, (left + width) / scale, (top + height) / scale)
        sizes = [(self.input_size, self.interpolation)]
        if self._needs_own_tokenizer_view:
            sizes.append((self.tokenizer_size, self.tokenizer_interpolation))
        views = [pil_to_tensor(img.resize((size, size), PIL_RESAMPLE[mode], box=box)) for size, mode in sizes]
        step = max(1, min(img.size) // THUMBNAIL_SIDE)
        return views, pil_to_tensor(img)[:, ::step, ::step]

    def __call__(self, img: Image.Image) -> dict[str, torch.Tensor]:
        if self.device_augment:
            sample = self.device_sample(img)
            if self.mask_generator is not None:
                sample["mask"] = self.mask_generator()
            return sample
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
        self.interpolation = interpolation_mode(interpolation)

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
        self.interpolation = interpolation_mode(interpolation)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, hflip={self.hflip}, mean={self.mean}, std={self.std})"

    def __call__(self, img: Image.Image) -> dict[str, torch.Tensor]:
        img = img.convert("RGB")
        if self.hflip and torch.rand(()) < self.hflip:
            img = TF.hflip(img)
        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), PIL_RESAMPLE[self.interpolation])
        return {"image": TF.normalize(TF.to_tensor(img), self.mean, self.std)}


class TokenizerEvalTransform:
    """PIL image -> ``{"tokenizer_image"}``: the evaluation view of BEiT v2's tokenizer training, in [0, 1].

    The short side is resized to ``int(size / crop_pct)`` and the centre ``size`` x ``size`` is
    cropped, as the official VQ-KD validation set does (microsoft/unilm ``beit2/datasets.py``
    ``build_vqkd_dataset(is_train=False)``: ``crop_pct = 224 / 256`` below 384 pixels, else 1.0,
    the resize with ``--train_interpolation``, no normalisation: the tokenizer normalises itself).
    Cropping 87.5% of the short side keeps the scale of the 224px training crops; the whole-short-side
    view of :class:`TokenizerViewTransform` shows objects smaller than training does.
    """

    def __init__(self, size: int = 224, crop_pct: float = 0.875, interpolation: str = "bicubic") -> None:
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1] (the official VQ-KD view: 0.875 = 224/256 below 384 px, "
                             f"1.0 from 384 px); got {crop_pct}")
        self.size, self.crop_pct = int(size), float(crop_pct)
        self.resize_size = int(self.size / self.crop_pct)
        self.interpolation = interpolation_mode(interpolation)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self.size}, crop_pct={self.crop_pct}, resize={self.resize_size}, "
                f"interpolation={self.interpolation.value})")

    def __call__(self, img: Image.Image) -> dict[str, torch.Tensor]:
        img = TF.resize(img.convert("RGB"), self.resize_size, self.interpolation)
        return {"tokenizer_image": TF.to_tensor(TF.center_crop(img, [self.size, self.size]))}
