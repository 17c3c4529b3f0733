"""Segmentation data: the ADE20K pipeline of BEiT (mmseg 0.11) on real ADE20K images, the folder,
shard and generated sources, skipped unreadable files, and exact mid-epoch resume."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from beit_lightning.data import (
    ADE20K_CLASSES,
    ADE20KDataModule,
    GeneratedSegmentation,
    GeneratedSegmentationDataModule,
    SegmentationEvalTransform,
    SegmentationShardsDataModule,
    SegmentationTrainTransform,
    ShardRecord,
    write_shards,
)
from beit_lightning.data.segmentation_transforms import hsv_to_rgb, reduce_zero_label, rgb_to_hsv
from beit_lightning.data.shards import main as shards_main

FIXTURE = Path(__file__).parent / "fixtures" / "ade20k"
NAMES = ["ADE_val_00000001", "ADE_val_00000002", "ADE_val_00000003"]
SMALL = dict(crop_size=64, img_scale=(256, 64))  # the ADE20K pipeline at 1/8 scale, for fast loaders


def _pair(name):
    image = Image.open(FIXTURE / "images" / "validation" / f"{name}.jpg")
    return image, np.array(Image.open(FIXTURE / "annotations" / "validation" / f"{name}.png"))


@pytest.fixture
def ade_root(tmp_path):
    """The fixture's three pairs as both the training and the validation split."""
    root = tmp_path / "ADEChallengeData2016"
    for kind in ("images", "annotations"):
        for split in ("training", "validation"):
            shutil.copytree(FIXTURE / kind / "validation", root / kind / split)
    return root


def test_ade20k_classes_are_the_benchmark_table():
    rows = (FIXTURE / "objectInfo150.csv").read_text().splitlines()[1:]
    assert len(ADE20K_CLASSES) == len(set(ADE20K_CLASSES)) == 150
    # the CSV writes spaces as ';' between names: each class name is a name of its row
    for name, row in zip(ADE20K_CLASSES, rows, strict=True):
        assert ";" + name.replace(" ", ";") + ";" in ";" + row.split(",")[-1] + ";", (name, row)
    assert ADE20K_CLASSES[:3] == ("wall", "building", "sky")


@pytest.mark.parametrize("name", NAMES)
def test_label_reduction_on_real_labels(name):
    _, png = _pair(name)
    reduced = reduce_zero_label(png)
    assert (reduced == 255).sum() == (png == 0).sum() > 0
    assert np.array_equal(reduced[png > 0], png[png > 0] - 1)
    assert set(np.unique(reduced).tolist()) <= set(range(150)) | {255}
    assert np.array_equal(reduce_zero_label(np.array([0, 1, 150, 255], np.uint8)), [255, 0, 149, 255])


def test_eval_keeps_the_ratio_short_side_512_and_the_label_at_its_original_size(ade_root):
    dm = ADE20KDataModule(str(ade_root), num_workers=0)
    dm.setup()
    assert dm.num_classes == 150 and dm.ignore_index == 255 and dm.classes[0] == "wall"
    loader = dm.val_dataloader()
    assert loader.batch_size == 1
    expected = {(512, 683): (512, 683), (364, 500): (512, 703), (300, 400): (512, 683)}  # label (H, W) -> image
    pngs = {np.array(Image.open(p)).shape: np.array(Image.open(p)) for p in (FIXTURE / "annotations" / "validation").glob("*.png")}
    seen = set()
    for batch in loader:
        label = batch["label"][0]
        size = tuple(label.shape)
        assert batch["image"].shape == (1, 3, *expected[size]) and batch["image"].dtype == torch.float32
        assert label.dtype == torch.long and torch.equal(label, torch.from_numpy(reduce_zero_label(pngs[size])).long())
        seen.add(size)
    assert seen == set(expected)
    # normalised with ImageNet's mean/std (BEiT's ADE20K config): a mid-grey pixel maps to about 0
    out = SegmentationEvalTransform()(Image.new("RGB", (20, 10), (124, 116, 104)), np.ones((10, 20), np.uint8))
    assert out["image"].shape == (3, 512, 1024) and out["image"].abs().max() < 0.02


def test_train_crops_are_padded_with_255_and_hold_only_original_labels(ade_root):
    image, png = _pair(NAMES[0])  # 683 x 512
    allowed = set(np.unique(reduce_zero_label(png)).tolist()) | {255}
    # ratio 0.5: target (1024, 256) -> the image becomes 342 x 256, padded to 512 x 512
    small = SegmentationTrainTransform(ratio_range=(0.5, 0.5), photometric=False)
    np.random.seed(0)
    out = small(image, png)
    assert out["image"].shape == (3, 512, 512) and out["label"].shape == (512, 512)
    assert (out["label"][256:] == 255).all() and (out["label"][:, 342:] == 255).all()
    assert (out["image"][:, 256:] == 0).all() and (out["image"][:, :, 342:] == 0).all()
    assert (out["label"][:256, :342] != 255).float().mean() > 0.9
    # the full pipeline: new sizes, crops, flips and photometric changes never invent a label value
    train = SegmentationTrainTransform()
    for seed in range(6):
        np.random.seed(seed)
        out = train(image, png)
        assert out["image"].shape == (3, 512, 512) and out["label"].dtype == torch.long
        assert set(out["label"].unique().tolist()) <= allowed


