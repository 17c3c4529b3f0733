"""BEiT's two pre-training views computed on the device, a batch at a time (``data.device_augment``).

The data-loader workers only read the file, draw the sample's randomness and the mask
(:meth:`~.transforms.BeitPretrainTransform.device_sample`: the same draws, in the same order, as
the CPU paths) and hand over the JPEG's bytes. After the batch reaches the device
(``on_after_batch_transfer``), :class:`DeviceViews` decodes the JPEGs there (torchvision's
``decode_jpeg``: nvJPEG's batched decoder on CUDA), resizes each crop with the antialiased filter
(``F.interpolate(antialias=True)``, Pillow's bicubic), and applies the flip, the colour jitter
(Pillow's arithmetic, as :func:`~.transforms.jitter_views`, vectorised over samples that drew
different orders), the tokenizer view (:func:`~.decode.resize_float`: Pillow's Lanczos weights)
and the normalisation to the whole batch. On a CPU the same code runs on the CPU: that is how the
tests compare it with the CPU fast path sample by sample.

A JPEG that fails to decode on the device is dropped from its batch, warned about and counted
(:attr:`DeviceViews.skipped`), as the CPU paths skip a file that cannot be decoded.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torchvision.transforms import InterpolationMode

from .decode import ImageDecodeError, decode_payloads, resize_float
from .transforms import DEVICE_PARAMS, THUMBNAIL_SIDE, BeitPretrainTransform, grey_levels

_P = {name: i for i, name in enumerate(DEVICE_PARAMS)}


class DeviceViews:
    """Batch of ``{"encoded", "params", "mask", ...}`` -> ``{"image", "tokenizer_image", "mask", ...}``
    on the batch's device, with the settings of the :class:`~.transforms.BeitPretrainTransform`
    that drew ``params``."""

    def __init__(self, transform: BeitPretrainTransform) -> None:
        for mode in (transform.interpolation, transform.tokenizer_interpolation):
            if mode == InterpolationMode.NEAREST:
                raise ValueError("device_augment resizes with Pillow's antialiased filters (bicubic, bilinear, lanczos); "
                                 "got nearest")
        self.input_size, self.tokenizer_size = transform.input_size, transform.tokenizer_size
        self.interpolation, self.tokenizer_interpolation = transform.interpolation, transform.tokenizer_interpolation
        self.mean, self.std = list(transform.mean), list(transform.std)
        self.skipped = 0  # samples dropped because the device could not decode them

    def __repr__(self) -> str:
        return f"{type(self).__name__}(input_size={self.input_size}, tokenizer_size={self.tokenizer_size})"

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        params: torch.Tensor = batch["params"]
        device = batch["mask"].device if torch.is_tensor(batch.get("mask")) else params.device
        decoded = decode_payloads(list(batch["encoded"]), device)
        keep = [i for i, d in enumerate(decoded) if not isinstance(d, ImageDecodeError)]
        if len(keep) < len(decoded):
            for i, d in enumerate(decoded):
                if isinstance(d, ImageDecodeError):
                    warnings.warn(f"device_augment: skipped sample {i} of a batch: {d}", stacklevel=2)
            self.skipped += len(decoded) - len(keep)
            batch = _select(batch, keep, len(decoded))
            params = batch["params"]
        pixels = [decoded[i] for i in keep]
        out = {k: v for k, v in batch.items() if k not in ("encoded", "params")}
        out["image"], out["tokenizer_image"] = self.views(pixels, params.to(device=device, dtype=torch.float32))
        return out

    def views(self, pixels: list[torch.Tensor], params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalised backbone views and the [0, 1] tokenizer views of uint8 CxHxW images."""
        n = len(pixels)
        device = params.device
        if n == 0:
            return (torch.empty(0, 3, self.input_size, self.input_size, device=device),
                    torch.empty(0, 3, self.tokenizer_size, self.tokenizer_size, device=device))
        crops = params[:, :4].round().long().tolist()
        x = torch.stack([self._resize(p, c, self.input_size, self.interpolation) for p, c in zip(pixels, crops, strict=True)])
        own_tokens = self.tokenizer_size >= self.input_size and (self.tokenizer_size, self.tokenizer_interpolation) != (
            self.input_size, self.interpolation)
        views = [x]
        if own_tokens:
            views.append(torch.stack([self._resize(p, c, self.tokenizer_size, self.tokenizer_interpolation)
                                      for p, c in zip(pixels, crops, strict=True)]))
        flip = params[:, _P["flip"]] > 0.5
        views = [torch.where(flip.view(-1, 1, 1, 1), v.flip(-1), v) for v in views]
        whole, valid = _thumbnails(pixels)
        views = jitter_batch(views, params, whole, valid)
        x = views[0]
        if own_tokens:
            tokens = views[1]
        elif self.tokenizer_size == self.input_size:
            tokens = x
        else:
            tokens = resize_float(x, self.tokenizer_size, self.tokenizer_interpolation).clamp_(0, 255).round_()
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        return (x / 255 - mean) / std, tokens / 255

    def _resize(self, pixels: torch.Tensor, crop: list[int], size: int, interpolation: InterpolationMode) -> torch.Tensor:
        """The crop resized as the CPU path's uint8 view (Pillow's filter, rounded to levels)."""
        top, left, height, width = crop
        view = pixels[:, top:top + height, left:left + width].float()
        return resize_float(view, size, interpolation).clamp_(0, 255).round_()


