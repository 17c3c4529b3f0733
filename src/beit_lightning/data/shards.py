"""Writing webdataset shards: from a folder of images, or from the generated data set.

Each sample is ``<key>.<ext>`` (the original image bytes, unless a maximum side is given, in
which case larger images are re-encoded as JPEG), ``<key>.cls`` (the class index, absent for
unlabeled folders) and optionally ``<key>.json`` (source path, class name, size). Next to the
shards the writer puts ``index.json`` (shards, sample counts, classes, skipped files) and
``classes.txt``. Order is shuffled with a seed and tar headers carry fixed metadata, so the same
input always gives byte-identical shards. Files that cannot be decoded are reported and skipped,
and listed in ``index.json``.

Segmentation samples (``--segmentation``, an ``ADEChallengeData2016``-style split) are
``<key>.jpg`` (the original image bytes), ``<key>.seg.png`` (the label map, lossless, original
values) and ``<key>.json``; the index lists the 150 ADE20K classes.

Command line: ``beit-lightning-shards SRC OUT [--samples-per-shard N] [--max-side S] ...``;
``beit-lightning-shards ROOT OUT --segmentation [--split training]`` for segmentation.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing import Pool

import webdataset as wds
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from tqdm import tqdm

from .class_names import ADE20K_CLASSES

__all__ = [
    "ShardRecord", "ShardSummary", "folder_records", "generated_records", "generated_segmentation_records", "list_images",
    "list_segmentation_pairs", "main", "segmentation_records", "write_shards",
]

#: PIL format -> webdataset extension; other formats are re-encoded as PNG (lossless)
_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
INDEX_FILE = "index.json"
#: webdataset key of a segmentation sample's label map
SEG_KEY = "seg.png"


@dataclass
class ShardRecord:
    """One sample ready to be written: encoded image bytes, their extension, label, metadata, and
    for segmentation the PNG bytes of the label map (``seg``; ``label`` is then -1)."""

    image: bytes
    ext: str
    label: int
    meta: dict = field(default_factory=dict)
    seg: bytes | None = None


@dataclass
class ShardSummary:
    """What :func:`write_shards` wrote."""

    shards: list[dict]
    num_samples: int
    classes: list[str]
    skipped: list[dict]
    out_dir: str

    @property
    def urls(self) -> str:
        """Brace pattern of the written shards (for ``data.train_urls``)."""
        if not self.shards:
            return ""
        names = [s["url"] for s in self.shards]
        prefix = names[0].rsplit("-", 1)[0]
        return os.path.join(self.out_dir, f"{prefix}-{{000000..{len(names) - 1:06d}}}.tar")


def _encode(path: str, max_side: int | None, quality: int) -> tuple[bytes, str, dict]:
    """Read one image file, check that it decodes, re-encode only when needed."""
    with open(path, "rb") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as img:
        fmt = img.format
        size = img.size
        needs_resize = max_side is not None and max(size) > max_side
        if fmt not in _EXTENSIONS or needs_resize:
            img = img.convert("RGB")
            if needs_resize:
                scale = max_side / max(size)
                img = img.resize((max(1, round(size[0] * scale)), max(1, round(size[1] * scale))), Image.BICUBIC)
            out = io.BytesIO()
            if needs_resize or fmt == "JPEG":
                img.save(out, format="JPEG", quality=quality)
                ext = "jpg"
            else:
                img.save(out, format="PNG")
                ext = "png"
            return out.getvalue(), ext, {"width": img.size[0], "height": img.size[1], "source_format": fmt}
        if fmt == "JPEG":
            img.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))  # decode cheaply, still reads all data
        img.load()
    return data, _EXTENSIONS[fmt], {"width": size[0], "height": size[1]}


def _encode_job(job: tuple[str, str, int, int | None, int]) -> tuple[str, str, int, bytes | None, str, dict]:
    path, rel, label, max_side, quality = job
    try:
        data, ext, meta = _encode(path, max_side, quality)
        return path, rel, label, data, ext, meta
    except Exception as err:  # noqa: BLE001 - any unreadable file is reported and skipped
        return path, rel, label, None, "", {"error": f"{type(err).__name__}: {err}"}


def list_images(root: str, labelled: bool | None = None) -> tuple[list[tuple[str, int]], list[str]]:
    """Image files and class names under ``root``.

    ``labelled=None``: class sub-folders (torchvision ImageFolder rules) when there are any, else
    every image of the tree with label -1; ``labelled=False``: every image of the tree, label -1.
    """
    classes, class_to_idx = [], {}
    if labelled is not False:
        try:
            classes, class_to_idx = find_classes(root)
        except FileNotFoundError:
            if labelled:
                raise FileNotFoundError(f"no class sub-folders under {root!r}") from None
    if classes:
        return make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True), classes
    files = []
    for dirpath, _, names in sorted(os.walk(root, followlinks=True)):
        files += [(os.path.join(dirpath, n), -1) for n in sorted(names) if n.lower().endswith(IMG_EXTENSIONS)]
    return files, []


def folder_records(
    root: str,
    *,
    labelled: bool | None = None,
    seed: int = 0,
    max_side: int | None = None,
    quality: int = 95,
    workers: int = 1,
    skipped: list[dict] | None = None,
    progress: bool = True,
) -> tuple[Iterator[ShardRecord], int, list[str]]:
    """Records of every image under ``root`` in a seeded shuffled order.

    Returns ``(records, number_of_files, classes)``; unreadable files are appended to
    ``skipped`` and reported on stderr.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root!r}")
    files, classes = list_images(root, labelled)
    if not files:
        raise ValueError(f"no images ({', '.join(IMG_EXTENSIONS)}) found under {root!r}")
    files = sorted(files)
    random.Random(seed).shuffle(files)
    jobs = [(path, os.path.relpath(path, root), label, max_side, quality) for path, label in files]

    def generate() -> Iterator[ShardRecord]:
        pool = Pool(workers) if workers > 1 else None
        try:
            results = pool.imap(_encode_job, jobs, chunksize=16) if pool else map(_encode_job, jobs)
            for path, rel, label, data, ext, meta in tqdm(results, total=len(jobs), disable=not progress, desc="images", unit="img"):
                if data is None:
                    print(f"skipped unreadable image {path}: {meta['error']}", file=sys.stderr)
                    if skipped is not None:
                        skipped.append({"path": rel, "error": meta["error"]})
                    continue
                meta = {"path": rel, **meta}
                if label >= 0:
                    meta["class"] = classes[label]
                yield ShardRecord(data, ext, label, meta)
        finally:
            if pool:
                pool.close()
                pool.join()

    return generate(), len(jobs), classes


