"""The segmentation task: sliding-window inference, the benchmark metrics, the official optimiser
groups and poly schedule, loading pre-trained BEiT weights into BEiT + UperNet, and a training
run on the generated segmentation data that learns."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from beit_lightning.checkpoints import load_checkpoint
from beit_lightning.models import BeitUperNet
from beit_lightning.optim import layer_decay_param_groups, poly_schedule
from beit_lightning.tasks.segmentation import (
    SemanticSegmentation,
    _window_starts,
    scores_from_confusion,
    slide_inference,
)
from conftest import micro_model


def tiny_segmenter(img_size: int = 32, **kwargs) -> BeitUperNet:
    return BeitUperNet("beit_lightning_micro_patch8_32", num_classes=5, img_size=img_size, out_indices=(0, 1, 2, 3),
                       channels=16, aux_channels=8, depth=4, use_abs_pos_emb=False, use_rel_pos_bias=True,
                       init_values=0.1, **kwargs)


# --- sliding window ------------------------------------------------------------------------------
def test_window_grid_is_mmsegs():
    # ADE20K at 512: a 683-wide image takes 2 columns (0, 171), a 512 one 1, a 1024 one 3 (0, 341, 512)
    assert _window_starts(683, 512, 341) == [0, 171]
    assert _window_starts(512, 512, 341) == [0]
    assert _window_starts(1024, 512, 341) == [0, 341, 512]
    assert _window_starts(300, 512, 341) == [0]  # smaller than the crop: one padded window


@pytest.mark.parametrize("size", [(32, 32), (32, 75), (75, 40), (20, 50)])
def test_slide_inference_covers_every_pixel_and_averages_overlaps(size):
    h, w = size
    images = torch.randn(2, 3, h, w)
    seen = []

    def identity(x):  # logits = the input itself: averaging overlapping windows must give the image back
        seen.append(tuple(x.shape[-2:]))
        return x

    out = slide_inference(identity, images, 3, crop_size=32, stride=21)
    torch.testing.assert_close(out, images)
    assert set(seen) == {(32, 32)}, "the network only ever sees full crops"

    def ones(x):
        return torch.ones(x.shape[0], 4, x.shape[2] // 4, x.shape[3] // 4)

    torch.testing.assert_close(slide_inference(ones, images, 4, 32, 21), torch.ones(2, 4, h, w))


def test_slide_inference_positions_match_a_brute_force_loop():
    """Each window's logits land where its pixels are: a position-dependent network (logits = the
    window's own pixel row index) averaged per pixel equals a loop over windows written out."""
    h, w, crop, stride = 45, 70, 32, 20
    images = torch.zeros(1, 1, h, w)

    def row_in_window(x):
        return torch.arange(crop, dtype=torch.float32).view(1, 1, crop, 1).expand(x.shape[0], 1, crop, crop)

    out = slide_inference(row_in_window, images, 1, crop, stride)
    total, count = torch.zeros(h, w), torch.zeros(h, w)
    for top in _window_starts(h, crop, stride):
        for left in _window_starts(w, crop, stride):
            total[top:top + crop, left:left + crop] += torch.arange(crop, dtype=torch.float32)[: min(crop, h - top), None]
            count[top:top + crop, left:left + crop] += 1
    torch.testing.assert_close(out[0, 0], total / count)


