"""BEiT pre-training data throughput: official pipeline vs ours (exact and fast paths), on
ImageNet-size photographs.

Each sample: read, decode JPEG, two views (224px bicubic + 112px lanczos from one shared
random-resized crop, colour jitter 0.4, flip), blockwise mask.

(a) official: ``torchvision.datasets.ImageFolder`` (PIL decode + ``convert("RGB")``) and an
    equivalent of unilm's ``DataAugmentationForBEiT`` (``ColorJitter(0.4, 0.4, 0.4)``,
    ``RandomHorizontalFlip``, ``RandomResizedCropAndInterpolationWithTwoPic``, ``ToTensor`` +
    ``Normalize``) and the mask generator;
(b) ours, exact: ``ImageFolderDataModule(fast_decode=False)``'s data set and transform;
(c) ours, fast (the default): ``ImageFolderDataModule(fast_decode=True)``: the file's bytes,
    opened undecoded and decoded inside ``BeitPretrainTransform(fast_decode=True)``.

Per core (default): one process, one torch thread, no DataLoader workers, each path reading
through its real data set (``dataset[i]``); the three paths alternate every ``--chunk`` images over
the same files so that a busy machine slows them alike; each epoch's time per path is the sum of
its chunks, and the median epoch and the same-run ratios are reported.

``--workers N``: each path through a ``DataLoader`` with N worker processes (batch 32), one
epoch after a warm-up epoch, paths alternating, ``--repeats`` rounds.

``--candidates``: decoders and resizers measured against Pillow on the same crops (time and
pixel difference): Pillow, torchvision ``decode_jpeg``, simplejpeg, PyTurboJPEG, OpenCV (the
ones installed), Pillow's ``reducing_gap``, torchvision's uint8 antialiased resize, OpenCV's
resize, and the 112px view computed from the 224px one.

``--diff``: pixel difference of the fast path against the exact path (same seeds), per view.

Without ``--folder``, photograph-like JPEGs (:func:`beit_lightning.data.photos.natural_jpeg`:
dead leaves + 1/f noise, correlated colours, 500x375 / 500x333 / 375x500, quality 90,
deterministic from the seed) are written to a temporary folder.

    python benchmarks/data_throughput.py --n 300 --repeats 5
    python benchmarks/data_throughput.py --n 300 --workers 2
    python benchmarks/data_throughput.py --candidates --diff --n 60
    python benchmarks/data_throughput.py --folder /data/imagenet/train --n 1000
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T
from torchvision.datasets import ImageFolder
from torchvision.transforms import functional as TF

from beit_lightning.data import BeitPretrainTransform, BlockwiseMaskGenerator, ImageFolderDataModule
from beit_lightning.data.photos import natural_jpeg

SIZES = ((500, 375), (500, 333), (375, 500))
OFFICIAL = "(a) official: ImageFolder + DataAugmentationForBEiT"


def make_jpeg_tree(root: str, n: int, seed: int = 0) -> None:
    """``n`` photograph-like JPEGs (quality 90) in 10 class folders under ``root``."""
    for i in range(n):
        folder = os.path.join(root, f"class{i % 10}")
        os.makedirs(folder, exist_ok=True)
        w, h = SIZES[i % len(SIZES)]
        with open(os.path.join(folder, f"{i:06d}.JPEG"), "wb") as f:
            f.write(natural_jpeg(w, h, seed=seed * 1_000_003 + i))


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


def datasets(root: str, n: int) -> dict[str, torch.utils.data.Dataset]:
    """The three paths' data sets over the first ``n`` images of ``root``/train (or ``root``)."""
    train = os.path.join(root, "train") if os.path.isdir(os.path.join(root, "train")) else root
    official = ImageFolder(train, transform=OfficialBeitAugmentation(BlockwiseMaskGenerator(14, 75, min_num_patches=16)))
    official.samples = official.samples[:n]
    out: dict[str, torch.utils.data.Dataset] = {OFFICIAL: official}
    for name, fast in (("(b) ours, exact (fast_decode=false)", False), ("(c) ours, fast (fast_decode=true, default)", True)):
        dm = ImageFolderDataModule(root=os.path.dirname(train), train_dir=os.path.basename(train), val_dir=None,
                                   fast_decode=fast, num_workers=0, batch_size=32, persistent_workers=False)
        dm.setup("fit")
        dm.train_set.images.files = list(official.samples)  # the same files in the same order
        out[name] = dm.train_set
    return out


