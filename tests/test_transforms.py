"""The data transforms: timm's fine-tuning augmentation on every Pillow, and the interpolation of
BEiT's two pre-training views."""

import pickle
import random
import time
from pathlib import Path

import numpy as np
import pytest
import timm.data.auto_augment as timm_aa
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image, ImageOps
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from beit_lightning.data import BeitPretrainTransform, ClassificationTransform
from beit_lightning.data.augment import POSTERIZE_OPS, posterize
from beit_lightning.data.transforms import TokenizerViewTransform

CONF = Path(__file__).parents[1] / "conf"
POLICIES = ["rand-m9-mstd0.5-inc1", "rand-m9-mstd0.5", "rand-m10-n3", "original", "v0", "3a", "augmix-m5-w4-d2"]


# --- posterize ---------------------------------------------------------------------------------
def _noise(size=(37, 29), mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_posterize_matches_pillow_for_1_to_8_bits_and_is_black_for_0(mode):
    img = _noise(mode=mode)
    for bits in range(1, 9):
        assert np.array_equal(np.asarray(posterize(img, bits)), np.asarray(ImageOps.posterize(img, bits))), bits
    black = posterize(img, 0, fillcolor=(128, 128, 128), resample=Image.BICUBIC)  # timm's extra kwargs
    assert (black.mode, black.size) == (img.mode, img.size)
    assert not np.asarray(black).any()


def test_posterize_to_0_bits_keeps_alpha():
    img = _noise().convert("RGBA")
    img.putalpha(77)
    out = np.asarray(posterize(img, 0))
    assert not out[..., :3].any() and (out[..., 3] == 77).all()


def _augment_ops(transform):
    """timm's AugmentOps of a create_transform Compose, found by structure (not with our walker)."""
    ops = []
    for t in transform.transforms:
        ops += list(getattr(t, "ops", []))
        ops += [op for sub in getattr(t, "policy", []) for op in sub]
    return ops


@pytest.mark.parametrize("policy", POLICIES)
def test_classification_transform_holds_no_timm_posterize(policy):
    t = ClassificationTransform(input_size=32, is_training=True, auto_augment=policy, interpolation="bicubic")
    ops = _augment_ops(t.transform)
    assert ops, "no AugmentOp found: timm changed its transform structure"
    posterizes = [op for op in ops if op.name in POSTERIZE_OPS]
    if policy != "3a":  # 3-Augment has no posterize op
        assert posterizes
    assert all(op.aug_fn is posterize for op in posterizes)
    assert not any(op.aug_fn is timm_aa.posterize for op in ops)
    # still picklable (data-loader workers), and the copy keeps our function
    copy = pickle.loads(pickle.dumps(t))
    assert all(op.aug_fn is posterize for op in _augment_ops(copy.transform) if op.name in POSTERIZE_OPS)
    # and the other ops are timm's own
    assert all(op.aug_fn is timm_aa.NAME_TO_OP[op.name] for op in ops if op.name not in POSTERIZE_OPS)


# --- every fine-tuning recipe over many images -------------------------------------------------
def _compose(overrides):
    with initialize_config_module(config_module="beit_lightning.conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _finetune_recipes():
    small = ["model.img_size=32", "data.input_size=32", "output_dir=/tmp/unused"]
    recipes = {}
    for path in sorted((CONF / "experiment").glob("*.yaml")):
        if "override /task: segmentation" in path.read_text():
            continue  # label maps, no classification transform (tests/test_segmentation_data.py)
        cfg = _compose([f"experiment={path.stem}", *small])
        if cfg.data.get("mode") == "finetune":
            recipes[f"experiment={path.stem}"] = cfg
    for task in ("finetune", "linear_probe"):
        recipes[f"task={task}"] = _compose([f"task={task}", *small])
    return recipes


def _training_transform(cfg):
    data = cfg.data
    for key in ("root", "train_urls"):  # paths the user must give; setup() is not called
        if OmegaConf.is_missing(data, key):
            data[key] = "/nonexistent"
    datamodule = instantiate(data)
    assert datamodule.mode == "finetune"
    return datamodule.train_transform


def _small_images(count, seed=0):
    """Noise and flat colours, 24 to 56 px a side."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        w, h = (int(v) for v in rng.integers(24, 57, 2))
        if i % 2:
            yield Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        else:
            yield Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 256, 3)))


def _count_posterize_bits(transform):
    """Wrap the posterize ops of ``transform`` (test-only) to record the bits they are called with."""
    drawn = []

    def counting(img, bits, **kwargs):
        drawn.append(bits)
        return posterize(img, bits, **kwargs)

    for op in _augment_ops(transform.transform):
        if op.name in POSTERIZE_OPS:
            assert op.aug_fn is posterize
            op.aug_fn = counting
    return drawn


@pytest.mark.slow
def test_every_finetuning_recipe_transforms_20000_images():
    """BEiT's and DeiT's RandAugment draws 0-bit posterize (a black image) in about 0.15% of
    images; on Pillow >= 13 timm's own op raises there. Every shipped fine-tuning recipe must get
    through 20,000 images."""
    recipes = _finetune_recipes()
    assert {"experiment=beit_base_finetune_in1k", "experiment=smoke_finetune", "task=finetune"} <= set(recipes)
    report, done = {}, {}
    start = time.perf_counter()
    for name, cfg in recipes.items():
        transform = _training_transform(cfg)
        key = repr(transform)  # recipes with the same transform (e.g. DeiT's and BEiT's) draw the same: run once
        if key in done:
            report[name] = f"same transform as {done[key]}"
            continue
        done[key] = name
        drawn = _count_posterize_bits(transform)
        random.seed(0)
        np.random.seed(0)
        torch.manual_seed(0)
        t0 = time.perf_counter()
        for img in _small_images(20_000):
            out = transform(img)["image"]
            assert out.shape == (3, 32, 32) and torch.isfinite(out).all(), name
        report[name] = f"{drawn.count(0)} 0-bit of {len(drawn)} posterize draws, {time.perf_counter() - t0:.1f} s"
        if cfg.data.auto_augment and "inc1" in cfg.data.auto_augment:
            assert drawn.count(0) > 0, f"{name}: no 0-bit posterize in 20,000 images; the test lost its point"
    print(f"\n20,000 images per fine-tuning transform, {time.perf_counter() - start:.1f} s in all:")
    for name, row in report.items():
        print(f"  {name}: {row}")


# --- interpolation of the pre-training views ---------------------------------------------------
def _detailed_image(size=(97, 83), seed=0):
    """Smooth gradients plus noise: every resampling kernel leaves a different trace."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    base = np.stack([x * 255 / size[0], y * 255 / size[1], ((x // 3 + y // 3) % 2) * 255], -1)
    img = np.clip(base * 0.6 + rng.integers(0, 102, (size[1], size[0], 3)), 0, 255)
    return Image.fromarray(img.astype(np.uint8))


def _expected_view(img, crop, size, resample):
    top, left, height, width = crop
    return TF.to_tensor(img.crop((left, top, left + width, top + height)).resize((size, size), resample))


def _max_diff(a, b):
    return float((a - b).abs().max())


TOL = 1.5 / 255  # one grey level (PIL results are identical; allow rounding of another backend)


def _crops(img, t):
    crops = [(0, 0, img.height, img.width), (5, 11, 40, 57), (20, 3, 63, 31)]
    for seed in range(3):  # and crops drawn the way the transform draws them
        torch.manual_seed(seed)
        crops.append(t.crop_params(img))
    return crops


def test_pretrain_views_use_bicubic_and_lanczos_on_the_same_crop(monkeypatch):
    t = BeitPretrainTransform(input_size=48, tokenizer_size=24, color_jitter=0.0, hflip=0.0,
                              mean=(0, 0, 0), std=(1, 1, 1))
    assert (t.interpolation, t.tokenizer_interpolation) == (InterpolationMode.BICUBIC, InterpolationMode.LANCZOS)
    img = _detailed_image()
    for crop in _crops(img, t):
        monkeypatch.setattr(t, "crop_params", lambda _img, crop=crop: crop)
        sample = t(img)
        view, token_view = sample["image"], sample["tokenizer_image"]
        assert _max_diff(view, _expected_view(img, crop, 48, Image.BICUBIC)) < TOL
        assert _max_diff(token_view, _expected_view(img, crop, 24, Image.LANCZOS)) < TOL
        # the tolerance tells the kernels apart: swapped interpolations would fail
        assert _max_diff(view, _expected_view(img, crop, 48, Image.BILINEAR)) > 4 * TOL
        assert _max_diff(view, _expected_view(img, crop, 48, Image.LANCZOS)) > 4 * TOL
        assert _max_diff(token_view, _expected_view(img, crop, 24, Image.BICUBIC)) > 4 * TOL
        assert _max_diff(token_view, _expected_view(img, crop, 24, Image.BILINEAR)) > 4 * TOL


def test_pretrain_interpolations_are_configurable(monkeypatch):
    t = BeitPretrainTransform(input_size=48, tokenizer_size=24, color_jitter=0.0, hflip=0.0, mean=(0, 0, 0),
                              std=(1, 1, 1), interpolation="bilinear", tokenizer_interpolation="bicubic")
    img, crop = _detailed_image(), (5, 11, 40, 57)
    monkeypatch.setattr(t, "crop_params", lambda _img: crop)
    sample = t(img)
    assert _max_diff(sample["image"], _expected_view(img, crop, 48, Image.BILINEAR)) < TOL
    assert _max_diff(sample["tokenizer_image"], _expected_view(img, crop, 24, Image.BICUBIC)) < TOL
    with pytest.raises(ValueError, match="unknown interpolation"):
        BeitPretrainTransform(tokenizer_interpolation="lanczos3")


def test_tokenizer_training_view_uses_lanczos():
    t = TokenizerViewTransform(24, hflip=0.0)
    img = _detailed_image()
    for seed in range(3):
        torch.manual_seed(seed)
        crop = T.RandomResizedCrop.get_params(img, t.scale, t.ratio)
        torch.manual_seed(seed)
        view = t(img)["tokenizer_image"]
        assert _max_diff(view, _expected_view(img, crop, 24, Image.LANCZOS)) < TOL
        assert _max_diff(view, _expected_view(img, crop, 24, Image.BICUBIC)) > 4 * TOL


def test_pretraining_datamodule_uses_the_paper_interpolations():
    from beit_lightning.data import GeneratedDataModule

    dm = GeneratedDataModule(mode="pretrain", input_size=32, tokenizer_size=16, patch_size=8, num_masking_patches=6,
                             min_num_patches=2)
    for t in (dm.train_transform, dm.val_transform):
        assert (t.interpolation, t.tokenizer_interpolation) == (InterpolationMode.BICUBIC, InterpolationMode.LANCZOS)
