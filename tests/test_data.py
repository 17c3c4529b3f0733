import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from beit_lightning.data import (
    BeitPretrainTransform,
    BlockwiseMaskGenerator,
    GeneratedDataModule,
    GeneratedImages,
)


def _coordinate_image(size=256):
    """R encodes x, G encodes y, B is a fine checker: any crop is identifiable from its pixels."""
    y, x = np.mgrid[0:size, 0:size]
    img = np.stack([x * 255 // (size - 1), y * 255 // (size - 1), ((x // 8 + y // 8) % 2) * 255], -1)
    return Image.fromarray(img.astype(np.uint8))


def test_two_views_come_from_the_same_crop():
    t = BeitPretrainTransform(input_size=64, tokenizer_size=32, color_jitter=0.0, hflip=0.0, mean=(0, 0, 0), std=(1, 1, 1))
    img = _coordinate_image()
    for seed in range(10):
        torch.manual_seed(seed)
        sample = t(img)
        view, token_view = sample["image"], sample["tokenizer_image"]
        assert view.shape == (3, 64, 64) and token_view.shape == (3, 32, 32)
        assert token_view.min() >= 0 and token_view.max() <= 1
        down = F.interpolate(view[None, :2], size=32, mode="area")[0]
        # same region: the x/y coordinate channels agree pixel by pixel (up to resampling)
        assert (down - token_view[:2]).abs().mean() < 0.02
    # and different seeds give different crops
    torch.manual_seed(0)
    a = t(img)["image"]
    torch.manual_seed(1)
    assert not torch.allclose(a, t(img)["image"])


def test_flip_applies_to_both_views():
    t = BeitPretrainTransform(input_size=64, tokenizer_size=32, scale=(1, 1), ratio=(1, 1), color_jitter=0.0,
                              hflip=1.0, mean=(0, 0, 0), std=(1, 1, 1))
    s = t(_coordinate_image())
    # R encodes x: flipped, it decreases from left to right in both views
    assert s["image"][0, :, 0].mean() > s["image"][0, :, -1].mean()
    assert s["tokenizer_image"][0, :, 0].mean() > s["tokenizer_image"][0, :, -1].mean()


def test_normalisation_of_the_patch_view_only():
    t = BeitPretrainTransform(input_size=32, tokenizer_size=32, scale=(1, 1), ratio=(1, 1), color_jitter=0.0, hflip=0.0)
    s = t(Image.new("RGB", (40, 40), (255, 0, 128)))
    torch.testing.assert_close(s["image"][:, 5, 5], torch.tensor([1.0, -1.0, 128 / 255 * 2 - 1]), atol=1e-3, rtol=0)
    torch.testing.assert_close(s["tokenizer_image"][:, 5, 5], torch.tensor([1.0, 0.0, 128 / 255]), atol=1e-3, rtol=0)


def test_generated_images_are_deterministic_and_structured():
    a, b = GeneratedImages(20, 48, seed=1), GeneratedImages(20, 48, seed=1)
    for i in (0, 7, 19):
        assert np.array_equal(np.asarray(a[i][0]), np.asarray(b[i][0]))
    assert [a[i][1] for i in range(20)] == [i % 10 for i in range(20)]
    assert not np.array_equal(np.asarray(a[0][0]), np.asarray(GeneratedImages(20, 48, seed=2)[0][0]))
    # not white noise: neighbouring pixels are strongly correlated
    x = np.asarray(a[3][0], dtype=float)
    corr = np.corrcoef(x[:, :-1].ravel(), x[:, 1:].ravel())[0, 1]
    assert corr > 0.8


def test_batch_format_and_dtypes():
    dm = GeneratedDataModule(num_train=8, num_val=4, image_size=48, batch_size=4, num_workers=0, input_size=32,
                             tokenizer_size=32, patch_size=8, num_masking_patches=6, min_num_patches=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["tokenizer_image"].shape == (4, 3, 32, 32)
    assert batch["mask"].shape == (4, 4, 4) and batch["mask"].dtype == torch.bool
    assert batch["mask"].flatten(1).sum(1).tolist() == [6] * 4
    assert batch["label"].dtype == torch.long and batch["label"].shape == (4,)
    val = next(iter(dm.val_dataloader()))
    assert val["image"].shape == (4, 3, 32, 32)


def test_data_module_rejects_inconsistent_sizes():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        GeneratedDataModule(input_size=30, patch_size=8)
    with pytest.raises(ValueError, match="impossible"):
        BlockwiseMaskGenerator(4, 17)


def test_repeated_augmentation_sampler_spreads_copies_over_ranks_like_deit():
    from beit_lightning.data.samplers import RepeatedAugmentationSampler

    data = list(range(1024))
    ranks = [RepeatedAugmentationSampler(data, repeats=3, seed=5, num_replicas=4, rank=r) for r in range(4)]
    for sampler in ranks:
        sampler.set_epoch(2)
    per_rank = [list(s) for s in ranks]
    assert all(len(p) == len(s) == 1024 // 4 for p, s in zip(per_rank, ranks, strict=True))  # floor(N//256*256/world)
    # reading the ranks step by step gives each image 3 times in a row: its copies are dealt round-robin to
    # consecutive ranks, so they fall in the same (or the next) global step on different GPUs
    flat = [i for step in zip(*per_rank, strict=True) for i in step]
    assert all(flat[3 * j] == flat[3 * j + 1] == flat[3 * j + 2] for j in range(len(flat) // 3))
    counts = torch.bincount(torch.tensor(flat), minlength=1024)
    assert (counts == 3).sum() == 1024 // 3 and counts.max() == 3  # about 1/3 of the distinct images per epoch
    ranks[0].set_epoch(3)
    assert list(ranks[0]) != per_rank[0]  # a new order every epoch