def _thumbnails(pixels: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU path's strided samples of each whole image (contrast's mean), zero-padded into one
    batch, and where they are valid."""
    samples = []
    for p in pixels:
        step = max(1, min(p.shape[1:]) // THUMBNAIL_SIDE)
        samples.append(p[:, ::step, ::step])
    h, w = max(s.shape[1] for s in samples), max(s.shape[2] for s in samples)
    whole = torch.zeros(len(samples), 3, h, w, device=pixels[0].device)
    valid = torch.zeros(len(samples), 1, h, w, dtype=torch.bool, device=pixels[0].device)
    for i, s in enumerate(samples):
        whole[i, :, : s.shape[1], : s.shape[2]] = s
        valid[i, :, : s.shape[1], : s.shape[2]] = True
    return whole, valid


def jitter_batch(views: list[torch.Tensor], params: torch.Tensor, whole: torch.Tensor, valid: torch.Tensor) -> list[torch.Tensor]:
    """:func:`~.transforms.jitter_views` for a batch whose samples drew different factors and
    orders (``params`` as :data:`~.transforms.DEVICE_PARAMS`): at each of the four positions of the
    order, each step is applied to the samples that drew it there (the others pass unchanged)."""
    orders = params[:, _P["order0"]:_P["order3"] + 1]
    factors = params[:, _P["brightness"]:_P["saturation"] + 1]
    views = [v.clone() for v in views] + [whole.clone()]
    for position in range(orders.shape[1]):
        for fn_id in range(3):
            chosen = (orders[:, position] == fn_id) & ~factors[:, fn_id].isnan()
            if not bool(chosen.any()):
                continue
            factor = factors[:, fn_id].nan_to_num(1.0).view(-1, 1, 1, 1)
            if fn_id == 0:
                new = [v * factor for v in views]
            elif fn_id == 1:
                grey = grey_levels(views[-1])
                counts = valid.flatten(1).sum(1).clamp(min=1)
                mean = torch.floor((grey * valid).flatten(1).sum(1) / counts + 0.5).view(-1, 1, 1, 1)
                new = [(v - mean) * factor + mean for v in views]
            else:
                new = [(v - g) * factor + g for v in views for g in [grey_levels(v)]]
            select = chosen.view(-1, 1, 1, 1)
            views = [torch.where(select, n.clamp_(0, 255).floor_(), v) for n, v in zip(new, views, strict=True)]
    return views[:-1]


def _select(batch: dict[str, Any], keep: list[int], n: int) -> dict[str, Any]:
    """The samples ``keep`` of a collated batch of ``n``: every tensor or list whose first
    dimension is the batch's is indexed; anything else is kept as it is."""
    index = torch.tensor(keep, dtype=torch.long)
    out = {}
    for key, value in batch.items():
        if torch.is_tensor(value) and value.dim() and value.shape[0] == n:
            out[key] = value[index.to(value.device)]
        elif isinstance(value, list | tuple) and len(value) == n:
            out[key] = [value[i] for i in keep]
        else:
            out[key] = value
    return out
