"""The interface every visual tokenizer implements.

A tokenizer turns images in [0, 1] (the ``tokenizer_image`` view of a batch) into a grid of
discrete codes, one per backbone patch. Pre-training treats it as a frozen function: it is kept
in eval mode, gets no gradients, and runs in a precision chosen on purpose
(:meth:`VisualTokenizer.configure_inference`), never under the Trainer's autocast, because a
bf16 autocast region can flip argmax tokens.

Precision (``tokenizer.precision`` in the configs):

* ``fp32`` (default): autocast off, in the dtype the weights hold (float32 unless converted).
* ``fp16``: OpenAI's choice for its dVAE on CUDA (its convolutions cast inputs and weights to
  float16): an fp16 autocast region, so convolutions and matmuls run in float16 while
  reductions and normalisations stay in float32; the weights stay float32 (cast per call).
  float16 on a CPU is slow and not what a CPU run wants, so there it falls back to fp32 with a
  one-time warning.
* ``bf16``: the same with bfloat16 (8 mantissa bits to fp16's 11: it flips more tokens; see
  ``benchmarks/RESULTS.md`` for the measured agreement with fp32).

``channels_last`` stores the convolution weights and feeds the images in NHWC order (faster
cuDNN kernels for the DALL-E family); ``compile`` runs the encoding through ``torch.compile``.
"""

from __future__ import annotations

import abc
import warnings
from typing import Any

import torch
from torch import nn

__all__ = ["PRECISIONS", "VisualTokenizer"]

#: the precisions a tokenizer can encode in, by their config names
PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class VisualTokenizer(nn.Module, abc.ABC):
    """Base class: ``vocab_size``, ``image_size`` and ``encode(images) -> LongTensor[B, h, w]``."""

    #: number of discrete codes
    vocab_size: int
    #: side of the square input the tokenizer expects, in pixels
    image_size: int
    #: how many pixels one code covers along each side (the grid is ``image_size // downsample``)
    downsample: int
    #: inference settings of :meth:`configure_inference` (class defaults: fp32, eager, NCHW)
    precision: str = "fp32"
    channels_last: bool = False
    compile_encode: bool = False

    @property
    def grid_size(self) -> tuple[int, int]:
        side = self.image_size // self.downsample
        return side, side

    @abc.abstractmethod
    def encode_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Code logits ``B x vocab_size x h x w`` for images in [0, 1]."""

    def configure_inference(
        self, precision: str = "fp32", channels_last: bool = False, compile: bool = False
    ) -> VisualTokenizer:
        """Choose how :meth:`encode` runs: ``precision`` (``fp32``, ``fp16`` or ``bf16``, see the
        module docstring), ``channels_last`` memory format, ``compile`` with ``torch.compile``.
        Returns ``self``. The weights' values are not changed, so state dicts are unaffected."""
        if precision not in PRECISIONS:
            raise ValueError(f"tokenizer precision must be one of {sorted(PRECISIONS)}; got {precision!r}")
        self.precision, self.channels_last, self.compile_encode = precision, bool(channels_last), bool(compile)
        if self.channels_last:
            self.to(memory_format=torch.channels_last)  # 4-d weights (convolutions) only; values unchanged
        self.__dict__.pop("_compiled_tokens", None)
        return self

    def compute_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype :meth:`encode` computes in on ``device``: the configured precision, except
        fp16 on a CPU, which falls back to float32 (warned once per tokenizer)."""
        dtype = PRECISIONS[self.precision]
        if dtype == torch.float16 and device.type == "cpu":
            if not self.__dict__.get("_warned_cpu_fp16", False):
                self.__dict__["_warned_cpu_fp16"] = True
                warnings.warn(
                    f"{type(self).__name__}: tokenizer.precision=fp16 on a CPU encodes in float32 instead: float16 "
                    "convolutions and matmuls on CPUs are slow (no fp16 units) and CPU runs are for checks, not "
                    "speed. fp16 applies on a GPU; set tokenizer.precision=fp32 to silence this.",
                    stacklevel=3,
                )
            return torch.float32
        return dtype

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Token ids ``B x h x w`` (int64) for images ``B x 3 x image_size x image_size`` in [0, 1]."""
        if images.ndim != 4 or images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"{type(self).__name__} expects images of shape B x C x {self.image_size} x {self.image_size}; "
                f"got {tuple(images.shape)}. Set the data's tokenizer view size to {self.image_size}."
            )
        dtype = self.compute_dtype(images.device)
        if self.compile_encode:
            compiled = self.__dict__.get("_compiled_tokens")
            if compiled is None:  # the unbound function: a deep copy of the tokenizer passes its own self
                compiled = self.__dict__["_compiled_tokens"] = torch.compile(type(self).tokens_in)
            return compiled(self, images, dtype)
        return self.tokens_in(images, dtype)

    def tokens_in(self, images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Token ids computed in ``dtype`` exactly as asked (no CPU fallback): float32 with autocast
        off and the images in the weights' dtype; float16 / bfloat16 as an autocast region of that
        dtype on the images' device. :meth:`encode` is the entry point; this is for measurements."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if dtype == torch.float32:
            held = next(self.parameters(), torch.empty(0)).dtype  # the precision the tokenizer holds
            with torch.autocast(device_type=images.device.type, enabled=False):
                logits = self.encode_logits(images.to(held))
        else:
            with torch.autocast(device_type=images.device.type, dtype=dtype):
                logits = self.encode_logits(images)
        return logits.argmax(dim=1)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state.pop("_compiled_tokens", None)  # a compiled function does not pickle; rebuilt on first use
        return state
