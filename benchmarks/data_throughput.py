"""Samples per second of one data-loader worker process for BEiT pre-training data: read, decode JPEG,
two views (224px bicubic + 112px lanczos from one random-resized crop, color jitter, flip),
blockwise mask. Our webdataset shards (``ShardStream``) against a ``torchvision.datasets.ImageFolder``
of the same JPEG files with the same transform, in one run, plus the cost of each step.

Images are generated at ImageNet-like size (500x375, JPEG quality 90, ~100 kB with noise).

    python benchmarks/data_throughput.py --n 600
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder

from beit_lightning.data import BeitPretrainTransform, BlockwiseMaskGenerator, ShardStream
from beit_lightning.data.generated import CLASS_NAMES, draw_shape_image
from beit_lightning.data.shards import folder_records, write_shards


def make_jpeg_tree(root: str, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        label = i % len(CLASS_NAMES)
        img = draw_shape_image(label, 448, rng).resize((500, 375), Image.BICUBIC)
        noisy = np.clip(np.asarray(img, dtype=np.int16) + rng.integers(-20, 21, (375, 500, 3)), 0, 255).astype(np.uint8)
        folder = os.path.join(root, CLASS_NAMES[label])
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(noisy).save(os.path.join(folder, f"{i:06d}.JPEG"), quality=90)


class FolderSamples(Dataset):
    """ImageFolder samples through the same transform, as batch dicts."""

    def __init__(self, images: ImageFolder, transform) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        img, label = self.images[index]
        sample = self.transform(img)
        sample["label"] = torch.tensor(label)
        return sample


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:7.1f} samples/s ({1e3 * seconds / n:6.2f} ms/sample)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--samples-per-shard", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="timed epochs per loader (best is reported)")
    args = parser.parse_args()
    mask = BlockwiseMaskGenerator(14, 75, min_num_patches=16)
    transform = BeitPretrainTransform(224, 112, mask)

    with tempfile.TemporaryDirectory() as tmp:
        tree, shards = os.path.join(tmp, "train"), os.path.join(tmp, "shards")
        make_jpeg_tree(tree, args.n)
        records, _, classes = folder_records(tree, progress=False)
        write_shards(records, shards, classes=classes, samples_per_shard=args.samples_per_shard, metadata=False)
        sizes = [os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tree) for f in fs]
        print(f"{args.n} JPEGs of 500x375, mean {np.mean(sizes) / 1e3:.0f} kB; one DataLoader worker process, "
              f"batch {args.batch_size}, best of {args.repeats} epochs")

        urls = sorted(os.path.join(shards, f) for f in os.listdir(shards) if f.endswith(".tar"))
        stream = ShardStream(urls, transform, samples_per_epoch=args.n, batch_size=args.batch_size, num_workers=1,
                             shuffle_buffer=200)
        folder = FolderSamples(ImageFolder(tree), transform)
        loaders = {
            "webdataset shards (ours)": DataLoader(stream, batch_size=args.batch_size, num_workers=1),
            "torchvision ImageFolder": DataLoader(folder, batch_size=args.batch_size, num_workers=1, shuffle=True),
        }

        def epoch(loader) -> tuple[int, float]:
            start = time.perf_counter()
            count = sum(len(batch["label"]) for batch in loader)
            return count, time.perf_counter() - start

        for loader in loaders.values():  # warm the page cache and the worker start-up paths
            epoch(loader)
        timings = {name: [] for name in loaders}
        for _ in range(args.repeats):
            for name, loader in loaders.items():
                timings[name].append(epoch(loader))
        best = {name: min(t, key=lambda x: x[1]) for name, t in timings.items()}
        for name, (count, seconds) in best.items():
            print(f"{name:27s}: {rate(count, seconds)}")
        t_shards, t_folder = best["webdataset shards (ours)"][1], best["torchvision ImageFolder"][1]
        print(f"ratio (ImageFolder time / shards time): {t_folder / t_shards:.2f}x")

        # where the time goes, on the same files
        paths = [p for p, _ in folder.images.samples]
        start = time.perf_counter()
        blobs = [Path(p).read_bytes() for p in paths]
        t_read = time.perf_counter() - start
        start = time.perf_counter()
        images = []
        for b in blobs:
            with Image.open(io.BytesIO(b)) as img:
                images.append(img.convert("RGB"))
        t_decode = time.perf_counter() - start
        views = BeitPretrainTransform(224, 112, None)
        start = time.perf_counter()
        for img in images:
            views(img)
        t_views = time.perf_counter() - start
        jitter_free = BeitPretrainTransform(224, 112, None, color_jitter=0.0)
        start = time.perf_counter()
        for img in images:
            jitter_free(img)
        t_no_jitter = time.perf_counter() - start
        start = time.perf_counter()
        for _ in images:
            mask()
        t_mask = time.perf_counter() - start
        n = len(images)
        total = t_read + t_decode + t_views + t_mask
        print("per step (ms/sample, share of the sum):")
        for name, t in (("read file", t_read), ("decode JPEG", t_decode), ("two views", t_views), ("blockwise mask", t_mask)):
            print(f"  {name:15s} {1e3 * t / n:6.2f}  {100 * t / total:5.1f}%")
        print(f"  (of the two views, color jitter is {1e3 * (t_views - t_no_jitter) / n:.2f} ms)")


if __name__ == "__main__":
    main()
