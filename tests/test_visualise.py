"""Images in the logs (pre-training token maps and attention, a confusion matrix, codebook usage),
the pictures' building blocks against reference computations, a quiet console, and
`beit-lightning-info`."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from timm.models.vision_transformer import VisionTransformer

from beit_lightning import visualise
from beit_lightning.callbacks import flops_per_image
from beit_lightning.data import GeneratedDataModule
from beit_lightning.info import describe_checkpoint
from beit_lightning.tasks import TokenizerTraining
from beit_lightning.tokenizers import DiscreteVAE

EXE = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


# --- the building blocks ---------------------------------------------------------------------
def test_attention_maps_equal_softmax_of_queries_and_keys():
    """The CLS row of the last block's attention, recomputed by hand from its qkv weights."""
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=0).eval()
    images = torch.randn(2, 3, 32, 32)
    inputs = []
    vit.blocks[-1].attn.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
    maps = visualise.attention_maps(vit, images)
    x = inputs[-1]  # B x (1 + 16) x 32, the normed input of the last attention
    attn = vit.blocks[-1].attn
    q, k, _ = attn.qkv(x).reshape(2, 17, 3, 4, 8).permute(2, 0, 3, 1, 4)
    probs = ((q * 8**-0.5) @ k.transpose(-2, -1)).softmax(-1)  # B x heads x 17 x 17
    torch.testing.assert_close(maps, probs[:, :, 0, 1:].reshape(2, 4, 4, 4))
    assert attn.fused_attn == type(attn)(32, 4).fused_attn  # the fused path is restored


def test_masked_image_greys_exactly_the_masked_patches():
    image = torch.full((16, 16, 3), 7, dtype=torch.uint8)
    mask = torch.tensor([[True, False], [False, True]])
    out = visualise.masked_image(image, mask)
    assert (out[:8, :8] == 128).all() and (out[8:, 8:] == 128).all()
    assert (out[:8, 8:] == 7).all() and (out[8:, :8] == 7).all()


def test_token_colours_are_fixed_and_token_maps_are_nearest_upscaled():
    assert torch.equal(visualise.token_colours(50), visualise.token_colours(50))
    colours = visualise.token_colours(4)
    image = visualise.colour_map(torch.tensor([[0, 1], [2, 3]]), colours, (8, 8))
    assert image.shape == (8, 8, 3) and torch.equal(image[5, 1], colours[2]) and torch.equal(image[7, 7], colours[3])
    palette = visualise.class_palette(3)
    assert torch.equal(visualise.colour_map(torch.tensor([[255]]), palette)[0, 0], torch.zeros(3, dtype=torch.uint8))


def test_confusion_image_normalises_rows():
    confusion = torch.tensor([[9, 1], [0, 2]])
    image = visualise.confusion_image(confusion, cell=4)
    # the brightest cells (row-normalised 0.9 and 1.0) are on the diagonal; an empty cell is dark
    assert image[1, 1].sum() > image[1, 5].sum() and image[5, 5].sum() > image[5, 1].sum()


def test_flops_per_image_count_the_network_and_the_tokenizer(tmp_path):
    from beit_lightning import DallETokenizer, MaskedImageModeling
    from conftest import micro_model

    dm = GeneratedDataModule(num_train=32, num_val=0, image_size=48, input_size=32, tokenizer_size=32, patch_size=8,
                             num_masking_patches=6, min_num_patches=2, batch_size=8, num_workers=0, cache_dir=str(tmp_path))
    task = MaskedImageModeling(micro_model(vocab_size=64), DallETokenizer(n_hid=16, n_blk_per_group=1, vocab_size=64,
                                                                          image_size=32, seed=0))
    flops = flops_per_image(task, dm)
    # a linear layer of the LM head alone costs 2 x 64 x 64 per masked token: the count is of the right order
    assert flops["model"] > 2 * 64 * 64 * 6 and flops["tokenizer"] > 0
    twice = flops_per_image(task, dm)
    assert twice == flops  # deterministic