def per_core(sets: dict, repeats: int, chunk: int) -> None:
    n = min(len(s) for s in sets.values())

    def run(ds, lo: int, hi: int) -> None:
        for i in range(lo, hi):
            ds[i]

    for ds in sets.values():  # warm the page cache and lazy imports
        run(ds, 0, n)
    times: dict[str, list[float]] = {name: [] for name in sets}
    for _ in range(repeats):
        epoch = dict.fromkeys(sets, 0.0)
        for lo in range(0, n, chunk):
            for name, ds in sets.items():
                start = time.perf_counter()
                run(ds, lo, min(n, lo + chunk))
                epoch[name] += time.perf_counter() - start
        for name, t in epoch.items():
            times[name].append(t)
    report(times, n, f"per core: one process, one torch thread, median of {repeats} epochs, alternating every {chunk} images")


def with_workers(sets: dict, workers: int, repeats: int) -> None:
    n = min(len(s) for s in sets.values())
    times: dict[str, list[float]] = {name: [] for name in sets}
    loaders = {name: DataLoader(ds, batch_size=32, num_workers=workers, persistent_workers=True) for name, ds in sets.items()}
    for loader in loaders.values():
        for _ in loader:  # warm-up epoch: workers started, files cached
            pass
    for _ in range(repeats):
        for name, loader in loaders.items():
            start = time.perf_counter()
            count = sum(len(b[1]) if isinstance(b, list) else len(b["label"]) for b in loader)
            times[name].append(time.perf_counter() - start)
            assert count == n, (name, count, n)
    report(times, n, f"{workers} DataLoader worker processes, batch 32, median of {repeats} epochs")


def report(times: dict[str, list[float]], n: int, how: str) -> None:
    print(how)
    base = times[OFFICIAL]
    for name, t in times.items():
        med = statistics.median(t)
        ratios = sorted(b / x for b, x in zip(base, t, strict=True))
        print(f"  {name:45s} {n / med:7.1f} samples/s ({1e3 * med / n:5.2f} ms)  {statistics.median(base) / med:4.2f}x official "
              f"(per-epoch ratios {ratios[0]:.2f}-{ratios[-1]:.2f})")