def test_cat_max_ratio_redraws_crops_dominated_by_one_class():
    label = np.full((64, 64), 1, np.uint8)
    label[:, 40:] = 2  # crops of 32 px: only those reaching past x = 40 by 8+ px hold enough of class 2
    label[:8] = 255  # ignored pixels never count as a class
    strict = SegmentationTrainTransform(crop_size=32, cat_max_ratio=0.75, reduce_zero_label=False)
    loose = SegmentationTrainTransform(crop_size=32, cat_max_ratio=1.0, reduce_zero_label=False)

    def share(box):
        crop = label[box[0]:box[1], box[2]:box[3]]
        counts = np.bincount(crop[crop != 255].ravel())
        return counts.max() / counts.sum()

    shares_strict, shares_loose = [], []
    for seed in range(20):
        np.random.seed(seed)
        shares_strict.append(share(strict.crop_box(label)))
        np.random.seed(seed)
        shares_loose.append(share(loose.crop_box(label)))
    assert max(shares_strict) < 0.75
    assert max(shares_loose) == 1.0, "without the check, single-class crops are kept"
    # a crop never passes on a one-class label map: 11 draws, then the last one is kept
    np.random.seed(0)
    strict.crop_box(np.ones((64, 64), np.uint8))
    after = np.random.randint(1 << 30)
    np.random.seed(0)
    for _ in range(2 * 11):
        np.random.randint(0, 33)
    assert np.random.randint(1 << 30) == after


def test_flip_and_crop_move_image_and_label_together():
    # column x has colour 4x and label x: any crop/flip must keep that relation pixel by pixel
    x = np.arange(60, dtype=np.uint8)
    image = np.repeat(np.stack([x * 4, x * 4, x * 4], -1)[None], 50, 0)
    label = np.repeat(x[None], 50, 0)
    flips = set()
    for seed in range(8):
        transform = SegmentationTrainTransform(
            crop_size=40, img_scale=(60, 50), ratio_range=(1.0, 1.0), cat_max_ratio=1.0, photometric=False,
            mean=(0, 0, 0), std=(1 / 255, 1 / 255, 1 / 255), reduce_zero_label=False,
        )
        np.random.seed(seed)
        out = transform(image, label)
        assert torch.equal(out["image"][0], out["label"].float() * 4)
        assert torch.equal(out["image"][1], out["image"][0])
        flips.add(bool(out["label"][0, 0] > out["label"][0, -1]))
    assert flips == {True, False}


def test_photometric_hsv_matches_opencv_convention():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    hsv = rgb_to_hsv(rgb)
    assert hsv[..., 0].max() < 180
    assert np.abs(hsv_to_rgb(hsv).astype(int) - rgb).max() <= 4  # 8-bit HSV quantisation only
    pure = rgb_to_hsv(np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128]]], np.uint8))
    assert pure[0].tolist() == [[0, 255, 255], [60, 255, 255], [120, 255, 255], [0, 0, 128]]


def test_shards_round_trip_gives_the_folder_labels(ade_root, tmp_path):
    out = tmp_path / "shards"
    assert shards_main([str(ade_root), str(out), "--segmentation", "--split", "validation", "--samples-per-shard", "2",
                        "--workers", "1", "--quiet"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["classes.txt", "index.json", "shard-000000.tar", "shard-000001.tar"]
    dm = SegmentationShardsDataModule(str(out / "shard-{000000..000001}.tar"), val_urls=str(out / "shard-{000000..000001}.tar"),
                                      num_workers=0)
    assert dm.num_classes == 150 and dm.classes[-1] == "flag"
    dm.setup()
    folder = ADE20KDataModule(str(ade_root), num_workers=0)
    folder.setup()
    from_folder = sorted((b["label"].numel(), b["label"], b["image"]) for b in folder.val_dataloader())
    from_shards = sorted((b["label"].numel(), b["label"], b["image"]) for b in dm.val_dataloader())
    assert len(from_shards) == 3
    for (_, label_a, image_a), (_, label_b, image_b) in zip(from_folder, from_shards, strict=True):
        assert torch.equal(label_a, label_b) and torch.equal(image_a, image_b)  # original bytes, lossless labels
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 512, 512) and batch["label"].shape == (2, 512, 512)


def _corrupt(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:200])


def test_unreadable_image_and_label_are_skipped_warned_and_counted_in_a_folder(ade_root):
    for kind, ext, name in (("images", "jpg", NAMES[0]), ("annotations", "png", NAMES[1])):
        _corrupt(ade_root / kind / "training" / f"{name}.{ext}")
    dm = ADE20KDataModule(str(ade_root), batch_size=3, num_workers=0, **SMALL)
    dm.setup()
    with pytest.warns(UserWarning) as record:
        batches = list(dm.train_dataloader())
    messages = " ".join(str(w.message) for w in record)
    assert f"unreadable image '{ade_root}/images/training/{NAMES[0]}.jpg'" in messages
    assert f"unreadable label map '{ade_root}/annotations/training/{NAMES[1]}.png'" in messages
    assert len(batches) == 1 and batches[0]["label"].shape == (3, 64, 64), "batches keep their size"
    assert dm.skipped_samples == 2