# --- metrics -------------------------------------------------------------------------------------
def test_scores_match_a_hand_computed_confusion_matrix():
    # 4 classes; pixels labelled 255 are ignored; class 3 appears in neither label nor prediction
    label = torch.tensor([[0, 0, 1, 1, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1, 0, 3, 2]])
    task = SemanticSegmentation(tiny_segmenter(), num_classes=4, crop_size=32, stride=21)
    task.val_confusion.update(pred, label)
    confusion = task.val_confusion.compute()
    expected = torch.tensor([[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    assert torch.equal(confusion.cpu(), expected)
    s = scores_from_confusion(confusion)
    # IoU: class 0 = 1 / (2 + 2 - 1), class 1 = 2 / (2 + 3 - 2), class 2 = 0 / (1 + 0 - 0), class 3 absent -> NaN
    assert s["IoU"][:3].tolist() == pytest.approx([1 / 3, 2 / 3, 0.0]) and math.isnan(s["IoU"][3])
    assert s["mIoU"].item() == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)  # absent class left out, not counted as 0
    assert s["mAcc"].item() == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert s["aAcc"].item() == pytest.approx(3 / 5)
    task.val_jaccard.update(pred, label)
    assert task.val_jaccard.compute().item() == pytest.approx(s["mIoU"].item())  # torchmetrics agrees


# --- optimisation --------------------------------------------------------------------------------
def test_poly_schedule_is_mmcvs_linear_warmup_then_poly():
    total, warmup, ratio = 1000, 100, 1e-6
    # mmcv: regular = (1 - t/T)^1; during warmup regular * (1 - (1 - t/W) * (1 - ratio))
    assert poly_schedule(0, total, warmup, ratio) == pytest.approx(ratio)
    assert poly_schedule(50, total, warmup, ratio) == pytest.approx(0.95 * (1 - 0.5 * (1 - ratio)))
    assert poly_schedule(100, total, warmup, ratio) == pytest.approx(0.9)
    assert poly_schedule(600, total, warmup, ratio) == pytest.approx(0.4)
    assert poly_schedule(1000, total, warmup, ratio) == 0.0
    assert poly_schedule(500, total, 0, power=0.9) == pytest.approx(0.5**0.9)


def test_layer_decay_groups_follow_the_official_constructor():
    """BEiT's LayerDecayOptimizerConstructor: num_layers = depth + 2, scale rate^(num_layers - id - 1),
    id 0 for tokens and patch embedding, i + 1 for block i, depth + 1 (scale 1) for the neck and heads;
    weight decay on everything but 1-d tensors and biases (cls_token and the tables are decayed)."""
    model = tiny_segmenter()
    rate, depth = 0.65, 4
    groups = layer_decay_param_groups(model, 0.05, rate, backbone="backbone")
    where = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    expected_scale = {
        "backbone.cls_token": rate ** (depth + 1),
        "backbone.patch_embed.proj.weight": rate ** (depth + 1),
        "backbone.blocks.0.attn.qkv.weight": rate ** depth,
        "backbone.blocks.3.mlp.fc2.weight": rate,
        "backbone.blocks.2.attn.relative_position_bias_table": rate ** 2,
        "neck.fpn1.0.weight": 1.0,
        "decode_head.conv_seg.weight": 1.0,
        "auxiliary_head.conv_seg.weight": 1.0,
    }
    for name, scale in expected_scale.items():
        assert where[id(named[name])]["lr_scale"] == pytest.approx(scale), name
    decayed = {n for n, p in named.items() if where[id(p)]["weight_decay"] > 0}
    assert {"backbone.cls_token", "backbone.blocks.0.attn.relative_position_bias_table",
            "decode_head.conv_seg.weight"} <= decayed
    assert not any(n.endswith(".bias") or named[n].ndim == 1 for n in decayed)
    assert sum(len(g["params"]) for g in groups) == len(named)
    exempt = layer_decay_param_groups(model, 0.05, rate, backbone="backbone", no_weight_decay=["*cls_token", "*_table"])
    where = {id(p): g for g in exempt for p in g["params"]}
    assert where[id(named["backbone.cls_token"])]["weight_decay"] == 0.0
    assert where[id(named["backbone.blocks.1.attn.relative_position_bias_table"])]["weight_decay"] == 0.0


def test_loss_averages_over_all_pixels_like_mmseg():
    model = tiny_segmenter()
    images = torch.randn(2, 3, 32, 32)
    labels = torch.randint(0, 5, (2, 32, 32))
    labels[:, :16] = 255
    official = SemanticSegmentation(model, num_classes=5, crop_size=32, stride=21, aux_weight=0.0)
    valid = SemanticSegmentation(model, num_classes=5, crop_size=32, stride=21, aux_weight=0.0, loss_average="valid")
    model.eval()
    logits = model(images)
    a, b = official._loss(logits, labels), valid._loss(logits, labels)
    up = F.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(b, F.cross_entropy(up, labels, ignore_index=255))
    torch.testing.assert_close(a, b * 0.5)  # half of the pixels are ignored and count as 0 in the mean


# --- checkpoints ---------------------------------------------------------------------------------
def test_a_pretrained_beit_fills_the_backbone_with_tables_resized_to_the_crop(tmp_path):
    """A 32px pre-training checkpoint (shared relative position bias, LM head) into a 64px segmenter:
    every backbone weight is filled, the shared table is copied into each block and resized to the
    larger window, the LM head and final norm are dropped, the neck and heads start fresh."""
    mim = micro_model(vocab_size=64, depth=4)
    state = {"model": mim.state_dict()}
    seg = tiny_segmenter(img_size=64)
    result = load_checkpoint(seg, state)
    assert not result.missing and not result.unexpected and not result.mismatched
    assert any(k.startswith("lm_head") for k in result.dropped)
    assert {k.split(".")[0] for k in result.initialised} == {"neck", "decode_head", "auxiliary_head"}
    torch.testing.assert_close(seg.backbone.blocks[2].mlp.fc1.weight, mim.backbone.blocks[2].mlp.fc1.weight)
    table = seg.backbone.blocks[0].attn.relative_position_bias_table
    assert table.shape[0] == (2 * 8 - 1) ** 2 + 3  # 64px / 8px patches: an 8x8 window
    shared = mim.backbone.rel_pos_bias.relative_position_bias_table
    # the centre offset (0, 0) keeps its value, and the cls entries are copied
    torch.testing.assert_close(table[7 * 15 + 7], shared[3 * 7 + 3])
    torch.testing.assert_close(table[-3:], shared[-3:])
    torch.testing.assert_close(seg.backbone.blocks[1].attn.relative_position_bias_table, table)


# --- end to end ----------------------------------------------------------------------------------
def test_evaluation_on_real_ade20k_images_scores_every_labelled_pixel_at_its_original_size(tmp_path):
    """The three real ADE20K validation images (683x512, 500x364, 400x300) through the ADE20K
    DataModule and sliding-window evaluation (crops of 64 on images resized to a 64 short side):
    the confusion matrix counts exactly the labelled pixels of the original label maps, and the
    metrics are logged."""
    import shutil

    import numpy as np
    import pytorch_lightning as pl
    from PIL import Image

    from beit_lightning.data import ADE20KDataModule

    fixture = Path(__file__).parent / "fixtures" / "ade20k"
    root = tmp_path / "ADEChallengeData2016"
    for kind in ("images", "annotations"):
        for split in ("training", "validation"):
            shutil.copytree(fixture / kind / "validation", root / kind / split)
    labelled = sum(int((np.array(Image.open(p)) != 0).sum()) for p in (fixture / "annotations" / "validation").glob("*.png"))
    dm = ADE20KDataModule(str(root), crop_size=64, img_scale=(256, 64), num_workers=0, batch_size=2)
    model = BeitUperNet("beit_lightning_micro_patch8_32", num_classes=150, img_size=64, out_indices=(0, 1, 2, 3),
                        channels=16, aux_channels=8, depth=4)
    task = SemanticSegmentation(model, num_classes=150, crop_size=64, stride=43)
    counted = []
    task.on_validation_epoch_end = lambda: counted.append(int(task.val_confusion.compute().sum()))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(task, dm)
    assert counted == [labelled]


@pytest.mark.slow(seconds=80)
def test_smoke_segmentation_learns_well_above_a_constant_prediction(tmp_path):
    """`beit-lightning experiment=smoke_segmentation` as shipped: mIoU far above predicting the most
    frequent class everywhere (seeds 0/1/2 reached 0.46/0.40/0.41; with one thread, as under pytest-xdist,
    0.34/0.38/0.37; the constant prediction ~0.09), with mAcc, aAcc and the mask images logged."""
    from hydra import compose, initialize_config_module

    from beit_lightning.cli import train
    from conftest import last_logged

    with initialize_config_module(config_module="beit_lightning.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "experiment=smoke_segmentation", f"output_dir={tmp_path}", "logger=csv", "trainer.enable_progress_bar=false"])
    miou = train(cfg)
    metrics = next(tmp_path.rglob("metrics.csv"))
    assert miou == pytest.approx(last_logged(metrics, "val/mIoU"))
    # the constant prediction's mIoU on the same validation labels: the most frequent class's IoU / #classes present
    from hydra.utils import instantiate

    dm = instantiate(cfg.data)
    dm.setup()
    counts = torch.zeros(cfg.task.num_classes)
    for batch in dm.val_dataloader():
        labels = batch["label"][batch["label"] != 255]
        counts += torch.bincount(labels, minlength=cfg.task.num_classes)[: cfg.task.num_classes].float()
    constant = (counts.max() / counts.sum() / (counts > 0).sum()).item()
    assert constant < 0.15
    assert miou > max(0.2, 2 * constant), (miou, constant)
    assert last_logged(metrics, "val/aAcc") > counts.max().item() / counts.sum().item() + 0.05
    assert 0 < last_logged(metrics, "val/mAcc") <= 1
    assert list(tmp_path.rglob("val_masks-step*.png")), "the predicted masks were not logged as images"


# --- evaluation precision ------------------------------------------------------------------------
def test_evaluation_is_float32_under_a_bf16_autocast_unless_asked_for_bf16():
    """Under the bf16 autocast of a ``bf16-mixed`` Trainer, validation computes the same float32
    logits (and confusion matrix) as a plain float32 run; ``eval_precision="bf16"`` really runs
    under the autocast (its logits differ, by bf16's rounding)."""
    torch.manual_seed(0)
    model = tiny_segmenter().eval()
    images, labels = torch.randn(2, 3, 32, 44), torch.randint(0, 5, (2, 32, 44))
    task = SemanticSegmentation(model, num_classes=5, crop_size=32, stride=21)
    reference = task.predict_logits(images)  # no autocast anywhere
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = task.predict_logits(images)
        task.validation_step({"image": images, "label": labels}, 0)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, reference, rtol=0, atol=0)
    expected = torch.bincount((labels * 5 + reference.argmax(1)).flatten(), minlength=25).view(5, 5)
    assert torch.equal(task.val_confusion.compute(), expected)
    bf16 = SemanticSegmentation(model, num_classes=5, crop_size=32, stride=21, eval_precision="bf16")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        approx = bf16.predict_logits(images)
    error = (approx - reference).abs().max() / reference.abs().max()
    assert 0 < error < 0.05, error  # bf16 keeps 8 bits of mantissa: close, never equal


def test_eval_precision_is_checked_against_the_value_and_the_trainer():
    import pytorch_lightning as pl

    with pytest.raises(ValueError, match="eval_precision must be"):
        SemanticSegmentation(tiny_segmenter(), num_classes=5, crop_size=32, stride=21, eval_precision="fp16")
    task = SemanticSegmentation(tiny_segmenter(), num_classes=5, crop_size=32, stride=21)
    trainer = pl.Trainer(accelerator="cpu", precision="bf16-true", logger=False, enable_progress_bar=False)
    task.trainer = trainer
    with pytest.raises(ValueError, match="task.eval_precision=bf16"):
        task.setup("validate")
    task.trainer = pl.Trainer(accelerator="cpu", precision="bf16-mixed", logger=False, enable_progress_bar=False)
    task.setup("validate")  # bf16 autocast with float32 weights: fp32 evaluation is possible
