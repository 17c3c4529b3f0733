"""``data.device_augment``: the workers draw and carry the JPEG; the views are computed a batch at a
time on the device (here the CPU, the same code). Checked against the CPU fast path sample by
sample with the same seeds: the same crops, flips, jitter draws and masks, pixels within a fraction
of a level; a JPEG the device cannot decode is dropped, warned about and counted."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate

from beit_lightning.data import BeitPretrainTransform, BlockwiseMaskGenerator
from beit_lightning.data.decode import RAW_MAGIC, image_payload
from beit_lightning.data.device_views import DeviceViews
from beit_lightning.data.photos import natural_image, natural_jpeg
from beit_lightning.data.transforms import DEVICE_PARAMS

JPEGS = [natural_jpeg(*((500, 375) if s % 2 else (375, 500)), seed=s) for s in range(8)]


def transforms(**kwargs) -> tuple[BeitPretrainTransform, BeitPretrainTransform]:
    mask = BlockwiseMaskGenerator((14, 14), 75, min_num_patches=16)
    cpu = BeitPretrainTransform(224, 112, mask, fast_decode=True, **kwargs)
    device = BeitPretrainTransform(224, 112, mask, device_augment=True, **kwargs)
    return cpu, device


def run_both(blobs: list[bytes], **kwargs) -> tuple[list[dict], dict]:
    cpu, device = transforms(**kwargs)
    cpu_samples, device_samples = [], []
    for seed, blob in enumerate(blobs):
        for transform, out in ((cpu, cpu_samples), (device, device_samples)):
            torch.manual_seed(seed)
            random.seed(seed)  # the mask generator's stream
            out.append(transform(Image.open(io.BytesIO(blob))))
    batch = default_collate(device_samples)
    assert isinstance(batch["encoded"], list) and batch["params"].shape == (len(blobs), len(DEVICE_PARAMS))
    return cpu_samples, DeviceViews(device)(batch)


@pytest.mark.parametrize("jitter", [0.0, 0.4])
def test_device_views_equal_the_cpu_fast_path_sample_by_sample(jitter):
    cpu, batch = run_both(JPEGS, color_jitter=jitter)
    assert batch["image"].shape == (8, 3, 224, 224) and batch["tokenizer_image"].shape == (8, 3, 112, 112)
    assert "encoded" not in batch and "params" not in batch
    for i, sample in enumerate(cpu):
        assert torch.equal(sample["mask"], batch["mask"][i])
        image = (sample["image"] - batch["image"][i]).abs() * 255 * 0.5  # std 0.5: 8-bit levels
        tokens = (sample["tokenizer_image"] - batch["tokenizer_image"][i]).abs() * 255
        # float antialiased resize vs torchvision's uint8 one: a level here and there (measured <= 0.05 mean);
        # a different crop, flip or jitter draw would give tens of levels
        assert image.mean() < 0.2 and tokens.mean() < 0.3, (i, image.mean(), tokens.mean())
        assert (image > 1.5).float().mean() < 0.01, i


def test_draws_cover_the_cpu_paths_ranges():
    """The packed draws: crops inside the image with torchvision's area and ratio ranges, flips
    about half the time, jitter factors in [0.6, 1.4] in a permuted order (as ColorJitter)."""
    _, device = transforms()
    rows = []
    for seed in range(200):
        torch.manual_seed(seed)
        random.seed(seed)
        rows.append(device(Image.open(io.BytesIO(JPEGS[seed % 2])))["params"])
    p = torch.stack(rows)
    top, left, height, width = p[:, 0], p[:, 1], p[:, 2], p[:, 3]
    w_img = torch.where(torch.arange(200) % 2 == 0, torch.tensor(375.0), torch.tensor(500.0))
    h_img = 875.0 - w_img  # JPEGS[0] is 375 wide, 500 high; JPEGS[1] 500 x 375
    assert (top >= 0).all() and (left >= 0).all() and (top + height <= h_img).all() and (left + width <= w_img).all()
    area = height * width / (h_img * w_img)
    assert area.min() >= 0.08 - 1e-3 and area.max() <= 1.0 and 0.4 < area.mean() < 0.65
    assert 0.35 < p[:, 4].mean() < 0.65
    factors = p[:, 9:12]
    assert factors.min() >= 0.6 and factors.max() <= 1.4 and factors.std() > 0.15
    orders = p[:, 5:9].long()
    assert all(sorted(o.tolist()) == [0, 1, 2, 3] for o in orders)
    assert len({tuple(o.tolist()) for o in orders}) > 10


def test_undecodable_jpeg_is_dropped_warned_and_counted():
    broken = JPEGS[1][: len(JPEGS[1]) // 3] + b"\x00" * 64  # header intact, entropy data cut
    cpu_views, device = transforms()
    samples = []
    for seed, blob in enumerate([JPEGS[0], broken, JPEGS[2]]):
        torch.manual_seed(seed)
        random.seed(seed)
        samples.append(device(Image.open(io.BytesIO(blob))))
    samples[1]["encoded"] = b"\xff\xd8 not a jpeg"  # cannot decode at all
    batch = default_collate([{**s, "label": torch.tensor(i)} for i, s in enumerate(samples)])
    views = DeviceViews(device)
    with pytest.warns(UserWarning, match="skipped sample 1"):
        out = views(batch)
    assert views.skipped == 1 and out["image"].shape[0] == 2
    assert out["label"].tolist() == [0, 2] and torch.equal(out["mask"][1], samples[2]["mask"])


def test_decoded_images_travel_as_raw_pixels():
    """In-memory images (the generated data, PNGs) are carried as raw RGB and give the same views."""
    img = natural_image(300, 200, seed=5)
    payload = image_payload(img)
    assert payload.startswith(RAW_MAGIC) and len(payload) == len(RAW_MAGIC) + 8 + 300 * 200 * 3
    buf = io.BytesIO()
    img.save(buf, "PNG")
    cpu, batch = run_both([buf.getvalue()] * 2)
    for i in range(2):
        assert ((cpu[i]["image"] - batch["image"][i]).abs() * 127.5).mean() < 0.2


def test_datamodule_runs_the_views_after_the_transfer(tmp_path):
    from beit_lightning.data import ImageFolderDataModule

    for i, blob in enumerate(JPEGS):
        folder = tmp_path / "train" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.jpg").write_bytes(blob)
    dm = ImageFolderDataModule(root=str(tmp_path), val_dir=None, batch_size=4, num_workers=0,
                               persistent_workers=False, device_augment=True)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) >= {"encoded", "params", "mask"} and "image" not in batch
    out = dm.on_after_batch_transfer(batch, 0)
    assert out["image"].shape == (4, 3, 224, 224) and out["tokenizer_image"].shape == (4, 3, 112, 112)
    assert np.isfinite(out["image"].numpy()).all() and dm.skipped_samples == 0
    with pytest.raises(ValueError, match="device_augment"):
        ImageFolderDataModule(root=str(tmp_path), mode="finetune", device_augment=True)


def test_pretraining_runs_with_device_augment(tmp_path):
    """The whole stack: Hydra config, generated shards, Lightning's hook, two training steps."""
    from hydra import compose, initialize_config_module

    from beit_lightning import cli

    with initialize_config_module(config_module="beit_lightning.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "experiment=smoke", f"output_dir={tmp_path}", "data.num_train=32", "data.num_val=0", "trainer.max_steps=2", "trainer.log_every_n_steps=1",
            "trainer.enable_progress_bar=false", "logger=csv", "metric=train/loss", "data.device_augment=true"])
    cli.train(cfg)
    metrics = list(tmp_path.rglob("metrics.csv"))
    assert metrics and any("train/loss" in m.read_text() for m in metrics)
