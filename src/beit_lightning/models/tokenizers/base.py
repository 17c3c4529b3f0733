"""The interface every visual tokenizer implements.

A tokenizer turns images in [0, 1] (the ``tokenizer_image`` view of a batch) into a grid of
discrete codes, one per backbone patch. Pre-training treats it as a frozen function: it is kept
in eval mode, gets no gradients, and runs in the precision it chose (not under the Trainer's
autocast), because a bf16 autocast region can flip argmax tokens.
"""

from __future__ import annotations

import abc

import torch
from torch import nn


class VisualTokenizer(nn.Module, abc.ABC):
    """Base class: ``vocab_size``, ``image_size`` and ``encode(images) -> LongTensor[B, h, w]``."""

    #: number of discrete codes
    vocab_size: int
    #: side of the square input the tokenizer expects, in pixels
    image_size: int
    #: how many pixels one code covers along each side (the grid is ``image_size // downsample``)
    downsample: int

    @property
    def grid_size(self) -> tuple[int, int]:
        side = self.image_size // self.downsample
        return side, side

    @abc.abstractmethod
    def encode_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Code logits ``B x vocab_size x h x w`` for images in [0, 1]."""

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Token ids ``B x h x w`` (int64) for images ``B x 3 x image_size x image_size`` in [0, 1]."""
        if images.ndim != 4 or images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"{type(self).__name__} expects images of shape B x C x {self.image_size} x {self.image_size}; "
                f"got {tuple(images.shape)}. Set the data's tokenizer view size to {self.image_size}."
            )
        dtype = next(self.parameters(), torch.empty(0)).dtype  # the precision the tokenizer holds
        with torch.autocast(device_type=images.device.type, enabled=False):
            logits = self.encode_logits(images.to(dtype))
        return logits.argmax(dim=1)
