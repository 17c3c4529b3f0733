"""Decoding and resampling for the fast pre-training path (``BeitPretrainTransform(fast_decode=True)``).

Chosen on measurements (``benchmarks/data_throughput.py --candidates``, benchmarks/RESULTS.md):

- JPEGs are decoded by torchvision's ``decode_jpeg`` (libjpeg-turbo, the same pixels as Pillow) into
  a uint8 tensor, without Pillow's copies (``load`` + ``convert`` + ``np.asarray``); when the crop
  allows it, Pillow's ``draft`` decodes at 1/2-1/8 scale instead (libjpeg DCT scaling).
- Resizes of uint8 tensors with bicubic/bilinear interpolation use torchvision's antialiased
  uint8 kernels (AVX2; Pillow's filters, within ~0.02 levels of Pillow, ~3x faster). Lanczos, which
  torchvision lacks, is :func:`resize_float`: Pillow's weights as matrices, applied in row blocks
  to float levels (equal to Pillow to one level, ~1.6x faster on the 224 -> 112 tokenizer view).

Images reach the transform undecoded: ``Image.open`` on the file's bytes held in memory
(:func:`open_encoded`), so that nothing keeps a file handle and the bytes stay readable.
Decoding then happens inside the transform; its errors are raised as :class:`ImageDecodeError`,
which the data sets catch to skip, name and count the sample (a bug elsewhere in a transform is
not mistaken for a bad file).
"""

from __future__ import annotations

import functools
import io
import struct
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


# Pillow's resampling filters (``src/libImaging/Resample.c``): support (taps each side at scale 1)
# and kernel, so that a float resize in torch computes what ``Image.resize`` computes, without
# its 8-bit rounding between the two passes.
def _bilinear(x: np.ndarray) -> np.ndarray:
    return np.clip(1.0 - np.abs(x), 0.0, None)


def _bicubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _lanczos(x: np.ndarray) -> np.ndarray:
    return np.where(np.abs(x) < 3.0, np.sinc(x) * np.sinc(x / 3.0), 0.0)


_FILTERS = {
    InterpolationMode.BILINEAR: (1.0, _bilinear),
    InterpolationMode.BICUBIC: (2.0, _bicubic),
    InterpolationMode.LANCZOS: (3.0, _lanczos),
}


@functools.lru_cache(maxsize=64)
def resample_matrix(in_size: int, out_size: int, interpolation: InterpolationMode = InterpolationMode.LANCZOS,
                    start: float = 0.0, length: float | None = None) -> torch.Tensor:
    """The ``(out_size, in_size)`` matrix of Pillow's antialiased resampling weights along one axis,
    for the input span ``[start, start + length)`` (Pillow's ``box``; default: all of it): each row
    is one output pixel's normalised filter taps, the filter widened by the reduction factor."""
    if interpolation not in _FILTERS:
        raise ValueError(f"no float resampling for {interpolation}; choose one of {sorted(m.value for m in _FILTERS)}")
    support, kernel = _FILTERS[interpolation]
    length = float(in_size if length is None else length)
    scale = length / out_size
    filter_scale = max(scale, 1.0)
    support *= filter_scale
    center = start + (np.arange(out_size) + 0.5) * scale
    lo = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C's int(): towards zero, as Pillow
    hi = np.minimum((center + support + 0.5).astype(np.int64), in_size)
    cols = lo[:, None] + np.arange(max(1, int((hi - lo).max())))[None, :]
    used = cols < hi[:, None]
    taps = np.where(used, kernel((cols - center[:, None] + 0.5) / filter_scale), 0.0)
    total = taps.sum(1, keepdims=True)
    taps = np.divide(taps, total, out=taps.copy(), where=total != 0)
    weights = np.zeros((out_size, in_size))
    weights[np.broadcast_to(np.arange(out_size)[:, None], cols.shape)[used], cols[used]] = taps[used]
    return torch.from_numpy(weights).float()


