"""An image folder with unreadable files: skipped, counted, named in a warning, and training goes on
with full batches."""

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module

from beit_lightning.cli import train
from beit_lightning.data import (
    BeitPretrainTransform,
    BlockwiseMaskGenerator,
    GeneratedImages,
    ImageFolderDataModule,
    ShardStream,
)
from beit_lightning.data.datamodule import ImageFiles
from beit_lightning.data.decode import is_undecoded_jpeg
from beit_lightning.data.shards import ShardRecord, write_shards
from beit_lightning.data.streaming import SharedCounter

BAD = ("corrupt.jpg", "truncated.jpg")


def _write_folder(root: Path, per_class: int = 7, classes: int = 2, size: int = 40, seed: int = 0) -> list[Path]:
    """``root/<class>/NNN.jpg`` from GeneratedImages; returns the written files."""
    images = GeneratedImages(per_class * classes, size, num_classes=classes, seed=seed)
    written = []
    for i in range(len(images)):
        img, label = images[i]
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        written.append(folder / f"{i:03d}.jpg")
        img.save(written[-1], quality=90)
    return written


def _add_bad_files(root: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    (root / "class0" / BAD[0]).write_bytes(rng.integers(0, 256, 700, dtype=np.uint8).tobytes())
    good = sorted((root / "class1").glob("*.jpg"))[0].read_bytes()
    (root / "class1" / BAD[1]).write_bytes(good[: len(good) // 2])


@pytest.fixture
def folder(tmp_path):
    """14 readable images and 2 unreadable ones in train/, 4 readable ones in val/."""
    _write_folder(tmp_path / "train")
    _add_bad_files(tmp_path / "train")
    _write_folder(tmp_path / "val", per_class=2, seed=1)
    return tmp_path


def _datamodule(root, mode, num_workers, **kwargs):
    dm = ImageFolderDataModule(
        root=str(root), mode=mode, batch_size=4, num_workers=num_workers, input_size=32, tokenizer_size=16,
        patch_size=8, num_masking_patches=6, min_num_patches=2, persistent_workers=False, **kwargs,
    )
    dm.setup("fit")
    return dm


def _epoch(dm):
    batches = list(dm.train_dataloader())
    assert len(batches) == 4  # 16 files, batch 4: every index read once per epoch
    for batch in batches:
        assert batch["image"].shape == (4, 3, 32, 32)
        assert batch["label"].shape == (4,)
        if dm.mode == "pretrain":
            assert batch["tokenizer_image"].shape == (4, 3, 16, 16) and batch["mask"].shape == (4, 4, 4)
    return batches


@pytest.mark.parametrize("mode", ["finetune", "pretrain"])
def test_unreadable_images_are_skipped_counted_and_named_in_the_main_process(folder, mode):
    dm = _datamodule(folder, mode, num_workers=0)
    assert len(dm.train_set) == 16 and dm.skipped_samples == 0
    with pytest.warns(UserWarning) as record:
        _epoch(dm)
    messages = [str(w.message) for w in record if "unreadable image" in str(w.message)]
    for name in BAD:
        assert sum(name in m for m in messages) == 1, messages
    assert dm.skipped_samples == 2
    # the next epoch counts again, but does not warn again for the same files
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        _epoch(dm)
    assert not [w for w in again if "unreadable image" in str(w.message)]
    assert dm.skipped_samples == 4
    # validation reads only good files
    assert sum(len(b["label"]) for b in dm.val_dataloader()) == 4
    assert dm.skipped_samples == 4


@pytest.mark.parametrize("mode", ["finetune", "pretrain"])
def test_unreadable_images_are_counted_across_workers(folder, mode):
    dm = _datamodule(folder, mode, num_workers=2)
    _epoch(dm)
    assert dm.skipped_samples == 2
    _epoch(dm)  # fresh workers (not persistent)
    assert dm.skipped_samples == 4


def test_persistent_workers_keep_counting(folder):
    dm = _datamodule(folder, "finetune", num_workers=2)
    dm.persistent_workers = True
    loader = dm.train_dataloader()
    for epoch in range(1, 3):
        assert sum(len(b["label"]) for b in loader) == 16
        assert dm.skipped_samples == 2 * epoch


def test_substitute_is_the_next_readable_file_and_deterministic(tmp_path):
    good = _write_folder(tmp_path, per_class=3, classes=2)
    bad = [tmp_path / "bad1.jpg", tmp_path / "bad2.jpg"]
    for path in bad:
        path.write_bytes(b"not an image at all")
    # files: good0 bad1 bad2 good1 ... good5 bad1(again, last: wraps around to good0)
    files = [(str(good[0]), 0), (str(bad[0]), 7), (str(bad[1]), 8)]
    files += [(str(p), i + 1) for i, p in enumerate(good[1:])] + [(str(bad[0]), 9)]
    counter = SharedCounter()
    ds = ImageFiles(files, ["a", "b"], skipped=counter)
    with pytest.warns(UserWarning) as record:
        img, label = ds[1]
    assert [Path(str(w.message).split("'")[1]).name for w in record] == ["bad1.jpg", "bad2.jpg"]
    assert label == 1 and np.array_equal(np.asarray(img), np.asarray(ds[3][0]))  # bad1, bad2 -> good1
    assert counter.value == 1  # one skipped sample per request, however many files were passed
    for _ in range(3):
        assert ds[2][1] == 1 and ds[1][1] == 1
    assert counter.value == 7
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # bad1.jpg was named already: no second warning
        img, label = ds[len(files) - 1]
    assert label == 0 and np.array_equal(np.asarray(img), np.asarray(ds[0][0]))  # wraps around to the first
    assert counter.value == 8


def test_an_entirely_unreadable_folder_raises(tmp_path):
    for c in ("a", "b"):
        (tmp_path / "train" / c).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "train" / c / f"{i}.jpg").write_bytes(b"\xff\xd8 truncated")
    dm = _datamodule(tmp_path, "finetune", num_workers=0)
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="none of the 6 image files could be read"):
        next(iter(dm.train_dataloader()))


def test_a_long_run_of_unreadable_files_raises(tmp_path, monkeypatch):
    good = _write_folder(tmp_path / "ok", per_class=1, classes=1)
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    files = [(str(tmp_path / "bad.jpg"), 0)] * 5 + [(str(good[0]), 0)]
    monkeypatch.setattr(ImageFiles, "MAX_SUBSTITUTE_TRIES", 3)
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="3 image files in a row"):
        ImageFiles(files, [])[0]
    with pytest.warns(UserWarning, match="bad.jpg"):
        assert ImageFiles(files, [])[4][1] == 0


