"""The fast path of BEiT's pre-training transform (``fast_decode=True``, the data modules' default):
same random draws and crop distribution as the exact path, pixels within a stated bound (on
photograph-like JPEGs), reduced-scale JPEG decoding only where the crop allows it, and the real
data paths (image folders, shards) hand it undecoded images."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode

from beit_lightning.data import BeitPretrainTransform, BlockwiseMaskGenerator
from beit_lightning.data.decode import ImageDecodeError, decode_rgb, draft_scale, encoded_bytes, resize_uint8
from beit_lightning.data.generated import draw_shape_image
from beit_lightning.data.photos import natural_image, natural_jpeg

_PIL = {InterpolationMode.BICUBIC: Image.BICUBIC, InterpolationMode.BILINEAR: Image.BILINEAR,
        InterpolationMode.LANCZOS: Image.LANCZOS}


def encode(width: int, height: int, seed: int, fmt: str = "JPEG") -> bytes:
    """An ImageNet-like picture (gradient, shape, noise) encoded as ``fmt`` (JPEG quality 90)."""
    rng = np.random.default_rng(seed)
    img = draw_shape_image(seed % 10, 448, rng).resize((width, height), Image.BICUBIC)
    noisy = np.clip(np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (height, width, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def both(blob: bytes, seed: int, **kwargs) -> tuple[dict, dict]:
    exact = BeitPretrainTransform(224, 112, **kwargs)
    fast = BeitPretrainTransform(224, 112, fast_decode=True, **kwargs)
    torch.manual_seed(seed)
    random.seed(seed)  # the mask generator's stream
    a = exact(Image.open(io.BytesIO(blob)).convert("RGB"))
    torch.manual_seed(seed)
    random.seed(seed)
    b = fast(Image.open(io.BytesIO(blob)))  # undecoded, as a lazy decode helper hands it over
    return a, b


def levels(a: dict, b: dict) -> tuple[float, float]:
    """Mean absolute difference of the two views, in 8-bit levels (0-255)."""
    image = (a["image"] - b["image"]).abs().mean().item() * 255 * 0.5  # std 0.5
    tokens = (a["tokenizer_image"] - b["tokenizer_image"]).abs().mean().item() * 255
    return image, tokens


JPEGS = [encode(*((500, 375) if s % 2 else (468, 401)), seed=s) for s in range(8)]
PHOTOS = [natural_jpeg(*((500, 375) if s % 2 else (468, 401)), seed=s) for s in range(6)]


def test_fast_path_draws_the_same_crop_flip_and_random_state(monkeypatch):
    exact = BeitPretrainTransform(224, 112)
    fast = BeitPretrainTransform(224, 112, fast_decode=True)
    for t in (exact, fast):
        t.crops = []
        draw = t.crop_params
        monkeypatch.setattr(t, "crop_params", lambda img, t=t, draw=draw: t.crops.append((img.size, draw(img))) or t.crops[-1][1])
    after = []
    for seed, blob in enumerate(JPEGS):
        for t, decode in ((exact, True), (fast, False)):
            torch.manual_seed(seed)
            img = Image.open(io.BytesIO(blob))
            t(img.convert("RGB") if decode else img)
            after.append(torch.rand(()))
    assert exact.crops == fast.crops  # drawn on the full-resolution size, same values
    assert after[0::2] == after[1::2]  # the same number of draws from the same generator


@pytest.mark.parametrize("jitter", [0.0, 0.4])
def test_fast_path_pixels_stay_close_to_the_exact_path(jitter):
    # Measured on photograph-like ImageNet-size JPEGs (benchmarks/RESULTS.md, 2026-12-04), mean
    # (worst image) in levels, 224px / 112px view: no jitter 0.03 (0.25) / 0.37 (0.54): the
    # torchvision resize, the 112px view from the 224px one; jitter 0.4 about 0.6 (1.0) / 0.5
    # (0.9): jitter after the resize. Bounds per view leave a margin.
    diffs = np.array([levels(*both(blob, seed, color_jitter=jitter, hflip=0.5)) for seed, blob in enumerate(PHOTOS)])
    bounds = ((0.1, 0.4), (0.6, 0.9)) if jitter == 0 else ((1.0, 2.0), (1.0, 2.0))  # (mean, worst) per view
    for view, (bound_mean, bound_one) in enumerate(bounds):
        assert diffs[:, view].mean() < bound_mean, diffs
        assert diffs[:, view].max() < bound_one, diffs
    if jitter == 0:  # the 112px view is computed from the 224px one: not identical, close
        assert diffs[:, 1].mean() > 0.1


def test_crop_statistics_are_unchanged():
    """Scale and aspect of the drawn crops agree between paths over many draws (they share the draw code)."""
    stats = []
    for fast in (False, True):
        t = BeitPretrainTransform(224, 112, fast_decode=fast)
        img = Image.open(io.BytesIO(JPEGS[1]))
        torch.manual_seed(0)
        crops = np.array([t.crop_params(img) for _ in range(2000)], dtype=float)
        scale = crops[:, 2] * crops[:, 3] / (img.size[0] * img.size[1])
        aspect = np.log(crops[:, 3] / crops[:, 2])
        stats.append((scale.mean(), scale.std(), aspect.mean(), aspect.std()))
    assert stats[0] == stats[1]
    assert 0.35 < stats[0][0] < 0.6  # about uniform in [0.08, 1], less what does not fit the image


def test_tensor_resize_matches_pillow_and_decode_errors_are_typed():
    img = natural_image(300, 260, seed=4)
    pixels = torch.from_numpy(np.array(img)).permute(2, 0, 1)
    for mode, size in ((InterpolationMode.BICUBIC, 224), (InterpolationMode.BILINEAR, 100), (InterpolationMode.LANCZOS, 112)):
        ours = resize_uint8(pixels, size, mode).permute(1, 2, 0).numpy().astype(int)
        pil = np.asarray(img.resize((size, size), _PIL[mode])).astype(int)
        assert np.abs(ours - pil).mean() < 0.05 and np.abs(ours - pil).max() <= 2  # Pillow's filters
    blob = natural_jpeg(500, 375, seed=1)
    assert encoded_bytes(Image.open(io.BytesIO(blob))) is not None
    assert encoded_bytes(Image.open(io.BytesIO(blob)).convert("RGB")) is None  # decoded already
    t = BeitPretrainTransform(224, 112, fast_decode=True)
    assert t.accepts_undecoded and not BeitPretrainTransform(224, 112).accepts_undecoded
    truncated = Image.open(io.BytesIO(blob[: len(blob) // 2]))  # the header reads, the pixels do not
    with pytest.raises(ImageDecodeError, match="cannot decode"):
        t(truncated)


def test_reduced_decode_only_where_the_crop_allows_it():
    big = encode(1600, 1200, seed=3)
    assert draft_scale((1600, 1200), (0, 0, 1000, 1000), 224) == 4
    assert draft_scale((1600, 1200), (0, 0, 500, 460), 224) == 2
    assert draft_scale((1600, 1200), (0, 0, 400, 1000), 224) == 1  # a small side: full resolution
    assert draft_scale((500, 375), (0, 0, 375, 375), 224) == 1  # ImageNet size: (almost) never reduced
    img, scale = decode_rgb(Image.open(io.BytesIO(big)), (100, 200, 1000, 1000), 224)
    assert scale == 4 and img.size == (400, 300) and img.mode == "RGB"
    img, scale = decode_rgb(Image.open(io.BytesIO(big)), (100, 200, 300, 300), 224)
    assert scale == 1 and img.size == (1600, 1200)
    png = Image.open(io.BytesIO(encode(1600, 1200, seed=3, fmt="PNG")))
    assert decode_rgb(png, (0, 0, 1200, 1200), 224)[1] == 1  # not a JPEG: no DCT scaling
    decoded = Image.open(io.BytesIO(big)).convert("RGB")
    assert decode_rgb(decoded, (0, 0, 1200, 1200), 224)[1] == 1  # already decoded
    grey = io.BytesIO()
    Image.open(io.BytesIO(big)).convert("L").save(grey, "JPEG", quality=90)
    img, scale = decode_rgb(Image.open(grey), (0, 0, 1200, 1200), 224)
    assert scale == 4 and img.mode == "RGB"


def test_reduced_decode_stays_close_on_large_crops():
    big = encode(1600, 1200, seed=5)
    t = BeitPretrainTransform(224, 112, scale=(0.5, 1.0), color_jitter=0.0, hflip=0.5, fast_decode=True)
    exact = BeitPretrainTransform(224, 112, scale=(0.5, 1.0), color_jitter=0.0, hflip=0.5)
    for seed in range(4):
        torch.manual_seed(seed)
        crop = t.crop_params(Image.open(io.BytesIO(big)))
        assert draft_scale((1600, 1200), crop, 224) >= 2
        a, b = both(big, seed, scale=(0.5, 1.0), color_jitter=0.0, hflip=0.5)
        image, tokens = levels(a, b)
        assert image < 1.5 and tokens < 1.5, (image, tokens)  # measured ~0.3-0.8 levels
    assert "fast_decode=True, device_augment=False)" in repr(t) and exact.fast_decode is False


def test_png_and_decoded_inputs_take_the_full_resolution_path():
    png = encode(500, 375, seed=2, fmt="PNG")
    a, b = both(png, 2)
    assert max(levels(a, b)) < 3.0
    torch.manual_seed(0)
    t = BeitPretrainTransform(224, 112, fast_decode=True)
    out = t(Image.open(io.BytesIO(JPEGS[0])).convert("RGB"))
    assert out["image"].shape == (3, 224, 224) and out["tokenizer_image"].shape == (3, 112, 112)
    assert out["tokenizer_image"].min() >= 0 and out["tokenizer_image"].max() <= 1


def test_mask_is_unchanged():
    mask = BlockwiseMaskGenerator(14, 75, min_num_patches=16)
    for seed, blob in enumerate(JPEGS[:4]):
        a, b = both(blob, seed, mask_generator=mask)
        assert torch.equal(a["mask"], b["mask"]) and int(b["mask"].sum()) == 75


def test_datamodule_switch():
    from beit_lightning.data.datamodule import BeitDataModule

    assert BeitDataModule(mode="pretrain").train_transform.fast_decode is True  # the default
    assert BeitDataModule(mode="pretrain", fast_decode=False).train_transform.fast_decode is False
    assert BeitDataModule(mode="pretrain").val_transform.fast_decode is False  # validation stays exact


def test_float_colour_jitter_is_pillows():
    """jitter_views on float levels computes what torchvision's ColorJitter computes on a PIL image
    (ImageEnhance: 8-bit steps, clipping, truncation) when the whole image is the view itself."""
    from torchvision import transforms as T
    from torchvision.transforms import functional as TF

    from beit_lightning.data.transforms import jitter_views

    differing, worst = [], 0.0
    for seed in range(20):
        img = natural_image(96, 80, seed=seed)
        torch.manual_seed(seed)
        params = T.ColorJitter.get_params([0.6, 1.4], [0.6, 1.4], [0.6, 1.4], None)
        ref = img
        for fn_id in [i for i in params[0].tolist() if i < 3]:  # 3: hue, not drawn
            adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)[fn_id]
            ref = adjust(ref, params[1 + fn_id])
        x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float()
        ours = jitter_views([x.clone()], params, x.clone())[0]
        d = (ours - torch.from_numpy(np.array(ref)).permute(2, 0, 1).float()).abs()
        differing.append((d > 0).float().mean().item())
        worst = max(worst, d.max().item())
    # measured: 0.01% of pixels differ (Pillow's integer luma), by at most 3 levels
    assert np.mean(differing) < 1e-3 and worst <= 4, (np.mean(differing), worst)


@pytest.mark.parametrize("mode", [InterpolationMode.LANCZOS, InterpolationMode.BICUBIC])
@pytest.mark.parametrize("shape", [(224, 224, 112), (300, 250, 224), (100, 90, 224)])
def test_float_resize_is_pillows(mode, shape):
    """resize_float (the tokenizer view's Lanczos, which torchvision lacks) equals Image.resize
    to one level, rounded as Pillow rounds its first pass."""
    from beit_lightning.data.decode import resize_float

    width, height, size = shape
    img = natural_image(width, height, seed=3)
    ref = np.asarray(img.resize((size, size), _PIL[mode]), dtype=np.float64)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float()
    ours = resize_float(x, size, mode).round().clamp(0, 255).permute(1, 2, 0).numpy()
    diff = np.abs(ours - ref)
    assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())