def generated_records(num_samples: int, image_size: int = 64, num_classes: int = 10, seed: int = 0, quality: int = 95) -> Iterator[ShardRecord]:
    """The generated data set (:class:`GeneratedImages`) as JPEG records, in index order."""
    from .generated import GeneratedImages

    images = GeneratedImages(num_samples, image_size, num_classes, seed=seed)
    for index in range(num_samples):
        img, label = images[index]
        out = io.BytesIO()
        img.save(out, format="JPEG", quality=quality)
        yield ShardRecord(out.getvalue(), "jpg", label, {"index": index, "class": images.classes[label]})


def list_segmentation_pairs(root: str, split: str) -> tuple[list[tuple[str, str]], list[str]]:
    """``(image, label map)`` paths of an ``ADEChallengeData2016``-style split
    (``root/images/<split>/*.jpg`` and ``root/annotations/<split>/*.png``), matched by file stem and
    sorted; also the images without a label map.

    Raises:
        FileNotFoundError: naming the folder when the images or the annotations folder is missing.
        ValueError: when no image has a label map.
    """
    image_dir, label_dir = os.path.join(root, "images", split), os.path.join(root, "annotations", split)
    for folder in (image_dir, label_dir):
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"no folder {folder!r}: expected the ADEChallengeData2016 layout, <root>/images/{split}/*.jpg and "
                f"<root>/annotations/{split}/*.png (set the data root to the ADEChallengeData2016 folder)"
            )
    labels = {os.path.splitext(n)[0]: os.path.join(label_dir, n) for n in os.listdir(label_dir) if n.lower().endswith(".png")}
    pairs, unlabelled = [], []
    for name in sorted(os.listdir(image_dir)):
        if not name.lower().endswith(IMG_EXTENSIONS):
            continue
        label = labels.get(os.path.splitext(name)[0])
        if label is None:
            unlabelled.append(os.path.join(image_dir, name))
        else:
            pairs.append((os.path.join(image_dir, name), label))
    if not pairs:
        raise ValueError(f"no image of {image_dir!r} has a label map (same file name, .png) in {label_dir!r}")
    return pairs, unlabelled