# --- images in the logs ----------------------------------------------------------------------
def _tags(folder: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in folder.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"images": 0})
        acc.Reload()
        tags |= set(acc.Tags()["images"])
    return tags


@pytest.mark.slow
def test_smoke_pretraining_logs_token_maps_predictions_and_attention(tmp_path):
    run = subprocess.run(
        [str(EXE / "beit-lightning"), "experiment=smoke", "trainer.max_epochs=1", "data.num_train=64", "data.num_val=32",
         "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, env=ENV, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert {"val/tokens", "val/attention"} <= _tags(tmp_path)
    csv_dir = next(tmp_path.rglob("metrics.csv")).parent
    pngs = sorted(p.name for p in (csv_dir / "images").glob("*.png"))
    assert any(n.startswith("val_tokens") for n in pngs) and any(n.startswith("val_attention") for n in pngs)
    # a quiet console: the frozen tokenizer's eval mode is expected, FLOPs are counted, one line says what runs
    console = run.stdout + run.stderr
    assert "module(s) in eval mode" not in console
    assert "Total FLOPs: 0" not in console and "FLOPs/image" in console
    assert "training MaskedImageModeling of beit_lightning_micro_patch8_32 at 64px on GeneratedDataModule" in console
    assert "litlogger" not in console and "LeafSpec" not in console
    # beit-lightning-info tells what the newest checkpoint is
    info = subprocess.run([str(EXE / "beit-lightning-info"), str(tmp_path)], capture_output=True, text=True, env=ENV,
                          timeout=120)
    assert info.returncode == 0, info.stderr
    for expected in ("MaskedImageModeling", "step 2, epoch 0", "resumable", "beit_lightning_micro_patch8_32 at 64px",
                     "tokenizer: DallETokenizer, 512 codes", "val/loss="):
        assert expected in info.stdout, (expected, info.stdout)


@pytest.mark.slow
def test_fine_tuning_logs_a_confusion_matrix(tmp_path):
    from hydra import compose, initialize_config_module

    from beit_lightning.cli import train

    with initialize_config_module(config_module="beit_lightning.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "experiment=smoke_finetune", f"output_dir={tmp_path}", "trainer.max_epochs=1", "data.num_train=64",
            "data.num_val=32", "trainer.enable_progress_bar=false"])
    train(cfg)
    assert "val/confusion" in _tags(tmp_path)
    png = next(tmp_path.rglob("val_confusion-step*.png"))
    from PIL import Image

    assert Image.open(png).size[0] >= 10 * 2  # 10 classes, at least 2 px each


def test_tokenizer_training_logs_reconstructions_and_codebook_usage(tmp_path):
    dm = GeneratedDataModule(mode="tokenizer", num_train=64, num_val=32, image_size=48, tokenizer_size=32, input_size=32,
                             patch_size=8, batch_size=32, num_workers=0, cache_dir=str(tmp_path))
    tokenizer = DiscreteVAE(vocab_size=32, image_size=32, n_hid=16, n_blk_per_group=1, n_init=16)
    task = TokenizerTraining(tokenizer, lr=1e-3, warmup_steps=1, export_path=None, num_logged_images=4)
    logger = pl.loggers.CSVLogger(str(tmp_path), name="csv")
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=logger, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(task, dm)
    names = sorted(p.name for p in Path(logger.log_dir, "images").glob("*.png"))
    assert any(n.startswith("val_reconstructions") for n in names)
    assert any(n.startswith("val_codebook_usage") for n in names)


def test_info_describes_checkpoints_it_did_not_write(tmp_path):
    path = tmp_path / "beit_base_pt.pth"
    torch.save({"model": {"lm_head.weight": torch.zeros(4, 2), "blocks.0.attn.qkv.weight": torch.zeros(6, 2)}, "epoch": 799}, path)
    text = describe_checkpoint(str(path))
    assert "official BEiT-style release (pre-training (MIM head))" in text and "epoch: 799" in text