def _best(fn: Callable[[int], object], n: int, reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        for i in range(n):
            fn(i)
        best = min(best, (time.perf_counter() - start) / n)
    return best


def _levels(outs, refs) -> str:
    d = [np.abs(np.asarray(o, np.float32) - np.asarray(r, np.float32)).mean() for o, r in zip(outs, refs, strict=True)]
    return f"mean {np.mean(d):.2f}, worst image {np.max(d):.2f} levels"


def candidates(blobs: list[bytes]) -> None:
    """Time per image (best of 3) and pixel difference against Pillow of each installed candidate."""
    from torchvision.io import decode_jpeg
    from torchvision.transforms.v2 import functional as F2

    n = len(blobs)
    torch.manual_seed(0)
    crops = [T.RandomResizedCrop.get_params(Image.open(io.BytesIO(b)), (0.08, 1.0), (3 / 4, 4 / 3)) for b in blobs]
    pils = [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs]
    arrays = [np.asarray(p) for p in pils]
    boxes = [(left, top, left + w, top + h) for top, left, h, w in crops]
    rows: list[tuple[str, float, str]] = []

    def add(name: str, fn, outs=None, refs=None) -> None:
        rows.append((name, _best(fn, n), _levels(outs, refs) if outs is not None else ""))

    def tv_decode(i: int) -> torch.Tensor:
        return decode_jpeg(torch.frombuffer(bytearray(blobs[i]), dtype=torch.uint8))

    add("decode: Pillow open + convert(RGB) (official)", lambda i: Image.open(io.BytesIO(blobs[i])).convert("RGB"))
    add("decode: torchvision.io.decode_jpeg", tv_decode, [tv_decode(i).permute(1, 2, 0) for i in range(n)], pils)
    try:
        import simplejpeg

        add("decode: simplejpeg", lambda i: simplejpeg.decode_jpeg(blobs[i], colorspace="RGB"),
            [simplejpeg.decode_jpeg(b, colorspace="RGB") for b in blobs], pils)
        add("decode: simplejpeg fastdct+fastupsample",
            lambda i: simplejpeg.decode_jpeg(blobs[i], colorspace="RGB", fastdct=True, fastupsample=True),
            [simplejpeg.decode_jpeg(b, colorspace="RGB", fastdct=True, fastupsample=True) for b in blobs], pils)
    except ImportError:
        rows.append(("decode: simplejpeg", float("nan"), "not installed"))
    try:
        from turbojpeg import TJPF_RGB, TurboJPEG

        jpeg = TurboJPEG()
        add("decode: PyTurboJPEG", lambda i: jpeg.decode(blobs[i], pixel_format=TJPF_RGB))
    except Exception as err:  # noqa: BLE001 - not installed, or no libturbojpeg on the system
        rows.append(("decode: PyTurboJPEG", float("nan"), f"unavailable ({type(err).__name__})"))
    try:
        import cv2

        cv2.setNumThreads(1)
        add("decode: cv2.imdecode (BGR)", lambda i: cv2.imdecode(np.frombuffer(blobs[i], np.uint8), cv2.IMREAD_COLOR))
    except ImportError:
        cv2 = None
        rows.append(("decode/resize: OpenCV", float("nan"), "not installed"))

    ref224 = [pils[i].resize((224, 224), Image.BICUBIC, box=boxes[i]) for i in range(n)]
    ref112 = [pils[i].resize((112, 112), Image.LANCZOS, box=boxes[i]) for i in range(n)]

    def tv224(i: int) -> torch.Tensor:
        top, left, h, w = crops[i]
        x = torch.from_numpy(arrays[i]).permute(2, 0, 1)[:, top : top + h, left : left + w]
        return F2.resize(x, [224, 224], interpolation=T.InterpolationMode.BICUBIC, antialias=True)

    add("224 bicubic: Pillow resize(box) (official)", lambda i: pils[i].resize((224, 224), Image.BICUBIC, box=boxes[i]))
    add("224 bicubic: torchvision uint8 antialias", tv224, [tv224(i).permute(1, 2, 0) for i in range(n)], ref224)
    add("224 bicubic: Pillow reducing_gap=2", lambda i: pils[i].resize((224, 224), Image.BICUBIC, box=boxes[i], reducing_gap=2.0),
        [pils[i].resize((224, 224), Image.BICUBIC, box=boxes[i], reducing_gap=2.0) for i in range(n)], ref224)
    if cv2 is not None:
        def cv(i: int, size: int, mode: int) -> np.ndarray:
            top, left, h, w = crops[i]
            return cv2.resize(arrays[i][top : top + h, left : left + w], (size, size), interpolation=mode)

        add("224: cv2 INTER_CUBIC (no antialias)", lambda i: cv(i, 224, cv2.INTER_CUBIC),
            [cv(i, 224, cv2.INTER_CUBIC) for i in range(n)], ref224)
        add("224: cv2 INTER_AREA", lambda i: cv(i, 224, cv2.INTER_AREA), [cv(i, 224, cv2.INTER_AREA) for i in range(n)], ref224)
        add("112: cv2 INTER_LANCZOS4 from the crop", lambda i: cv(i, 112, cv2.INTER_LANCZOS4),
            [cv(i, 112, cv2.INTER_LANCZOS4) for i in range(n)], ref112)
    views = [Image.fromarray(tv224(i).permute(1, 2, 0).contiguous().numpy()) for i in range(n)]
    add("112 lanczos: Pillow resize(box) from the crop (official)", lambda i: pils[i].resize((112, 112), Image.LANCZOS, box=boxes[i]))
    for gap in (2.0, 1.0):
        add(f"112 lanczos: Pillow reducing_gap={gap:g}", lambda i, g=gap: pils[i].resize((112, 112), Image.LANCZOS, box=boxes[i], reducing_gap=g),
            [pils[i].resize((112, 112), Image.LANCZOS, box=boxes[i], reducing_gap=gap) for i in range(n)], ref112)
    add("112 lanczos: Pillow from the 224px view", lambda i: views[i].resize((112, 112), Image.LANCZOS),
        [v.resize((112, 112), Image.LANCZOS) for v in views], ref112)
    print(f"candidates on {n} images (time per image, best of 3; difference against the Pillow row of the same step)")
    for name, t, diff in rows:
        print(f"  {name:58s} {1e3 * t:6.2f} ms  {diff}")


def pixel_difference(blobs: list[bytes]) -> None:
    """Fast path against the exact path with the same seeds: mean |difference| per view in 8-bit
    levels (mean over images, worst image, and the 99.9th percentile of single pixels)."""
    for jitter in (0.0, 0.4):
        exact = BeitPretrainTransform(224, 112, color_jitter=jitter)
        fast = BeitPretrainTransform(224, 112, color_jitter=jitter, fast_decode=True)
        per_view: list[list[np.ndarray]] = [[], []]
        for seed, blob in enumerate(blobs):
            torch.manual_seed(seed)
            a = exact(Image.open(io.BytesIO(blob)).convert("RGB"))
            torch.manual_seed(seed)
            b = fast(Image.open(io.BytesIO(blob)))
            per_view[0].append(((a["image"] - b["image"]).abs() * 127.5).numpy())
            per_view[1].append(((a["tokenizer_image"] - b["tokenizer_image"]).abs() * 255).numpy())
        for name, diffs in zip(("224px view", "112px view"), per_view, strict=True):
            means = [d.mean() for d in diffs]
            p999 = np.percentile(np.concatenate([d.ravel() for d in diffs]), 99.9)
            print(f"  jitter {jitter}: {name}: mean {np.mean(means):.2f}, worst image {np.max(means):.2f}, "
                  f"pixel p99.9 {p999:.1f} levels")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", help="an ImageFolder tree of real JPEGs (default: generated photographs)")
    parser.add_argument("--n", type=int, default=300, help="images (generated, or the first n of --folder)")
    parser.add_argument("--repeats", type=int, default=5, help="timed epochs per path (median reported)")
    parser.add_argument("--chunk", type=int, default=10, help="images per turn when the paths alternate")
    parser.add_argument("--workers", type=int, default=0, help="also measure through DataLoaders with this many workers")
    parser.add_argument("--candidates", action="store_true", help="time decoders/resizers against Pillow")
    parser.add_argument("--diff", action="store_true", help="pixel difference of the fast path to the exact path")
    parser.add_argument("--no-per-core", action="store_true", help="skip the per-core measurement")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.folder or tmp
        if args.folder is None:
            make_jpeg_tree(os.path.join(tmp, "train"), args.n)
        sets = datasets(root, args.n)
        paths = [p for p, _ in sets[OFFICIAL].samples]
        sizes = [Image.open(p).size for p in paths]
        kb = np.mean([os.path.getsize(p) for p in paths]) / 1e3
        print(f"{len(paths)} JPEGs ({'generated photographs' if args.folder is None else root}), mean "
              f"{np.mean([s[0] for s in sizes]):.0f}x{np.mean([s[1] for s in sizes]):.0f} px, {kb:.0f} kB")
        if args.candidates or args.diff:
            blobs = [Path(p).read_bytes() for p in paths[:60]]
            if args.candidates:
                candidates(blobs)
            if args.diff:
                print(f"fast path against the exact path, {len(blobs)} images:")
                pixel_difference(blobs)
        if not args.no_per_core:
            per_core(sets, args.repeats, args.chunk)
        if args.workers:
            with_workers(sets, args.workers, args.repeats)


if __name__ == "__main__":
    main()