def _encode_label(path: str) -> tuple[bytes, dict]:
    """A label map's PNG bytes (the file's own when it is a PNG of one channel, else re-encoded
    losslessly), after checking that it decodes to one channel."""
    with open(path, "rb") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as label:
        label.load()
        if label.mode not in ("L", "P", "I", "I;16", "1"):
            raise ValueError(f"a label map must have one channel; got PIL mode {label.mode}")
        if label.format != "PNG":
            out = io.BytesIO()
            label.save(out, format="PNG")
            data = out.getvalue()
        return data, {"width": label.size[0], "height": label.size[1]}


def _encode_pair_job(job: tuple[str, str, str, int]) -> tuple[str, str, bytes | None, str, bytes | None, dict]:
    image_path, label_path, rel, quality = job
    current = image_path
    try:
        data, ext, meta = _encode(image_path, None, quality)
        current = label_path
        seg, label_meta = _encode_label(label_path)
        if (label_meta["width"], label_meta["height"]) != (meta["width"], meta["height"]):
            raise ValueError(f"label map {label_meta['width']}x{label_meta['height']} differs from the image's "
                             f"{meta['width']}x{meta['height']}")
        return image_path, rel, data, ext, seg, meta
    except Exception as err:  # noqa: BLE001 - any unreadable pair is reported and skipped
        return current, rel, None, "", None, {"error": f"{type(err).__name__}: {err}"}


def segmentation_records(
    root: str,
    split: str = "training",
    *,
    seed: int = 0,
    workers: int = 1,
    skipped: list[dict] | None = None,
    progress: bool = True,
) -> tuple[Iterator[ShardRecord], int]:
    """Records (image bytes as they are + label-map PNG) of an ``ADEChallengeData2016``-style split
    (see :func:`list_segmentation_pairs`) in a seeded shuffled order.

    Returns ``(records, number_of_pairs)``; unreadable pairs (image or label map) and images
    without a label map are appended to ``skipped`` and reported on stderr.
    """
    pairs, unlabelled = list_segmentation_pairs(root, split)
    for path in unlabelled:
        print(f"skipped image without a label map: {path}", file=sys.stderr)
        if skipped is not None:
            skipped.append({"path": os.path.relpath(path, root), "error": "no label map"})
    random.Random(seed).shuffle(pairs)
    jobs = [(image, label, os.path.relpath(image, root), 95) for image, label in pairs]

    def generate() -> Iterator[ShardRecord]:
        pool = Pool(workers) if workers > 1 else None
        try:
            results = pool.imap(_encode_pair_job, jobs, chunksize=16) if pool else map(_encode_pair_job, jobs)
            for path, rel, data, ext, seg, meta in tqdm(results, total=len(jobs), disable=not progress, desc="pairs", unit="img"):
                if data is None:
                    print(f"skipped unreadable file {path}: {meta['error']}", file=sys.stderr)
                    if skipped is not None:
                        skipped.append({"path": os.path.relpath(path, root), "error": meta["error"]})
                    continue
                yield ShardRecord(data, ext, -1, {"path": rel, **meta}, seg=seg)
        finally:
            if pool:
                pool.close()
                pool.join()

    return generate(), len(jobs)


def generated_segmentation_records(
    num_samples: int, image_size: int = 64, num_classes: int = 7, seed: int = 0, quality: int = 95
) -> Iterator[ShardRecord]:
    """The generated segmentation data (:class:`GeneratedSegmentation`) as JPEG + label-PNG records."""
    from .generated import GeneratedSegmentation

    scenes = GeneratedSegmentation(num_samples, image_size, num_classes, seed=seed)
    for index in range(num_samples):
        img, label = scenes[index]
        out, seg = io.BytesIO(), io.BytesIO()
        img.save(out, format="JPEG", quality=quality)
        Image.fromarray(label).save(seg, format="PNG")
        yield ShardRecord(out.getvalue(), "jpg", -1, {"index": index}, seg=seg.getvalue())


