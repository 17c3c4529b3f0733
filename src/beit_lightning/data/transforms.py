"""BEiT's pre-training transform: two views of one random-resized crop, plus the mask.

Following the paper and the official ``RandomResizedCropAndInterpolationWithTwoPic``: color
jitter and a horizontal flip are applied to the image, then one random-resized crop is taken and
resized twice, to ``input_size`` with bicubic interpolation for the backbone (then normalised)
and to ``tokenizer_size`` with Lanczos for the tokenizer (kept in [0, 1]). Random draws use
torch's and Python's global generators, which PyTorch/Lightning seed per worker and rank.
"""

from __future__ import annotations

from collections.abc import Sequence

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
        mask_generator: draws the blockwise mask; ``None`` leaves ``mask`` out.
        scale, ratio: random-resized-crop ranges (torchvision's defaults, as in BEiT).
        color_jitter: brightness/contrast/saturation strength (0.4); 0 disables.
        hflip: probability of a horizontal flip.
        mean, std: normalisation of the backbone view (BEiT's code default: 0.5/0.5).
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
    ) -> None:
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
            f"mask_generator={self.mask_generator})"
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

    def __call__(self, img: Image.Image) -> dict[str, torch.Tensor]:
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