def test_undecodable_image_and_label_are_skipped_warned_and_counted_in_shards(tmp_path):
    def records():
        for i, name in enumerate(NAMES * 2):
            image = (FIXTURE / "images" / "validation" / f"{name}.jpg").read_bytes()
            seg = (FIXTURE / "annotations" / "validation" / f"{name}.png").read_bytes()
            yield ShardRecord(image[:300] if i == 1 else image, "jpg", -1, seg=seg[:60] if i == 4 else seg)

    write_shards(records(), str(tmp_path), classes=list(ADE20K_CLASSES), samples_per_shard=3)
    dm = SegmentationShardsDataModule(str(tmp_path / "shard-{000000..000001}.tar"), batch_size=2, num_workers=0,
                                      shuffle_buffer=1, **SMALL)
    dm.setup()
    with pytest.warns(UserWarning) as record:
        batches = list(dm.train_dataloader())
    messages = " ".join(str(w.message) for w in record)
    assert "skipping undecodable sample 000000001" in messages and "image: " in messages
    assert "skipping undecodable sample 000000004" in messages and "label map: " in messages
    assert len(batches) == 3, "the epoch keeps its length"
    # 4 good samples in the first pass; the padding pass meets (and counts) one corrupt sample again
    assert dm.skipped_samples == 3


def test_generated_scenes_are_deterministic_and_hold_every_class(tmp_path):
    scenes = GeneratedSegmentation(12, 64, seed=3)
    image, label = scenes[5]
    image2, label2 = GeneratedSegmentation(12, 64, seed=3)[5]
    assert np.array_equal(np.asarray(image), np.asarray(image2)) and np.array_equal(label, label2)
    assert not np.array_equal(label, GeneratedSegmentation(12, 64, seed=4)[5][1])
    values = set().union(*(np.unique(scenes[i][1]).tolist() for i in range(12)))
    assert values == set(range(8)), "0 (ignored band), 1 (background) and the 6 textures"
    dm = GeneratedSegmentationDataModule(num_train=32, num_val=8, batch_size=8, num_workers=0, cache_dir=str(tmp_path))
    dm.setup()
    assert dm.num_classes == 7 and dm.classes[0] == "background"
    labels = torch.cat([b["label"] for b in dm.train_dataloader()])
    assert labels.shape == (32, 64, 64) and set(labels.unique().tolist()) == set(range(7)) | {255}
    val = list(dm.val_dataloader())
    assert len(val) == 8 and val[0]["image"].shape == (1, 3, 64, 64)


def test_segmentation_modules_reject_a_classification_mode(tmp_path):
    with pytest.raises(ValueError, match="data.mode='finetune'"):
        GeneratedSegmentationDataModule(cache_dir=str(tmp_path), mode="finetune")
    with pytest.raises(FileNotFoundError, match="images/training"):
        ADE20KDataModule(str(tmp_path), mode="segmentation").setup()


@pytest.mark.parametrize("workers", [0, 2])
def test_mid_epoch_resume_of_the_segmentation_shard_loader(tmp_path, workers):
    kwargs = dict(num_train=48, num_val=0, samples_per_shard=6, batch_size=4, num_workers=workers, seed=5,
                  cache_dir=str(tmp_path), persistent_workers=False, shuffle_buffer=8)
    loader = GeneratedSegmentationDataModule(**kwargs)
    loader.setup()
    train = loader.train_dataloader()
    list(train)  # epoch 0
    full = list(train)  # epoch 1
    assert len(full) == 12 and train.state_dict() == {"epoch": 1, "batches_done": 12}
    partial = iter(train)
    for _ in range(5):
        next(partial)
    state = train.state_dict()
    assert state == {"epoch": 2, "batches_done": 5}
    resumed = GeneratedSegmentationDataModule(**kwargs)  # a new process after a restart
    resumed.setup()
    again = resumed.train_dataloader()
    again.load_state_dict({"epoch": 1, "batches_done": 5})
    rest = list(again)
    assert len(rest) == 7
    for a, b in zip(full[5:], rest, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert len(list(again)) == 12, "the next epoch is whole"


def test_folder_augmentation_follows_seed_and_epoch_not_the_worker_count(ade_root):
    def epoch(workers, number):
        dm = ADE20KDataModule(str(ade_root), batch_size=1, num_workers=workers, persistent_workers=False, seed=1, **SMALL)
        dm.setup()
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(number)  # as Lightning does each epoch
        return [(b["image"], b["label"]) for b in loader]

    main_process, workers = epoch(0, 3), epoch(2, 3)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(main_process, workers, strict=True))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(main_process, epoch(0, 4), strict=True))
