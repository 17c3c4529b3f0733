"""Hugging Face transformers interop: export_hf / load_checkpoint / create_model_from_hf round trips,
equal logits, the image processor against our evaluation transforms, and the CLI on a real run."""

from __future__ import annotations

import glob
import json
import math
import re
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

from beit_lightning.checkpoints import CheckpointMismatchError, export_main, load_checkpoint
from beit_lightning.data.datamodule import ClassificationTransform
from beit_lightning.data.segmentation_transforms import SegmentationEvalTransform
from beit_lightning.huggingface import (
    HFExportError,
    create_model_from_hf,
    export_hf,
    from_hf_state_dict,
    to_hf,
)
from beit_lightning.models import BeitForMaskedImageModeling, BeitUperNet

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("export_hf writes transformers 5 names", allow_module_level=True)

ADE = Path(__file__).parent / "fixtures" / "ade20k"
IMAGES = sorted(glob.glob(str(ADE / "images" / "validation" / "*.jpg")))  # 683x512, 500x364, 400x300


def mim(**kwargs) -> BeitForMaskedImageModeling:
    args = dict(vocab_size=50, img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2)
    return BeitForMaskedImageModeling("beit_base_patch16_224", **{**args, **kwargs})


def classifier(**kwargs) -> torch.nn.Module:
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5)
    return timm.create_model("beit_base_patch16_224", pretrained=False, **{**args, **kwargs})


def segmenter(**kwargs) -> BeitUperNet:
    args = dict(num_classes=5, img_size=64, out_indices=(0, 1, 2, 3), channels=32, aux_channels=16,
                embed_dim=32, depth=5, num_heads=2, patch_size=16)
    return BeitUperNet("beit_base_patch16_224", **{**args, **kwargs})