@pytest.mark.slow
def test_training_on_a_folder_with_unreadable_files_logs_data_skipped(folder, tmp_path):
    out = tmp_path / "run"
    overrides = [
        f"data.root={folder}", "data=imagefolder", f"output_dir={out}", "logger=csv", "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", "data.batch_size=4", "data.num_workers=0",
        "model.img_size=32", "data.num_masking_patches=6", "data.min_num_patches=2", "task.num_classes=2",
    ]
    with initialize_config_module(config_module="beit_lightning.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=smoke_finetune", *overrides])
    assert cfg.data.mode == "finetune" and cfg.data._target_.endswith("ImageFolderDataModule")
    with pytest.warns(UserWarning, match="unreadable image"):
        train(cfg)
    lines = (out / "csv" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    column = header.index("data/skipped")
    values = [float(row.split(",")[column]) for row in lines[1:] if row.split(",")[column]]
    assert values and values[-1] == 2.0
    assert torch.isfinite(torch.tensor(values)).all()


# --- the fast pre-training path decodes inside the transform (issue 24) ---------------------------

class _Spy:
    """Wraps a transform and records what kind of image it was handed."""

    def __init__(self, transform) -> None:
        self.transform, self.undecoded = transform, []

    @property
    def accepts_undecoded(self) -> bool:
        return self.transform.accepts_undecoded

    def __call__(self, img):
        self.undecoded.append(is_undecoded_jpeg(img) and isinstance(img.fp, io.BytesIO))
        return self.transform(img)


def _cut_in_the_scan(data: bytes) -> bytes:
    """A JPEG cut a few bytes into its entropy-coded data: the header reads, the pixels do not."""
    return data[: data.index(b"\xff\xda") + 40]


@pytest.mark.parametrize("fast_decode", [True, False])
def test_truncated_jpeg_on_the_folder_path_is_skipped_named_and_counted(folder, fast_decode):
    good = sorted((folder / "train" / "class1").glob("0*.jpg"))[0].read_bytes()
    (folder / "train" / "class1" / BAD[1]).write_bytes(_cut_in_the_scan(good))
    dm = _datamodule(folder, "pretrain", num_workers=0, fast_decode=fast_decode)
    spy = _Spy(dm.train_transform)
    dm.train_set.sample_transform = spy
    with pytest.warns(UserWarning) as record:
        _epoch(dm)
    messages = [str(w.message) for w in record if "unreadable image" in str(w.message)]
    assert sum(BAD[1] in m for m in messages) == 1 and dm.skipped_samples == 2, messages
    # fast: every image reached the transform undecoded, from memory, and the truncated one failed there
    assert all(spy.undecoded) if fast_decode else not any(spy.undecoded)
    assert any("cannot decode" in m for m in messages if BAD[1] in m) == fast_decode


def _jpeg_records(n, truncated=()):
    images = GeneratedImages(n, 40, num_classes=2, seed=5)
    for i in range(n):
        out = io.BytesIO()
        images[i][0].save(out, "JPEG", quality=90)
        data = out.getvalue()
        yield ShardRecord(_cut_in_the_scan(data) if i in truncated else data, "jpg", i % 2, {})


@pytest.mark.parametrize("fast_decode", [True, False])
def test_truncated_jpeg_in_shards_is_skipped_named_and_counted(tmp_path, fast_decode):
    write_shards(_jpeg_records(12, truncated={5}), str(tmp_path), samples_per_shard=6)
    transform = BeitPretrainTransform(32, 16, BlockwiseMaskGenerator(4, 6, min_num_patches=2), fast_decode=fast_decode)
    spy = _Spy(transform)
    urls = [str(tmp_path / f"shard-{i:06d}.tar") for i in range(2)]
    stream = ShardStream(urls, spy, samples_per_epoch=12, batch_size=4, shuffle_buffer=1, repeats=2)
    with pytest.warns(UserWarning, match="skipping undecodable sample 000000005") as record:
        samples = list(stream)
    assert len(samples) == 12 and all(s["image"].shape == (3, 32, 32) for s in samples)  # the epoch keeps its length
    assert stream.skipped.value == 1  # one image (both its copies), counted once
    assert all(spy.undecoded) if fast_decode else not any(spy.undecoded)
    named = [str(w.message) for w in record if "000000005" in str(w.message)]
    assert len(named) == 1 and ("cannot decode" in named[0]) == fast_decode


def test_repeated_copies_of_an_undecoded_sample_draw_on_the_full_size(tmp_path):
    """Decoding at reduced size changes a PIL image in place; each repeated copy opens it afresh."""
    write_shards(_jpeg_records(4), str(tmp_path), samples_per_shard=4)
    sizes = []

    class Sizes(_Spy):
        def __call__(self, img):
            sizes.append(img.size)
            return super().__call__(img)

    transform = BeitPretrainTransform(16, 8, scale=(0.9, 1.0), fast_decode=True)  # crops allow a 1/2 decode
    stream = ShardStream([str(tmp_path / "shard-000000.tar")], Sizes(transform), samples_per_epoch=8,
                         shuffle_buffer=1, repeats=2)
    assert len(list(stream)) == 8 and set(sizes) == {(40, 40)}