def write_shards(
    records: Iterable[ShardRecord],
    out_dir: str,
    *,
    classes: list[str] | None = None,
    samples_per_shard: int = 1000,
    max_bytes: float | None = None,
    prefix: str = "shard",
    metadata: bool = True,
    skipped: list[dict] | None = None,
) -> ShardSummary:
    """Write ``records`` as ``out_dir/<prefix>-NNNNNN.tar`` shards plus ``index.json``.

    A shard is closed once it holds ``samples_per_shard`` samples or ``max_bytes`` bytes (it can
    pass ``max_bytes`` by one sample). Writing is deterministic: fixed tar metadata, keys from the
    record order. ``index.json`` is written last and atomically, so a folder with an index holds a
    complete set of shards.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1; got {samples_per_shard}")
    os.makedirs(out_dir, exist_ok=True)
    pattern = os.path.join(out_dir, f"{prefix}-%06d.tar")
    counts: list[int] = []
    total = 0
    with wds.ShardWriter(
        pattern, maxcount=samples_per_shard, maxsize=max_bytes or 3e9, verbose=0,
        mtime=0.0, user="beit", group="beit", mode=0o444,
    ) as sink:
        for record in records:
            sample = {"__key__": f"{total:09d}", record.ext: record.image}
            if record.label >= 0:
                sample["cls"] = str(record.label).encode()
            if record.seg is not None:
                sample[SEG_KEY] = record.seg
            if metadata:
                sample["json"] = json.dumps(record.meta, sort_keys=True).encode()
            sink.write(sample)
            current = sink.shard - 1  # the writer rolls over to a new shard inside write()
            counts.extend([0] * (current + 1 - len(counts)))
            counts[current] += 1
            total += 1
    shards = [{"url": f"{prefix}-{i:06d}.tar", "num_samples": n} for i, n in enumerate(counts) if n]
    summary = ShardSummary(shards, total, list(classes or []), list(skipped or []), out_dir)
    index = {"shards": shards, "num_samples": total, "classes": summary.classes, "skipped": summary.skipped}
    tmp = os.path.join(out_dir, f".{INDEX_FILE}.tmp")
    with open(tmp, "w") as f:
        json.dump(index, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(out_dir, INDEX_FILE))
    if classes:
        with open(os.path.join(out_dir, "classes.txt"), "w") as f:
            f.write("".join(f"{i}\t{name}\n" for i, name in enumerate(classes)))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="beit-lightning-shards",
        description="Write an image folder (class sub-folders, e.g. ImageNet's train/<wnid>/*.JPEG, or an unlabeled "
        "tree) as webdataset shards with .jpg/.png + .cls (+ .json) samples, an index.json and classes.txt.",
    )
    parser.add_argument("src", help="image folder (with --segmentation: the ADEChallengeData2016 folder)")
    parser.add_argument("out", help="output folder for the shards")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--max-bytes", type=float, default=None, help="start a new shard once a shard reaches this size")
    parser.add_argument("--max-side", type=int, default=None, help="re-encode larger images to this longest side (JPEG)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality when re-encoding")
    parser.add_argument("--prefix", default="shard")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffled order")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes that read and check images")
    parser.add_argument("--no-metadata", action="store_true", help="do not write .json metadata")
    parser.add_argument("--unlabeled", action="store_true", help="ignore sub-folders as classes: write no .cls")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--segmentation", action="store_true",
                        help="write the image + label-map pairs of an ADEChallengeData2016-style split (SRC/images/SPLIT/*.jpg, "
                        "SRC/annotations/SPLIT/*.png) as .jpg + .seg.png samples; images keep their bytes")
    parser.add_argument("--split", default="training", help="with --segmentation: the split (training, validation)")
    args = parser.parse_args(argv)

    skipped: list[dict] = []
    if args.segmentation:
        if args.max_side is not None or args.unlabeled:
            parser.error("--max-side and --unlabeled do not apply to --segmentation")
        records, count = segmentation_records(args.src, args.split, seed=args.seed, workers=args.workers, skipped=skipped,
                                              progress=not args.quiet)
        classes = list(ADE20K_CLASSES)
    else:
        records, count, classes = folder_records(
            args.src, labelled=False if args.unlabeled else None, seed=args.seed, max_side=args.max_side, quality=args.quality,
            workers=args.workers, skipped=skipped, progress=not args.quiet,
        )
    summary = write_shards(
        records, args.out, classes=classes, samples_per_shard=args.samples_per_shard, max_bytes=args.max_bytes,
        prefix=args.prefix, metadata=not args.no_metadata, skipped=skipped,
    )
    print(
        f"wrote {summary.num_samples} of {count} images in {len(summary.shards)} shards: {summary.urls}\n"
        f"classes: {len(summary.classes)}; skipped (unreadable): {len(summary.skipped)}"
        + (f", listed in {os.path.join(args.out, INDEX_FILE)}" if summary.skipped else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
