"""Cost of one blockwise mask (BEiT setting: 75 of 14x14, min block 16), ours against a
per-patch-loop implementation of the official algorithm (BEiT's ``MaskingGenerator``, written
here from the paper's Algorithm 1 with NumPy's int grid; the official file itself uses ``np.int``,
which NumPy no longer has).

    python benchmarks/masking.py --n 20000
"""

from __future__ import annotations

import argparse
import math
import random
import time

import numpy as np

from beit_lightning.data import BlockwiseMaskGenerator


class LoopMaskingGenerator:
    """The official generator's structure: Python loops over every patch of each block."""

    def __init__(self, size=14, count=75, min_patches=16, min_aspect=0.3):
        self.height = self.width = size
        self.count, self.min_patches = count, min_patches
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

    def _mask(self, mask, max_patches):
        delta = 0
        for _ in range(10):
            area = random.uniform(self.min_patches, max_patches)
            aspect = math.exp(random.uniform(*self.log_aspect))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if w < self.width and h < self.height:
                top, left = random.randint(0, self.height - h), random.randint(0, self.width - w)
                masked = mask[top : top + h, left : left + w].sum()
                if 0 < h * w - masked <= max_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
                if delta > 0:
                    break
        return delta

    def __call__(self):
        mask = np.zeros((self.height, self.width), dtype=np.int64)
        count = 0
        while count < self.count:
            delta = self._mask(mask, self.count - count)
            if delta == 0:
                break
            count += delta
        return mask


def time_per_call(fn, n):
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=20000)
    args = parser.parse_args()
    random.seed(0)
    ours_exact = BlockwiseMaskGenerator(14, 75, min_num_patches=16)
    ours_official = BlockwiseMaskGenerator(14, 75, min_num_patches=16, exact=False)
    loop = LoopMaskingGenerator()
    for fn in (ours_exact, ours_official, loop):  # warm up
        time_per_call(fn, 200)
    t_loop = time_per_call(loop, args.n)
    t_exact = time_per_call(ours_exact, args.n)
    t_official = time_per_call(ours_official, args.n)
    mean_loop = np.mean([loop().sum() for _ in range(2000)])
    mean_official = np.mean([int(ours_official().sum()) for _ in range(2000)])
    print(f"per-patch loop reference : {t_loop * 1e6:7.1f} us/mask, {mean_loop:.2f} of 75 masked on average")
    print(f"ours, exact=False        : {t_official * 1e6:7.1f} us/mask, {mean_official:.2f} of 75 ({t_loop / t_official:.1f}x faster)")
    print(f"ours, exact=True (default): {t_exact * 1e6:6.1f} us/mask, always 75 ({t_loop / t_exact:.1f}x faster)")


if __name__ == "__main__":
    main()
