"""Decoding and resampling for the fast pre-training path (``BeitPretrainTransform(fast_decode=True)``).

Chosen on measurements (``benchmarks/data_throughput.py --candidates``, benchmarks/RESULTS.md):

- JPEGs are decoded by torchvision's ``decode_jpeg`` (libjpeg-turbo, the same pixels as Pillow) into
  a uint8 tensor, without Pillow's copies (``load`` + ``convert`` + ``np.asarray``); when the crop
  allows it, Pillow's ``draft`` decodes at 1/2-1/8 scale instead (libjpeg DCT scaling).
- Resizes of uint8 tensors with bicubic/bilinear interpolation use torchvision's antialiased
  uint8 kernels (AVX2; Pillow's filters, within ~0.02 levels of Pillow, ~3x faster). Lanczos, which
  torchvision lacks, stays with Pillow (a banded Lanczos in torch, written to Pillow's weights,
  was slower than Pillow on the 224 -> 112 tokenizer view).

Images reach the transform undecoded: ``Image.open`` on the file's bytes held in memory
(:func:`open_encoded`), so that nothing keeps a file handle and the bytes stay readable.
Decoding then happens inside the transform; its errors are raised as :class:`ImageDecodeError`,
which the data sets catch to skip, name and count the sample (a bug elsewhere in a transform is
not mistaken for a bad file).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F2

try:  # deprecated since torchvision 0.29; Pillow decodes when it is gone
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # pragma: no cover
    decode_jpeg = None

_DRAFT_SCALES = (8, 4, 2)
_TENSOR_MODES = (InterpolationMode.BICUBIC, InterpolationMode.BILINEAR, InterpolationMode.NEAREST)
PIL_RESAMPLE = {
    InterpolationMode.BICUBIC: Image.Resampling.BICUBIC,
    InterpolationMode.BILINEAR: Image.Resampling.BILINEAR,
    InterpolationMode.LANCZOS: Image.Resampling.LANCZOS,
    InterpolationMode.NEAREST: Image.Resampling.NEAREST,
}


class ImageDecodeError(OSError):
    """An image handed over undecoded could not be decoded inside the transform."""


def open_encoded(data: bytes) -> Image.Image:
    """``Image.open`` on in-memory bytes: reads the header only (size, format; raises on a file
    that is no image), decoding is left to the transform."""
    return Image.open(io.BytesIO(data))


def is_undecoded_jpeg(img: Image.Image) -> bool:
    """``img`` is a JPEG opened by PIL whose pixels are not decoded yet (``draft`` still works)."""
    return img.format == "JPEG" and bool(getattr(img, "tile", None)) and not getattr(img, "decoderconfig", ())


def encoded_bytes(img: Image.Image) -> memoryview | None:
    """The encoded bytes of an undecoded JPEG opened from memory (:func:`open_encoded`), else ``None``."""
    fp = getattr(img, "fp", None)
    return fp.getbuffer() if isinstance(fp, io.BytesIO) and is_undecoded_jpeg(img) else None


def draft_scale(image_size: tuple[int, int], crop: tuple[int, int, int, int], min_side: int) -> int:
    """The largest JPEG DCT reduction (8, 4, 2 or 1) that keeps the ``(top, left, height, width)``
    crop of an image of ``image_size`` (width, height) at least ``min_side`` pixels on each side."""
    _, _, height, width = crop
    for s in _DRAFT_SCALES:
        if min(height, width) >= s * min_side and min(image_size) >= s:
            return s
    return 1


def decode_rgb(img: Image.Image, crop: tuple[int, int, int, int] | None = None, min_side: int = 0) -> tuple[Image.Image, int]:
    """Decode ``img`` to an RGB PIL image, at a reduced scale when it is an undecoded JPEG and
    ``crop`` allows it (see :func:`draft_scale`). Returns the image and the scale (1: full size)."""
    scale = 1
    if crop is not None and is_undecoded_jpeg(img):
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


def decode_tensor(img: Image.Image) -> torch.Tensor:
    """The full-resolution RGB pixels of ``img`` as a uint8 CxHxW tensor (HWC in memory: the layout
    torchvision's fast uint8 resize wants). An undecoded in-memory JPEG goes through
    torchvision's decoder, anything else through Pillow."""
    data = encoded_bytes(img)
    if data is not None and decode_jpeg is not None:
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its codecs for TorchCodec (not a
            warnings.simplefilter("ignore", DeprecationWarning)  # dependency here); they work, and fastest
            return decode_jpeg(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB)
    img, _ = decode_rgb(img)
    return pil_to_tensor(img)


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 CxHxW tensor (an HWC array seen channels first: no transpose copy)."""
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """uint8 CxHxW tensor -> RGB PIL image."""
    return Image.fromarray(x.permute(1, 2, 0).contiguous().numpy())


def resize_uint8(x: torch.Tensor, size: int, interpolation: InterpolationMode) -> torch.Tensor:
    """Antialiased resize of a uint8 CxHxW tensor to ``size`` x ``size`` with Pillow's filter
    (torchvision's uint8 kernels; Pillow itself for Lanczos). Returns uint8 CxHxW."""
    if interpolation in _TENSOR_MODES:
        return F2.resize(x, [size, size], interpolation=interpolation, antialias=interpolation != InterpolationMode.NEAREST)
    return pil_to_tensor(tensor_to_pil(x).resize((size, size), PIL_RESAMPLE[interpolation]))