def randomise_(model: torch.nn.Module, img_size: int) -> torch.nn.Module:
    """Move every parameter (zero position tables, unit layer scales) and BatchNorm statistic off its
    initial value, so that a wrong or missing mapping cannot hide; BN statistics are measured on random
    images first, so that the logits stay in a range where float32 resolves 1e-5."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_((0.01 if "conv_seg.weight" in name else 0.1) * torch.randn(p.shape, generator=gen))
        batchnorms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        if batchnorms:
            for m in batchnorms:
                m.reset_running_stats()
                m.momentum = None
            model.train()
            for _ in range(2):
                model(torch.randn(4, 3, img_size, img_size, generator=gen))
            for m in batchnorms:
                m.momentum = 0.1
                m.running_var.mul_(torch.rand(m.running_var.shape, generator=gen) * 0.4 + 0.8)
    return model.eval()


def outputs(model, hf, x, mask=None):
    with torch.no_grad():
        if mask is not None:
            return model(x, mask), hf(pixel_values=x, bool_masked_pos=mask).logits[mask]
        return model(x), hf(pixel_values=x).logits


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


CASES = {
    # pre-training encoder: shared relative position bias, final norm on every token, LM head
    "mim": (lambda: mim(), "BeitForMaskedImageModeling", 32),
    # BEiT fine-tuning: per-block tables, layer scale, mean pooling + fc_norm
    "classification_mean": (lambda: classifier(), "BeitForImageClassification", 32),
    # a DeiT-like BEiT: absolute positions, no layer scale, no qkv bias, CLS token after the final norm
    "classification_cls": (lambda: classifier(global_pool="token", use_abs_pos_emb=True, use_rel_pos_bias=False,
                                              init_values=None, qkv_bias=False), "BeitForImageClassification", 32),
    # BEiT + UperNet with the last out index below the last block: a plain index mapping
    "segmentation": (lambda: segmenter(), "BeitForSemanticSegmentation", 64),
    # ... and the official layout, the last block as the last feature map: one identity layer appended;
    # no auxiliary head (use_auxiliary_head=False), absolute positions and a shared table on top
    "segmentation_last_block": (lambda: segmenter(depth=4, aux_head=False, use_abs_pos_emb=True,
                                                  use_shared_rel_pos_bias=True), "BeitForSemanticSegmentation", 64),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_and_equal_logits(case, tmp_path):
    build, class_name, size = CASES[case]
    torch.manual_seed(0)
    ours = randomise_(build(), size)
    export_hf(ours, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == [class_name]

    hf, info = getattr(transformers, class_name).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    hf.eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    mask = None
    if case == "mim":
        mask = torch.rand(2, (size // 8) ** 2, generator=torch.Generator().manual_seed(3)) < 0.4
        assert hf.config.use_shared_relative_position_bias and not hf.config.use_relative_position_bias
    ours_logits, hf_logits = outputs(ours, hf, x, mask)
    torch.testing.assert_close(hf_logits, ours_logits, rtol=0, atol=1e-5)
    assert ours_logits.abs().max() > 0.1  # not a trivially small output

    # back: from the folder into a model built from its config, and into a model we built
    back = create_model_from_hf(tmp_path)
    assert_same_state(back, ours)
    fresh = build().eval()
    if case == "classification_cls":  # transformers' zero query/value biases have no place in a qkv_bias=False model
        result = load_checkpoint(fresh, tmp_path, strict=False)
        assert result.unexpected and all(re.fullmatch(r"blocks\.\d\.attn\.[qv]_bias", k) for k in result.unexpected)
    else:
        result = load_checkpoint(fresh, tmp_path)
        assert not result.unexpected
    assert result.source == "transformers" and not result.missing
    assert_same_state(fresh, ours)


def test_segmentation_last_block_needs_an_identity_layer(tmp_path):
    ours = randomise_(segmenter(depth=4), 64)  # out_indices (0, 1, 2, 3): the last block is used
    export_hf(ours, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_hidden_layers"] == 5 and config["out_indices"] == [2, 3, 4, 5]
    assert config["beit_lightning"]["identity_layers"] == [4]
    hf = transformers.BeitForSemanticSegmentation.from_pretrained(tmp_path).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():  # the appended layer passes its input through unchanged
        hidden = hf.beit(x, output_hidden_states=True).hidden_states
    assert torch.equal(hidden[-1], hidden[-2])
    assert "identity layer" in (tmp_path / "README.md").read_text()

    with pytest.raises(HFExportError, match="cannot select"):
        export_hf(ours, tmp_path / "refused", pad_last_block=False)
    # the recipe's layout without the last block needs no padding
    export_hf(randomise_(segmenter(depth=5), 64), tmp_path / "plain", pad_last_block=False)
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["num_hidden_layers"] == 5


def test_loading_into_a_segmenter_with_other_feature_blocks_is_refused(tmp_path):
    export_hf(randomise_(segmenter(), 64), tmp_path)
    with pytest.raises(CheckpointMismatchError, match=r"blocks \[0, 1, 2, 3\]"):
        load_checkpoint(segmenter(out_indices=(0, 1, 2, 4)), tmp_path)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: segmenter(patch_size=8, img_size=32), "patch size 8"),
        (lambda: segmenter(channels=48), "UperNet width of 48"),
        (lambda: classifier(use_fc_norm=False), "pooling 'avg'"),
        (lambda: classifier(num_classes=0), "without a head"),
        (lambda: classifier(scale_mlp=True), "normalised MLP"),
    ],
)
def test_models_transformers_cannot_express_are_refused(build, message, tmp_path):
    with pytest.raises(HFExportError, match=message):
        export_hf(build(), tmp_path)
    assert not (tmp_path / "config.json").exists()


def _legacy_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 names -> the 4.x names of the checkpoints on the Hub (written out by hand)."""
    rules = [
        (r"^beit\.layers\.(\d+)\.attention\.([qkv])_proj\.", lambda m: f"beit.encoder.layer.{m[1]}.attention.attention."
         + {"q": "query", "k": "key", "v": "value"}[m[2]] + "."),
        (r"^beit\.layers\.(\d+)\.attention\.o_proj\.", r"beit.encoder.layer.\1.attention.output.dense."),
        (r"^beit\.layers\.(\d+)\.mlp\.fc1\.", r"beit.encoder.layer.\1.intermediate.dense."),
        (r"^beit\.layers\.(\d+)\.mlp\.fc2\.", r"beit.encoder.layer.\1.output.dense."),
        (r"^beit\.layers\.(\d+)\.relative_position_bias\.", r"beit.encoder.layer.\1.attention.attention.relative_position_bias."),
        (r"^beit\.layers\.", "beit.encoder.layer."),
        (r"^beit\.shared_position_bias\.", "beit.encoder.relative_position_bias."),
        (r"^fpn\.fpn1\.conv_transpose1\.", "fpn1.0."), (r"^fpn\.fpn1\.normalization\.", "fpn1.1."),
        (r"^fpn\.fpn1\.conv_transpose2\.", "fpn1.3."), (r"^fpn\.fpn2\.", "fpn2.0."),
        (r"psp_modules\.blocks\.(\d+)\.conv\.convolution\.", r"psp_modules.\1.1.conv."),
        (r"psp_modules\.blocks\.(\d+)\.conv\.normalization\.", r"psp_modules.\1.1.bn."),
        (r"psp_bottleneck\.", "bottleneck."), (r"\.convolution\.", ".conv."), (r"\.normalization\.", ".bn."),
    ]
    out = {}
    for key, value in state.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


