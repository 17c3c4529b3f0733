"""The VQ-KD validation view against the official one (microsoft/unilm beit2/datasets.py
build_vqkd_dataset(is_train=False): Resize(int(input_size / crop_pct)) with --train_interpolation,
CenterCrop(input_size), ToTensor; crop_pct = 224 / 256 below 384 px), re-computed here with
torchvision's own transforms, through the transform, the DataModule switch and the shipped configs."""

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from beit_lightning.data import GeneratedDataModule, ImageFolderDataModule
from beit_lightning.data.photos import natural_image
from beit_lightning.data.transforms import TokenizerEvalTransform, TokenizerViewTransform


def official_view(img: Image.Image, input_size: int) -> torch.Tensor:
    """The official evaluation transform, written from datasets.py with torchvision's classes."""
    crop_pct = 224 / 256 if input_size < 384 else 1.0
    return T.Compose([
        T.Resize(int(input_size / crop_pct), interpolation=InterpolationMode.BICUBIC),
        T.CenterCrop(input_size),
        T.ToTensor(),
    ])(img)


@pytest.mark.parametrize("width, height", [(500, 375), (375, 500), (640, 427)])
def test_the_view_equals_the_official_resize_and_centre_crop(width, height):
    img = natural_image(width, height, seed=width)
    view = TokenizerEvalTransform(224, crop_pct=0.875, interpolation="bicubic")(img)["tokenizer_image"]
    assert view.shape == (3, 224, 224) and view.dtype == torch.float32
    assert float(view.min()) >= 0.0 and float(view.max()) <= 1.0  # no normalisation: the tokenizer normalises
    assert torch.equal(view, official_view(img, 224))
    assert TokenizerEvalTransform(224, 0.875).resize_size == 256  # int(224 / (224 / 256))


def test_from_384_pixels_the_official_crop_pct_is_one():
    img = natural_image(500, 375, seed=3)
    view = TokenizerEvalTransform(384, crop_pct=1.0, interpolation="bicubic")(img)["tokenizer_image"]
    assert torch.equal(view, official_view(img, 384))


def test_a_crop_pct_outside_zero_to_one_is_refused_with_the_official_values():
    for bad in (0.0, -0.5, 1.2):
        with pytest.raises(ValueError, match=r"crop_pct must be in \(0, 1\].*0.875 = 224/256"):
            TokenizerEvalTransform(224, crop_pct=bad)


def _folder(tmp_path):
    sizes = [(500, 375), (375, 500)]
    for sub in ("train", "val"):
        (tmp_path / sub).mkdir()
        for i, (w, h) in enumerate(sizes):
            natural_image(w, h, seed=10 + i).save(tmp_path / sub / f"img{i}.png")
    return [Image.open(tmp_path / "val" / f"img{i}.png").convert("RGB") for i in range(len(sizes))]


def _folder_data(tmp_path, crop_pct):
    dm = ImageFolderDataModule(root=str(tmp_path), mode="tokenizer", tokenizer_size=224, input_size=224,
                               tokenizer_interpolation="bicubic", tokenizer_val_crop_pct=crop_pct,
                               num_workers=0, batch_size=2)
    dm.setup()
    return dm


def test_the_datamodule_validates_on_the_official_view_when_the_switch_is_set(tmp_path):
    images = _folder(tmp_path)
    dm = _folder_data(tmp_path, 0.875)
    assert isinstance(dm.val_transform, TokenizerEvalTransform)
    for i, img in enumerate(images):
        assert torch.equal(dm.val_set[i]["tokenizer_image"], official_view(img, 224))
    batch = next(iter(dm.val_dataloader()))
    assert batch["tokenizer_image"].shape == (2, 3, 224, 224)
    assert isinstance(dm.train_transform, TokenizerViewTransform)  # training keeps its random-resized crops


def test_without_the_switch_the_view_is_the_whole_short_side_as_before(tmp_path):
    images = _folder(tmp_path)
    dm = _folder_data(tmp_path, None)
    assert isinstance(dm.val_transform, TokenizerViewTransform)
    for i, img in enumerate(images):
        side = min(img.size)
        whole = T.Compose([T.CenterCrop(side), T.Resize(224, interpolation=InterpolationMode.BICUBIC), T.ToTensor()])(img)
        view = dm.val_set[i]["tokenizer_image"]
        assert torch.equal(view, whole)
        assert not torch.allclose(view, official_view(img, 224), atol=0.05)  # the switch changes the view


def _compose(overrides):
    with initialize_config_module(config_module="beit_lightning.conf", version_base="1.3"):
        return compose(config_name="config", overrides=[*overrides, "output_dir=/tmp/x"])


def test_the_smoke_experiment_and_the_task_carry_the_official_value(tmp_path):
    cfg = _compose(["experiment=smoke_tokenizer_vqkd", f"data.cache_dir={tmp_path}"])
    assert cfg.data.tokenizer_val_crop_pct == 0.875 and cfg.data.mode == "tokenizer"
    dm = instantiate(cfg.data)
    assert isinstance(dm, GeneratedDataModule) and isinstance(dm.val_transform, TokenizerEvalTransform)
    assert (dm.val_transform.size, dm.val_transform.resize_size) == (64, 73)  # int(64 / 0.875)
    for data in ("imagefolder", "imagenet_shards"):
        cfg = _compose(["task=tokenizer_vqkd", f"data={data}", "model=beit_base"])
        assert cfg.data.tokenizer_val_crop_pct == 0.875 and cfg.data.tokenizer_size == 224
    assert _compose(["experiment=vqkd_imagenet"]).data.tokenizer_val_crop_pct == 0.875
    assert _compose(["task=tokenizer"]).data.get("tokenizer_val_crop_pct") is None  # the DALL-E tokenizer: unchanged


def test_a_misspelt_key_is_still_an_error(tmp_path):
    cfg = _compose(["experiment=smoke_tokenizer_vqkd", f"data.cache_dir={tmp_path}", "+data.tokenizer_val_crop=0.9"])
    with pytest.raises(InstantiationException, match="tokenizer_val_crop"):
        instantiate(cfg.data)
