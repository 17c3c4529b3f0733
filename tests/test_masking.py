import random

import pytest
import torch

from beit_lightning.data import BlockwiseMaskGenerator


def _components(mask: torch.Tensor) -> list[int]:
    """Sizes of 4-connected components of a boolean grid."""
    h, w = mask.shape
    seen = torch.zeros_like(mask)
    sizes = []
    for i in range(h):
        for j in range(w):
            if mask[i, j] and not seen[i, j]:
                stack, size = [(i, j)], 0
                seen[i, j] = True
                while stack:
                    a, b = stack.pop()
                    size += 1
                    for c, d in ((a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)):
                        if 0 <= c < h and 0 <= d < w and mask[c, d] and not seen[c, d]:
                            seen[c, d] = True
                            stack.append((c, d))
                sizes.append(size)
    return sizes


def test_beit_setting_masks_exactly_75_of_196_in_blocks():
    gen = BlockwiseMaskGenerator(14, 75, min_num_patches=16)
    for _ in range(300):
        mask = gen()
        assert mask.shape == (14, 14) and mask.dtype == torch.bool
        assert int(mask.sum()) == 75
        # blockwise: few large connected regions, never scattered single patches
        sizes = _components(mask)
        assert len(sizes) <= 5
        assert max(sizes) >= 16


def test_official_mode_stops_short_like_the_reference_code():
    """exact=False reproduces the official generator's behaviour: never more than asked, about
    74.5 of 75 on average (it stops when no block fits)."""
    gen = BlockwiseMaskGenerator(14, 75, min_num_patches=16, exact=False)
    counts = [int(gen().sum()) for _ in range(2000)]
    assert max(counts) == 75
    assert 73.5 < sum(counts) / len(counts) < 75


def test_blocks_respect_aspect_bounds():
    """One block placed on an empty grid is a rectangle whose side ratio lies within
    [min_aspect, max_aspect], up to the rounding of each side to whole patches."""
    gen = BlockwiseMaskGenerator(14, 75, min_num_patches=16, min_aspect=0.5, max_aspect=2.0)
    rng = random.Random(0)
    placed = 0
    for _ in range(500):
        mask = torch.zeros(14, 14, dtype=torch.bool).numpy()
        added = gen._place_block(mask, 75, rng)
        if not added:
            continue
        mask = torch.from_numpy(mask)
        rows = torch.nonzero(mask.any(1)).flatten()
        cols = torch.nonzero(mask.any(0)).flatten()
        h, w = len(rows), len(cols)
        assert added == int(mask.sum()) == h * w, "a block must be a full rectangle"
        assert 12 <= h * w <= 75  # area drawn in [16, 75], then each side rounded
        assert (h - 0.5) / (w + 0.5) <= 2.0 and (h + 0.5) / (w - 0.5) >= 0.5
        placed += 1
    assert placed > 400


def test_reproducible_with_seed_and_different_across_seeds():
    a = [BlockwiseMaskGenerator(14, 75, 16, seed=3)() for _ in range(1)]
    gen1, gen2, gen3 = (BlockwiseMaskGenerator(14, 75, 16, seed=s) for s in (3, 3, 4))
    m1 = torch.stack([gen1() for _ in range(20)])
    m2 = torch.stack([gen2() for _ in range(20)])
    m3 = torch.stack([gen3() for _ in range(20)])
    assert torch.equal(m1, m2) and torch.equal(m1[0], a[0])
    assert not torch.equal(m1, m3)
    # without a private seed, the global random module (seeded per worker) drives it
    random.seed(7)
    g = BlockwiseMaskGenerator(14, 75, 16)
    x = torch.stack([g() for _ in range(5)])
    random.seed(7)
    assert torch.equal(x, torch.stack([g() for _ in range(5)]))


@pytest.mark.parametrize("count", [0, 1, 150, 195, 196])
def test_edge_counts(count):
    gen = BlockwiseMaskGenerator(14, count, min_num_patches=16)
    for _ in range(20):
        assert int(gen().sum()) == count


def test_non_square_grid_and_growth_stays_blocky():
    gen = BlockwiseMaskGenerator((6, 20), 48, min_num_patches=4)
    for _ in range(100):
        mask = gen()
        assert mask.shape == (6, 20)
        assert int(mask.sum()) == 48
    # a grid with one row can only be filled by growth; it must still be exact and contiguous-ish
    line = BlockwiseMaskGenerator((1, 10), 4, min_num_patches=1)()
    assert int(line.sum()) == 4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(input_size=14, num_masking_patches=197), "impossible"),
        (dict(input_size=14, num_masking_patches=-1), "impossible"),
        (dict(input_size=(0, 14), num_masking_patches=0), "input_size"),
        (dict(input_size=14, num_masking_patches=75, min_num_patches=0), "min_num_patches"),
        (dict(input_size=14, num_masking_patches=75, min_num_patches=16, max_num_patches=8), "max_num_patches"),
        (dict(input_size=14, num_masking_patches=75, min_aspect=0.0), "aspect"),
        (dict(input_size=14, num_masking_patches=75, min_aspect=2.0, max_aspect=1.0), "aspect"),
    ],
)
def test_impossible_settings_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BlockwiseMaskGenerator(**kwargs)
