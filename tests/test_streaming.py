import io
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from beit_lightning.data import (
    EpochLoader,
    GeneratedDataModule,
    ImageFolderDataModule,
    ImageShardsDataModule,
    ShardStream,
)
from beit_lightning.data.shards import ShardRecord, write_shards


def _id_records(n, corrupt=()):
    """PNG images whose first pixel encodes their index (lossless), so a test can tell them apart."""
    for i in range(n):
        out = io.BytesIO()
        Image.new("RGB", (16, 16), (i % 256, i // 256, 7)).save(out, format="PNG")
        data = out.getvalue()[:40] if i in corrupt else out.getvalue()
        yield ShardRecord(data, "png", i % 3, {})


def _identify(img):
    r, g, _ = img.getpixel((0, 0))
    return {"id": torch.tensor(r + 256 * g)}


def _urls(out, n_shards):
    return [str(out / f"shard-{i:06d}.tar") for i in range(n_shards)]


def _epoch_ids(urls, world, workers, batch, n, epoch=0, resampled=False):
    per_rank_batches, ids = [], []
    for rank in range(world):
        stream = ShardStream(urls, _identify, samples_per_epoch=n, batch_size=batch, num_workers=workers,
                             rank=rank, world_size=world, resampled=resampled, shuffle_buffer=8, seed=3)
        stream.set_epoch(epoch)
        batches = list(DataLoader(stream, batch_size=batch, num_workers=workers))
        per_rank_batches.append(len(batches))
        assert len(batches) == len(DataLoader(stream, batch_size=batch)), "len() must match the real batch count"
        ids += [i for b in batches for i in b["id"].tolist()]
    return ids, per_rank_batches


def test_two_ranks_two_workers_see_every_sample_exactly_once(tmp_path):
    write_shards(_id_records(80), str(tmp_path), samples_per_shard=10)
    urls = _urls(tmp_path, 8)
    ids, batches = _epoch_ids(urls, world=2, workers=2, batch=5, n=80)
    assert sorted(ids) == list(range(80))
    assert batches == [8, 8]
    # the next epoch reads another shard order, still exactly once
    ids1, _ = _epoch_ids(urls, world=2, workers=2, batch=5, n=80, epoch=1)
    assert sorted(ids1) == list(range(80)) and ids1 != ids
    # the same epoch again is the same order (reproducible from the seed)
    assert _epoch_ids(urls, world=2, workers=2, batch=5, n=80)[0] == ids


def test_uneven_shards_pad_to_equal_batch_counts(tmp_path):
    write_shards(_id_records(70), str(tmp_path), samples_per_shard=10)
    ids, batches = _epoch_ids(_urls(tmp_path, 7), world=2, workers=2, batch=4, n=70)
    assert batches[0] == batches[1] == 10  # 2 workers x 20 samples / 4
    assert set(ids) == set(range(70)) and len(ids) == 80  # every sample, 10 repeated as padding


def test_fewer_shards_than_readers_split_by_sample(tmp_path):
    write_shards(_id_records(24), str(tmp_path), samples_per_shard=12)
    ids, batches = _epoch_ids(_urls(tmp_path, 2), world=2, workers=2, batch=3, n=24)
    assert sorted(ids) == list(range(24)) and batches == [4, 4]


def test_resampled_epochs_have_a_fixed_length(tmp_path):
    write_shards(_id_records(60), str(tmp_path), samples_per_shard=10)
    ids, batches = _epoch_ids(_urls(tmp_path, 6), world=2, workers=2, batch=5, n=100, resampled=True)
    assert batches == [10, 10] and len(ids) == 100
    assert len(set(ids)) > 30


def test_corrupt_sample_is_skipped_counted_and_replaced(tmp_path):
    write_shards(_id_records(20, corrupt={4}), str(tmp_path), samples_per_shard=10)
    stream = ShardStream(_urls(tmp_path, 2), _identify, samples_per_epoch=20, batch_size=4, shuffle_buffer=1)
    with pytest.warns(UserWarning, match="skipping undecodable sample 000000004"):
        ids = [s["id"].item() for s in stream]
    assert 4 not in ids and len(ids) == 20, "the epoch keeps its length"
    assert stream.skipped.value >= 1


def test_pipe_urls_and_missing_count(tmp_path):
    write_shards(_id_records(12), str(tmp_path), samples_per_shard=6)
    dm = ImageShardsDataModule(train_urls=f"pipe:cat {tmp_path}/shard-{{000000..000001}}.tar", samples_per_epoch=12,
                               mode="finetune", input_size=32, patch_size=8, batch_size=4, num_workers=0)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["label"].dtype == torch.long
    dm2 = ImageShardsDataModule(train_urls=f"pipe:cat {tmp_path}/shard-000000.tar", mode="finetune", input_size=32, patch_size=8)
    with pytest.raises(ValueError, match="samples_per_epoch"):
        dm2.setup()


def test_generated_shards_batch_format_and_epoch_loader(tmp_path):
    dm = GeneratedDataModule(num_train=48, num_val=16, image_size=40, samples_per_shard=16, cache_dir=str(tmp_path),
                             input_size=32, tokenizer_size=32, patch_size=8, num_masking_patches=6, min_num_patches=2,
                             batch_size=8, num_workers=2)
    dm.setup()
    assert len(list(Path(dm.data_dir).glob("train-48/shard-*.tar"))) == 3
    loader = dm.train_dataloader()
    assert isinstance(loader, EpochLoader) and len(loader) == 6
    first = [b["image"] for b in loader]
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (8, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["tokenizer_image"].shape == (8, 3, 32, 32) and batch["tokenizer_image"].min() >= 0
    assert batch["mask"].shape == (8, 4, 4) and batch["mask"].dtype == torch.bool
    assert batch["mask"].flatten(1).sum(1).tolist() == [6] * 8
    assert batch["label"].dtype == torch.long and set(batch["label"].tolist()) <= set(range(10))
    second = [b["image"] for b in loader]  # no trainer: the loader counts epochs itself
    assert len(second) == 6 and not all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert dm.skipped_samples == 0


def test_image_folder_labelled_and_unlabeled(tmp_path):
    for name in ("a", "b"):
        (tmp_path / "labelled" / "train" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 30), (i * 40, 0, 0)).save(tmp_path / "labelled" / "train" / name / f"{i}.png")
    (tmp_path / "flat" / "train").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (40, 30)).save(tmp_path / "flat" / "train" / f"{i}.jpg")
    kw = dict(input_size=32, tokenizer_size=32, patch_size=8, num_masking_patches=5, min_num_patches=2,
              batch_size=2, num_workers=0)
    labelled = ImageFolderDataModule(str(tmp_path / "labelled"), **kw)
    labelled.setup()
    assert labelled.classes == ["a", "b"]
    labels = Counter(x for b in DataLoader(labelled.train_set, batch_size=6) for x in b["label"].tolist())
    assert labels == {0: 3, 1: 3}
    flat = ImageFolderDataModule(str(tmp_path / "flat"), **kw)
    flat.setup()
    batch = next(iter(flat.train_dataloader()))
    assert batch["label"].tolist() == [-1, -1] and batch["mask"].shape == (2, 4, 4)
    nested = ImageFolderDataModule(str(tmp_path / "labelled"), labelled=False, **kw)
    nested.setup()
    assert len(nested.train_set) == 6 and {nested.train_set[i]["label"].item() for i in range(6)} == {-1}


def _identify_and_draw(img):
    """The sample's id plus random draws from the generators augmentations use."""
    import random as pyrandom

    import numpy as np

    return {**_identify(img), "draw": torch.tensor([torch.rand(()).item(), pyrandom.random(), np.random.rand()])}


@pytest.mark.parametrize("workers", [0, 2])
def test_mid_epoch_resume_continues_with_the_same_samples_and_augmentation(tmp_path, workers):
    write_shards(_id_records(48), str(tmp_path), samples_per_shard=6)
    stream = ShardStream(_urls(tmp_path, 8), _identify_and_draw, samples_per_epoch=48, batch_size=4,
                         num_workers=workers, shuffle_buffer=8, seed=5)
    stream.set_epoch(2)
    full = list(DataLoader(stream, batch_size=4, num_workers=workers))
    stream.set_epoch(2, skip_batches=5)
    rest = list(DataLoader(stream, batch_size=4, num_workers=workers))
    assert len(full) == 12 and len(rest) == 7
    for a, b in zip(full[5:], rest, strict=True):
        assert torch.equal(a["id"], b["id"]) and torch.equal(a["draw"], b["draw"])
    # augmentation in the training process leaves the process's own random state alone
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    list(ShardStream(_urls(tmp_path, 8), _identify_and_draw, samples_per_epoch=8))
    assert torch.equal(torch.rand(3), expected)