@functools.lru_cache(maxsize=64)
def _row_blocks(in_size: int, out_size: int, interpolation: InterpolationMode, n: int) -> tuple[tuple[int, int, torch.Tensor], ...]:
    """:func:`resample_matrix` cut into row blocks, each with the input span it reads: a banded
    product costs a few blocks' worth instead of the dense matrix's (measured best at ~7 blocks
    for the horizontal pass and ~4 for the vertical one, 224 -> 112 on one CPU core)."""
    matrix = resample_matrix(in_size, out_size, interpolation)
    blocks = []
    n = max(1, min(n, out_size // 8))
    for b in range(n):
        rows = matrix[b * out_size // n:(b + 1) * out_size // n]
        used = rows.abs().sum(0).nonzero()
        lo, hi = int(used.min()), int(used.max()) + 1
        blocks.append((lo, hi, rows[:, lo:hi].contiguous()))
    return tuple(blocks)


def resize_float(x: torch.Tensor, size: int, interpolation: InterpolationMode = InterpolationMode.LANCZOS) -> torch.Tensor:
    """Resize a float ``(..., H, W)`` tensor to ``size`` x ``size`` with Pillow's antialiased filter
    (horizontal pass, then vertical, as Pillow) on 8-bit levels: the intermediate is clipped and
    rounded to a level as Pillow's is; the result is not (a Lanczos result can leave [0, 255]; the
    caller rounds and clips once).
    Used for the tokenizer view, which torchvision cannot make (it has no Lanczos), ~2x faster
    than Pillow on one core; on a GPU (:mod:`.device_views`) the dense matrices."""
    height, width = x.shape[-2:]
    if x.device.type != "cpu":
        rows = resample_matrix(height, size, interpolation).to(x.device, x.dtype)
        cols = resample_matrix(width, size, interpolation).to(x.device, x.dtype)
        return rows @ (x @ cols.T).clamp_(0, 255).round_()
    x = x.contiguous()
    x = torch.cat([x[..., lo:hi] @ w.T for lo, hi, w in _row_blocks(width, size, interpolation, 7)], -1)
    x = x.clamp_(0, 255).round_()  # Pillow keeps the horizontal pass in 8 bits (clips the overshoot)
    return torch.cat([w @ x[..., lo:hi, :] for lo, hi, w in _row_blocks(height, size, interpolation, 4)], -2)


# --- images carried undecoded to the device (``BeitPretrainTransform(device_augment=True)``) ------
RAW_MAGIC = b"BLRAW\0"  # raw RGB pixels: magic, then height and width (little-endian uint32), then HWC bytes


def image_payload(img: Image.Image) -> bytes:
    """What a sample carries to the device instead of its views: the file's bytes for an undecoded
    in-memory JPEG (decoded there, by nvJPEG on a GPU), else the RGB pixels decoded here, behind
    :data:`RAW_MAGIC`. ``bytes``, so that the default collate keeps a list and Lightning's transfer
    leaves it on the host (the decoder reads host memory)."""
    data = encoded_bytes(img)
    if data is not None:
        return bytes(data)
    rgb = np.asarray(img.convert("RGB"))
    return RAW_MAGIC + struct.pack("<II", *rgb.shape[:2]) + rgb.tobytes()


def _decode_payload(payload: bytes, device: torch.device) -> torch.Tensor:
    if payload.startswith(RAW_MAGIC):
        height, width = struct.unpack_from("<II", payload, len(RAW_MAGIC))
        pixels = np.frombuffer(payload, np.uint8, offset=len(RAW_MAGIC) + 8).reshape(height, width, 3)
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(torch.frombuffer(bytearray(payload), dtype=torch.uint8), mode=ImageReadMode.RGB, device=device)


def decode_payloads(payloads: list[bytes], device: torch.device | str) -> list[torch.Tensor | ImageDecodeError]:
    """Decode :func:`image_payload` bytes to uint8 CxHxW tensors on ``device``: the JPEGs in one
    batched call (nvJPEG's batched decoder on CUDA), one by one when that fails so that only the
    bad ones are lost; a failure is returned in its place as an :class:`ImageDecodeError`."""
    device = torch.device(device)
    out: list[torch.Tensor | ImageDecodeError | None] = [None] * len(payloads)
    jpegs = [i for i, p in enumerate(payloads) if not p.startswith(RAW_MAGIC)]
    if len(jpegs) > 1 and decode_jpeg is not None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                decoded = decode_jpeg([torch.frombuffer(bytearray(payloads[i]), dtype=torch.uint8) for i in jpegs],
                                      mode=ImageReadMode.RGB, device=device)
            for i, pixels in zip(jpegs, decoded, strict=True):
                out[i] = pixels
        except Exception:  # noqa: BLE001 - one bad file fails the batch: decode one by one below
            pass
    for i, payload in enumerate(payloads):
        if out[i] is None:
            try:
                out[i] = _decode_payload(payload, device)
            except Exception as err:  # noqa: BLE001 - whatever the decoder raises
                out[i] = ImageDecodeError(f"cannot decode the image ({type(err).__name__}: {err})")
    return out  # type: ignore[return-value]