@pytest.mark.parametrize("case", ["mim", "segmentation"])
def test_transformers_4_names_load(case):
    build, class_name, size = CASES[case]
    ours = randomise_(build(), size)
    _, config, state = to_hf(ours)
    hf = getattr(transformers, class_name)(transformers.BeitConfig(**config))
    hf.load_state_dict(state)
    legacy = _legacy_names(hf.state_dict())
    assert "beit.encoder.layer.0.attention.attention.query.weight" in legacy
    fresh = build()
    result = load_checkpoint(fresh, legacy)
    assert result.source == "transformers" and not result.missing and not result.unexpected
    assert_same_state(fresh, ours)
    assert from_hf_state_dict(legacy).keys() == from_hf_state_dict(state).keys()


def test_folder_exports_to_timm_too(tmp_path):
    """The model card's timm route: beit-lightning-export <folder> ... --model NAME."""
    name = "beit_lightning_micro_patch8_32"  # 64-d, 2 blocks, 8px patches
    ours = randomise_(timm.create_model(name, num_classes=5), 32)
    export_hf(ours, tmp_path / "hf")
    assert export_main([str(tmp_path / "hf"), str(tmp_path / "timm.safetensors"), "--model", name]) == 0
    target = timm.create_model(name, pretrained=True, num_classes=5,
                               pretrained_cfg_overlay=dict(file=str(tmp_path / "timm.safetensors"), num_classes=5))
    assert_same_state(target, ours)


# --- the image processor against our evaluation transforms --------------------------------------

