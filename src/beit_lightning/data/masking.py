"""BEiT's blockwise masking.

The generator runs once per sample inside data-loader workers, so it works on a small NumPy
boolean grid with slice assignments (no per-patch Python loops) and draws its scalars from
Python's ``random`` (cheaper than NumPy for single draws).

It follows the algorithm of the BEiT paper (Algorithm 1) and the official ``MaskingGenerator``:
blocks of random area in ``[min_num_patches, remaining]`` and log-uniform aspect ratio are
placed at random until the requested count is reached; a block is accepted only if it adds at
least one and at most ``remaining`` new patches. The official code stops as soon as ten tries
in a row place nothing, and so masks about 74.5 of the requested 75 patches on average. Here,
when that happens, the mask is topped up by growing the existing blocks one patch at a time at
their border (``exact=True``, the default), so every mask has exactly the requested count while
staying blockwise. ``exact=False`` reproduces the official behaviour.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
import torch

_TRIES_PER_BLOCK = 10


class MaskGrid:
    """What every mask generator shares: the patch grid, the requested count (checked against the
    grid) and the random stream (a private one with ``seed``, else the global ``random`` module,
    which PyTorch and Lightning seed per data-loader worker and per rank)."""

    def __init__(self, input_size: int | Sequence[int], num_masking_patches: int, *, seed: int | None = None) -> None:
        size = (input_size, input_size) if isinstance(input_size, int) else tuple(int(s) for s in input_size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"input_size must be a positive int or (height, width); got {input_size}")
        self.height, self.width = size
        self.num_patches = self.height * self.width
        if not 0 <= num_masking_patches <= self.num_patches:
            raise ValueError(
                f"num_masking_patches={num_masking_patches} is impossible on a {self.height}x{self.width} "
                f"grid: choose a value in [0, {self.num_patches}]"
            )
        self.num_masking_patches = int(num_masking_patches)
        self._rng: random.Random | None = None if seed is None else random.Random(seed)

    @property
    def input_size(self) -> tuple[int, int]:
        return self.height, self.width

    def seed(self, seed: int) -> None:
        """Give the generator a private random stream (e.g. per worker and rank)."""
        self._rng = random.Random(seed)


class BlockwiseMaskGenerator(MaskGrid):
    """Draw BEiT blockwise masks.

    Args:
        input_size: the patch grid, ``int`` for square or ``(height, width)``.
        num_masking_patches: how many patches to mask (BEiT: 75 of 14x14).
        min_num_patches: smallest block area (BEiT: 16).
        max_num_patches: largest block area; defaults to ``num_masking_patches``.
        min_aspect: smallest block aspect ratio (height / width); BEiT uses 0.3.
        max_aspect: largest aspect ratio; defaults to ``1 / min_aspect``.
        exact: top the mask up to exactly ``num_masking_patches`` when block placement stalls.
        seed: seed of a private random stream. ``None`` uses the global ``random`` module, which
            PyTorch and Lightning seed per data-loader worker and per rank.

    Calling the generator returns a ``torch.bool`` tensor of shape ``input_size``.
    """

    def __init__(
        self,
        input_size: int | Sequence[int],
        num_masking_patches: int,
        min_num_patches: int = 4,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        *,
        exact: bool = True,
        seed: int | None = None,
    ) -> None:
        super().__init__(input_size, num_masking_patches, seed=seed)
        if min_num_patches < 1:
            raise ValueError(f"min_num_patches must be >= 1; got {min_num_patches}")
        if max_num_patches is not None and max_num_patches < min_num_patches:
            raise ValueError(
                f"max_num_patches={max_num_patches} is below min_num_patches={min_num_patches}: "
                "raise max_num_patches or lower min_num_patches"
            )
        # Like the official code, a request below min_num_patches is allowed: block areas are then
        # drawn between the request and min_num_patches and must still fit the remaining count.
        max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        if min_aspect <= 0:
            raise ValueError(f"min_aspect must be > 0; got {min_aspect}")
        max_aspect = max_aspect if max_aspect is not None else 1.0 / min_aspect
        if max_aspect < min_aspect:
            raise ValueError(
                f"aspect ratio bounds must satisfy 0 < min_aspect <= max_aspect; got {min_aspect}, {max_aspect}"
            )
        self.min_num_patches = int(min_num_patches)
        self.max_num_patches = int(max_num_patches)
        self.min_aspect = float(min_aspect)
        self.max_aspect = float(max_aspect)
        self.log_aspect_ratio = (math.log(self.min_aspect), math.log(self.max_aspect))
        self.exact = exact

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(input_size={self.input_size}, num_masking_patches={self.num_masking_patches}, "
            f"min_num_patches={self.min_num_patches}, max_num_patches={self.max_num_patches}, "
            f"aspect=({self.min_aspect:.3g}, {self.max_aspect:.3g}), exact={self.exact})"
        )

    def _place_block(self, mask: np.ndarray, max_mask_patches: int, rng) -> int:
        """Try to place one block adding 1..max_mask_patches new patches; return how many it added."""
        for _ in range(_TRIES_PER_BLOCK):
            target_area = rng.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < h < self.height and 0 < w < self.width:
                top = rng.randint(0, self.height - h)
                left = rng.randint(0, self.width - w)
                block = mask[top : top + h, left : left + w]
                new = h * w - int(np.count_nonzero(block))
                if 0 < new <= max_mask_patches:
                    block[...] = True
                    return new
        return 0

    def _grow(self, mask: np.ndarray, missing: int, rng) -> None:
        """Add ``missing`` patches, each next to an already masked one when there is any."""
        for _ in range(missing):
            if mask.any():
                neighbours = np.zeros_like(mask)
                neighbours[1:, :] |= mask[:-1, :]
                neighbours[:-1, :] |= mask[1:, :]
                neighbours[:, 1:] |= mask[:, :-1]
                neighbours[:, :-1] |= mask[:, 1:]
                candidates = np.flatnonzero(neighbours & ~mask)
            else:
                candidates = np.flatnonzero(~mask)
            mask.flat[candidates[rng.randrange(len(candidates))]] = True

    def __call__(self) -> torch.Tensor:
        rng = self._rng if self._rng is not None else random
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < self.num_masking_patches:
            remaining = min(self.num_masking_patches - count, self.max_num_patches)
            added = self._place_block(mask, remaining, rng)
            if added == 0:
                break
            count += added
        if self.exact and count < self.num_masking_patches:
            self._grow(mask, self.num_masking_patches - count, rng)
        return torch.from_numpy(mask)


class RandomSplitGenerator:
    """Draw SplitMask's random split of the patches into two disjoint halves (El-Nouby et al.,
    arXiv 2112.10740, section 5.5): a mask and its complement. Calling it returns a ``torch.bool``
    grid of ``input_size``, ``True`` on half B; half A is the rest, so the two halves are disjoint
    and cover every patch by construction. The same interface as :class:`BlockwiseMaskGenerator`,
    so :class:`~beit_lightning.data.BeitPretrainTransform` draws it in the data workers, from the
    same per-worker, per-rank seeded generators.

    Args:
        input_size: the patch grid, ``int`` for square or ``(height, width)``.
        num_masking_patches: patches in half B; ``None``: half of the grid, rounded down (the
            paper's 50%). Every split has exactly this many, so halves batch.
        min_num_patches, max_num_patches, min_aspect, max_aspect: blockwise drawing of half B as
            BEiT's masking (the paper: blocks of 16 to 75 patches).
        blockwise: ``True``: half B is BEiT's blockwise mask, topped up to the exact count at block
            borders (:class:`BlockwiseMaskGenerator` with ``exact=True``); ``False``: a uniform random
            subset (the paper's "uniform masking" for its smallest data sets).
        seed: seed of a private random stream (``None``: the global ``random`` module).
    """

    def __init__(
        self,
        input_size: int | Sequence[int],
        num_masking_patches: int | None = None,
        min_num_patches: int = 16,
        max_num_patches: int | None = 75,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        *,
        blockwise: bool = True,
        seed: int | None = None,
    ) -> None:
        size = (input_size, input_size) if isinstance(input_size, int) else tuple(int(s) for s in input_size)
        total = size[0] * size[1] if len(size) == 2 else 0
        count = total // 2 if num_masking_patches is None else int(num_masking_patches)
        if not 0 < count < total:
            raise ValueError(
                f"a split needs patches in both halves: num_masking_patches={count} on a grid of {total} patches; "
                f"choose 1..{total - 1} (null: half, {total // 2})"
            )
        if max_num_patches is not None:
            max_num_patches = max(int(max_num_patches), int(min_num_patches))
        self.blocks = BlockwiseMaskGenerator(size, count, min(min_num_patches, count), max_num_patches, min_aspect,
                                             max_aspect, exact=True, seed=seed)
        self.blockwise = bool(blockwise)

    @property
    def input_size(self) -> tuple[int, int]:
        return self.blocks.input_size

    @property
    def num_masking_patches(self) -> int:
        return self.blocks.num_masking_patches

    def seed(self, seed: int) -> None:
        """Give the generator a private random stream (e.g. per worker and rank)."""
        self.blocks.seed(seed)

    def __repr__(self) -> str:
        kind = "blockwise" if self.blockwise else "uniform"
        return f"{type(self).__name__}(input_size={self.input_size}, half_b={self.num_masking_patches}, {kind})"

    def __call__(self) -> torch.Tensor:
        if self.blockwise:
            return self.blocks()
        rng = self.blocks._rng if self.blocks._rng is not None else random
        mask = np.zeros(self.blocks.num_patches, dtype=bool)
        mask[rng.sample(range(self.blocks.num_patches), self.num_masking_patches)] = True
        return torch.from_numpy(mask.reshape(self.input_size))


class RandomMaskGenerator(MaskGrid):
    """Draw uniformly random masks: exactly ``num_masking_patches`` patches, every subset of that
    size equally likely. The BEiT paper's "- blockwise masking" ablation (Table 4): the same number
    of masked patches as :class:`BlockwiseMaskGenerator`, without the blocks. The same interface,
    so the data modules draw it in their workers from the same per-worker, per-rank seeds.

    Args:
        input_size: the patch grid, ``int`` for square or ``(height, width)``.
        num_masking_patches: how many patches to mask.
        seed: seed of a private random stream (``None``: the global ``random`` module).
    """

    def __repr__(self) -> str:
        return f"{type(self).__name__}(input_size={self.input_size}, num_masking_patches={self.num_masking_patches})"

    def __call__(self) -> torch.Tensor:
        rng = self._rng if self._rng is not None else random
        mask = np.zeros(self.num_patches, dtype=bool)
        mask[rng.sample(range(self.num_patches), self.num_masking_patches)] = True
        return torch.from_numpy(mask.reshape(self.input_size))
