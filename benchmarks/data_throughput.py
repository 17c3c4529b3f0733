"""Samples per second per CPU core of BEiT pre-training data: read, decode JPEG, two views (224px
bicubic + 112px lanczos from one shared random-resized crop, colour jitter 0.4, flip), blockwise
mask. One process, no DataLoader workers, one torch thread; the three paths alternate every
``--chunk`` images over the same files, so that a busy machine slows them alike; each epoch's
time per path is the sum of its chunks, and the median epoch is reported.

(a) official: ``torchvision.datasets.ImageFolder`` (PIL decode + ``convert("RGB")``) and an
    equivalent of unilm's ``DataAugmentationForBEiT`` (``ColorJitter(0.4, 0.4, 0.4)``,
    ``RandomHorizontalFlip``, ``RandomResizedCropAndInterpolationWithTwoPic``, ``ToTensor`` +
    ``Normalize``) and the mask generator;
(b) ours, exact: our decode (``Image.open(...).convert("RGB")``) + ``BeitPretrainTransform``;
(c) ours, fast: ``BeitPretrainTransform(fast_decode=True)`` given the undecoded ``Image.open``.

Without ``--folder``, ImageNet-size JPEGs are generated (500x375 and 468x401, gradients + shapes
+ noise, quality 90) in a temporary folder.

    python benchmarks/data_throughput.py --n 300 --repeats 5
    python benchmarks/data_throughput.py --folder /data/imagenet/train --n 1000
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.datasets import ImageFolder
from torchvision.transforms import functional as TF

from beit_lightning.data import BeitPretrainTransform, BlockwiseMaskGenerator
from beit_lightning.data.generated import CLASS_NAMES, draw_shape_image

SIZES = ((500, 375), (468, 401))


def make_jpeg_tree(root: str, n: int, seed: int = 0) -> None:
    """``n`` ImageNet-size JPEGs (quality 90) in class folders under ``root``."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        label = i % len(CLASS_NAMES)
        w, h = SIZES[i % len(SIZES)]
        img = draw_shape_image(label, 448, rng).resize((w, h), Image.BICUBIC)
        noisy = np.clip(np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (h, w, 3)), 0, 255).astype(np.uint8)
        folder = os.path.join(root, CLASS_NAMES[label])
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(noisy).save(os.path.join(folder, f"{i:06d}.JPEG"), quality=90)


class OfficialBeitAugmentation:
    """unilm ``beit/datasets.py::DataAugmentationForBEiT`` (DALL-E tokenizer, no extra normalisation
    of the tokenizer view: ``map_pixels`` happens in the model step), written with torchvision."""

    def __init__(self, mask: BlockwiseMaskGenerator) -> None:
        self.common = T.Compose([T.ColorJitter(0.4, 0.4, 0.4), T.RandomHorizontalFlip(p=0.5)])
        self.normalize = T.Compose([T.ToTensor(), T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
        self.to_tensor = T.ToTensor()
        self.mask = mask

    def __call__(self, img: Image.Image):
        img = self.common(img)
        i, j, h, w = T.RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3))
        patches = TF.resized_crop(img, i, j, h, w, [224, 224], T.InterpolationMode.BICUBIC)
        tokens = TF.resized_crop(img, i, j, h, w, [112, 112], T.InterpolationMode.LANCZOS)
        return self.normalize(patches), self.to_tensor(tokens), self.mask()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", help="an ImageFolder tree of real JPEGs (default: generated ones)")
    parser.add_argument("--n", type=int, default=300, help="images (generated, or the first n of --folder)")
    parser.add_argument("--repeats", type=int, default=5, help="timed epochs per path (median reported)")
    parser.add_argument("--chunk", type=int, default=10, help="images per turn when the paths alternate")
    args = parser.parse_args()
    torch.set_num_threads(1)
    mask = BlockwiseMaskGenerator(14, 75, min_num_patches=16)
    exact = BeitPretrainTransform(224, 112, mask)
    fast = BeitPretrainTransform(224, 112, mask, fast_decode=True)
    official = OfficialBeitAugmentation(mask)

    with tempfile.TemporaryDirectory() as tmp:
        root = args.folder
        if root is None:
            root = os.path.join(tmp, "train")
            make_jpeg_tree(root, args.n)
        folder = ImageFolder(root)
        paths = [p for p, _ in folder.samples[: args.n]]
        n = len(paths)
        sizes = [Image.open(p).size for p in paths]
        kb = np.mean([os.path.getsize(p) for p in paths]) / 1e3
        print(f"{n} JPEGs ({'generated' if args.folder is None else root}), mean {np.mean([s[0] for s in sizes]):.0f}x"
              f"{np.mean([s[1] for s in sizes]):.0f} px, {kb:.0f} kB; one process, one thread, median of {args.repeats} "
              f"epochs, paths alternating every {args.chunk} images")

        def run_official(chunk: list[str]) -> None:
            for p in chunk:
                official(folder.loader(p))  # torchvision's pil_loader: open + convert("RGB")

        def run_exact(chunk: list[str]) -> None:
            for p in chunk:
                with Image.open(p) as img:
                    exact(img.convert("RGB"))

        def run_fast(chunk: list[str]) -> None:
            for p in chunk:
                with Image.open(p) as img:
                    fast(img)

        runs = {"(a) official: ImageFolder + DataAugmentationForBEiT": run_official,
                "(b) ours, exact path": run_exact,
                "(c) ours, fast_decode=True": run_fast}
        for run in runs.values():  # warm the page cache
            run(paths)
        chunks = [paths[i : i + args.chunk] for i in range(0, n, args.chunk)]
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            epoch = dict.fromkeys(runs, 0.0)
            for chunk in chunks:
                for name, run in runs.items():
                    start = time.perf_counter()
                    run(chunk)
                    epoch[name] += time.perf_counter() - start
            for name, t in epoch.items():
                times[name].append(t)
        base = statistics.median(times["(a) official: ImageFolder + DataAugmentationForBEiT"])
        for name, t in times.items():
            med = statistics.median(t)
            ratios = sorted(b / x for b, x in zip(times["(a) official: ImageFolder + DataAugmentationForBEiT"], t, strict=True))
            print(f"{name:52s} {n / med:7.1f} samples/s ({1e3 * med / n:5.2f} ms)  {base / med:4.2f}x official "
                  f"(per-epoch ratios {ratios[0]:.2f}-{ratios[-1]:.2f})")


if __name__ == "__main__":
    main()