RUN_CLASSIFICATION = {"data": {"_target_": "beit_lightning.data.ImageFolderDataModule", "input_size": 224,
                               "crop_pct": 0.9, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}
RUN_SEGMENTATION = {"data": {"_target_": "beit_lightning.data.ADE20KDataModule", "crop_size": 64, "img_scale": [2048, 512],
                             "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "reduce_zero_label": True}}


@pytest.fixture(scope="module")
def classification_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf_cls")
    export_hf(classifier(img_size=224, patch_size=16, embed_dim=32, depth=2), folder, run_config=RUN_CLASSIFICATION)
    return folder


def test_image_processor_reproduces_the_classification_eval_transform(classification_folder):
    """timm's evaluation transform resizes the shorter side to floor(224 / 0.9) = 248 with Pillow's
    bicubic, centre-crops 224 and normalises. transformers' Pillow backend does the same to the bit
    (tolerance 1e-6) when the crop margin is even (the three ADE20K images: margins 106, 116, 106).
    Its default torchvision backend resizes with torch's bicubic (another kernel: a = -0.75, Pillow's
    -0.5, and its own antialiasing): within 2 grey levels, i.e. 2/255/0.5 after normalisation."""
    ours = ClassificationTransform(input_size=224, is_training=False, interpolation="bicubic", crop_pct=0.9,
                                   mean=(0.5,) * 3, std=(0.5,) * 3)
    pil = transformers.AutoImageProcessor.from_pretrained(classification_folder, backend="pil")
    fast = transformers.AutoImageProcessor.from_pretrained(classification_folder)
    assert pil.size["shortest_edge"] == math.floor(224 / 0.9) and pil.crop_size["height"] == 224
    for path in IMAGES:
        img = Image.open(path).convert("RGB")
        expected = ours(img)["image"]
        torch.testing.assert_close(pil(img, return_tensors="pt")["pixel_values"][0], expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(fast(img, return_tensors="pt")["pixel_values"][0], expected, rtol=0, atol=2 / 255 / 0.5 + 1e-6)


def test_centre_crop_offsets_differ_by_one_pixel_when_the_margin_is_odd(tmp_path):
    """500x364 at 64px (crop_pct 1): the shorter side becomes 64, the longer int(87.9) = 87 in both;
    the margin 23 puts torchvision's crop at round(11.5) = 12 (half to even) and transformers' at 11."""
    export_hf(classifier(img_size=64, patch_size=16), tmp_path,
              run_config={"data": {**RUN_CLASSIFICATION["data"], "input_size": 64, "crop_pct": 1.0}})
    ours = ClassificationTransform(input_size=64, is_training=False, interpolation="bicubic", crop_pct=1.0,
                                   mean=(0.5,) * 3, std=(0.5,) * 3)
    pil = transformers.AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    img = Image.open(IMAGES[1]).convert("RGB")
    assert img.size == (500, 364)
    expected, got = ours(img)["image"], pil(img, return_tensors="pt")["pixel_values"][0]
    assert not torch.allclose(expected, got, atol=1e-3)
    torch.testing.assert_close(got[:, :, 1:], expected[:, :, :-1], rtol=0, atol=1e-6)  # shifted by one column


def test_image_processor_reproduces_the_segmentation_eval_resize(tmp_path):
    """mmseg's evaluation resize fits (2048, 512) keeping the aspect ratio, bilinear without antialiasing;
    transformers' torchvision backend (the default) gives the same tensor to the bit (1e-6) when the image
    is kept (683x512) or enlarged (500x364 -> 703x512). It truncates the new longer side where mmseg rounds:
    400x300 becomes 682x512 there, 683x512 here."""
    export_hf(randomise_(segmenter(), 64), tmp_path, run_config=RUN_SEGMENTATION)
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    assert processor.do_reduce_labels and not processor.do_center_crop
    assert processor.size["shortest_edge"] == 512 and processor.size["longest_edge"] == 2048
    ours = SegmentationEvalTransform((2048, 512))
    for path, exact in zip(IMAGES, (True, True, False), strict=True):
        img = Image.open(path).convert("RGB")
        label = Image.open(path.replace("images", "annotations").replace(".jpg", ".png"))
        expected = ours(img, label)["image"]
        got = processor(img, return_tensors="pt")["pixel_values"][0]
        if exact:
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
        else:
            assert expected.shape[1:] == (512, 683) and got.shape[1:] == (512, 682)
    # the label convention: 0 ("other") -> 255 and v -> v - 1, as our reduce_zero_label
    label = Image.open(IMAGES[0].replace("images", "annotations").replace(".jpg", ".png"))
    got = processor(Image.open(IMAGES[0]).convert("RGB"), segmentation_maps=label, return_tensors="pt")["labels"][0]
    torch.testing.assert_close(got, ours(Image.open(IMAGES[0]), label)["label"])


# --- the CLI on a real Lightning run -------------------------------------------------------------

@pytest.fixture(scope="module")
def finetune_run(tmp_path_factory):
    from hydra import compose, initialize_config_module

    from beit_lightning.cli import train

    run = tmp_path_factory.mktemp("run")
    with initialize_config_module(config_module="beit_lightning.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "experiment=smoke_finetune", f"output_dir={run}", "trainer.max_epochs=1", "data.num_train=64",
            "data.num_val=32", "trainer.enable_progress_bar=false", "logger=csv"])
    train(cfg)
    return run, cfg


def test_cli_exports_a_lightning_checkpoint(finetune_run, tmp_path):
    from hydra.utils import instantiate

    run, cfg = finetune_run
    checkpoint = run / "checkpoints" / "last.ckpt"
    assert export_main(["--format", "hf", str(checkpoint), str(tmp_path)]) == 0
    assert {p.name for p in tmp_path.iterdir()} >= {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"}

    ours = instantiate(cfg.task.model)
    load_checkpoint(ours, checkpoint)
    ours.eval()
    hf, info = transformers.BeitForImageClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(*reversed(outputs(ours, hf.eval(), x)), rtol=0, atol=1e-5)
    assert hf.config.id2label[0] == "disc" and len(hf.config.id2label) == 10  # the generated data's classes

    processor = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert processor["size"] == {"shortest_edge": 64} and processor["crop_size"] == {"height": 64, "width": 64}  # crop_pct 1
    assert processor["image_mean"] == [0.5, 0.5, 0.5] and processor["resample"] == 3

    card = (tmp_path / "README.md").read_text()
    assert "beit_lightning.tasks.ImageClassification" in card and "lr 0.002" in card  # the recipe
    assert re.search(r"\| val/acc1 \| [0-9.]+ \|", card)  # the metrics logged before the checkpoint
    for loader in ("BeitForImageClassification.from_pretrained", "create_model_from_hf", "timm.create_model"):
        assert loader in card

    # a checkpoint without our metadata (older runs): the run folder's config_resolved.yaml and metrics.csv
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    ckpt.pop("beit_lightning", None)
    torch.save(ckpt, run / "checkpoints" / "plain.ckpt")
    assert export_main(["--format", "hf", str(run / "checkpoints" / "plain.ckpt"), str(tmp_path / "plain")]) == 0
    card = (tmp_path / "plain" / "README.md").read_text()
    assert "metrics.csv" in card and re.search(r"\| val/acc1 \| [0-9.]+ \|", card) and "lr 0.002" in card
    hf = transformers.BeitForImageClassification.from_pretrained(tmp_path / "plain").eval()
    torch.testing.assert_close(*reversed(outputs(ours, hf, x)), rtol=0, atol=1e-5)

    # a run with an EMA of the weights: the trained weights by default, the EMA with --ema
    ckpt["state_dict"].update({f"model_ema.module.{k[len('model.'):]}": v + 1 for k, v in ckpt["state_dict"].items()})
    torch.save(ckpt, run / "checkpoints" / "ema.ckpt")
    for flag, shift in (([], 0), (["--ema"], 1)):
        assert export_main(["--format", "hf", *flag, str(run / "checkpoints" / "ema.ckpt"), str(tmp_path / f"ema{shift}")]) == 0
        exported = create_model_from_hf(tmp_path / f"ema{shift}").state_dict()
        for key, value in ours.state_dict().items():
            torch.testing.assert_close(exported[key], value + shift, rtol=0, atol=1e-6)

    # the timm format stays the default and still needs --model
    with pytest.raises(SystemExit):
        export_main([str(checkpoint), str(tmp_path / "x.pth")])
    with pytest.raises(FileNotFoundError, match="config_resolved.yaml"):
        export_main(["--format", "hf", str(tmp_path / "model.safetensors"), str(tmp_path / "again")])
