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


def _dark(region: torch.Tensor) -> bool:
    """Some pixel of ``region`` is text-dark (the background is white)."""
    return bool((region.int().sum(-1) < 200).any())


def test_titled_grid_enlarges_the_cells_and_puts_titles_over_their_columns_and_a_legend_under_them():
    colours = torch.tensor([[200, 30, 30], [30, 200, 30], [30, 30, 200]], dtype=torch.uint8)
    cells = [[colours[c].expand(32, 32, 3).clone() for c in range(3)] for _ in range(2)]
    cells[0][2] = colours[2].expand(32, 40, 3).clone()  # the narrower cell below it is padded to 40 (x5)
    grid = visualise.titled_grid(cells, ["first", "second", "third"], legend="red, green and blue", gap=4,
                                 row_titles=["row one", "row two"])
    # 32px cells enlarged x5 (the smallest whole factor reaching 160 px); columns 4 px apart
    assert grid.shape[1] == 160 + 160 + 200 + 2 * 4
    for c in range(3):
        ys, xs = torch.nonzero((grid == colours[c]).all(-1), as_tuple=True)
        assert xs.min() == c * 164 and xs.max() == c * 164 + (199 if c == 2 else 159)
        assert int((grid[int(ys.max()), c * 164 :] == colours[c]).all(-1).sum()) == 160  # padded, not stretched
        assert (ys.max() - ys.min() + 1) > 2 * 160  # one cell per row
        top = int(ys.min())
        assert _dark(grid[:top, c * 164 : c * 164 + 160]), f"no title over column {c}"
    # a row title between the header and each row, and the legend under the last row
    rows = torch.nonzero((grid == colours[0]).all(-1).any(1)).flatten()
    first_end = int(rows[rows < rows.min() + 160].max())
    second_start = int(rows[rows > first_end].min())
    assert _dark(grid[first_end + 1 : second_start])
    assert _dark(grid[int(rows.max()) + 1 :])
    with pytest.raises(ValueError, match="one title per column"):
        visualise.titled_grid(cells, ["only", "two"])


def test_upscale_is_a_whole_nearest_factor_and_leaves_large_images_alone():
    image = torch.randint(0, 256, (32, 48, 3), dtype=torch.uint8)
    big = visualise.upscale(image, 160)
    assert big.shape == (160, 240, 3) and torch.equal(big[::5, ::5], image) and torch.equal(big[4::5, 4::5], image)
    assert visualise.upscale(image, 64).shape == (64, 96, 3)
    large = torch.zeros(224, 300, 3, dtype=torch.uint8)
    assert visualise.upscale(large, 160) is large


def test_text_band_wraps_to_its_width_and_is_not_blank():
    one = visualise.text_band("short", 200)
    wrapped = visualise.text_band("a much longer line of words that cannot fit into eighty pixels", 80)
    assert one.shape[1] == 200 and wrapped.shape[1] == 80 and wrapped.shape[0] > 2 * one.shape[0]
    assert _dark(one) and _dark(wrapped) and not _dark(visualise.text_band("", 50))
    left = visualise.text_band("x", 200)
    centred = visualise.text_band("x", 200, centre=True)
    assert _dark(left[:, :20]) and not _dark(centred[:, :20]) and _dark(centred[:, 90:110])


def test_right_wrong_map_and_colour_scale():
    predicted, target = torch.tensor([[1, 2], [3, 4]]), torch.tensor([[1, 0], [3, 0]])
    mask = torch.tensor([[True, True], [False, True]])
    image = visualise.right_wrong_map(predicted, target, mask, (4, 4))
    right, wrong, white = visualise.RIGHT_WRONG_COLOURS
    assert torch.equal(image[0, 0], right) and torch.equal(image[1, 3], wrong)
    assert torch.equal(image[3, 0], white) and torch.equal(image[3, 3], wrong)
    scale = visualise.colour_scale(300, low="low", high="high")
    assert scale.shape[1] <= 300 and _dark(scale[:, :20])
    bar = scale[(scale.int().sum(-1) < 765).any(1)]  # rows with anything drawn
    # dark blue at the low end, yellow at the high end, as heatmap draws
    row = bar[bar.shape[0] // 2]
    coloured = torch.nonzero((row.int().max(-1).values - row.int().min(-1).values) > 60).flatten()
    low, high = row[coloured.min()].int(), row[coloured.max()].int()
    assert low[2] > low[0] and high[0] > high[2] and high[1] > high[2]


def test_validation_images_have_titles_columns_of_at_least_160px_and_a_legend(tmp_path, colour_tokenizer):
    """The pre-training pictures the callback logs: 4 titled columns (the test tokenizer cannot
    decode), 32px images shown at 160 px, one attention column per head plus input and mean."""
    from types import SimpleNamespace

    import numpy as np
    from PIL import Image

    from beit_lightning import MaskedImageModeling
    from beit_lightning.callbacks import ValidationImages
    from conftest import micro_model

    logger = pl.loggers.CSVLogger(str(tmp_path), name="csv")
    trainer = SimpleNamespace(global_step=3, loggers=[logger], log_dir=str(tmp_path), datamodule=None)
    task = MaskedImageModeling(micro_model(vocab_size=64), colour_tokenizer)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, 1:3, 1:3] = True
    ValidationImages()._pretraining(trainer, task, {"image": images, "mask": mask, "tokenizer_image": images * 0.5 + 0.5})
    folder = Path(logger.log_dir, "images")
    tokens = torch.from_numpy(np.asarray(Image.open(folder / "val_tokens-step0000003.png").convert("RGB")).copy())
    attention = torch.from_numpy(np.asarray(Image.open(folder / "val_attention-step0000003.png").convert("RGB")).copy())
    heads = task.model.backbone.blocks[-1].attn.num_heads
    assert tokens.shape[1] == 4 * 160 + 3 * 4 and attention.shape[1] == (2 + heads) * 160 + (1 + heads) * 4
    for picture, columns in ((tokens, 4), (attention, 2 + heads)):
        for c in range(columns):
            assert _dark(picture[:18, c * 164 : c * 164 + 160]), f"column {c} has no title"
        assert _dark(picture[-30:]), "no legend under the grid"
    # the masked input column greys exactly the masked patches (enlarged x5: patch 8px -> 40px)
    first_row = tokens[(tokens == 128).all(-1).any(1)]
    assert ((first_row[:, :160] == 128).all(-1).sum(1).max()) == 2 * 40


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
@pytest.mark.xdist_group("smoke_console")
def test_smoke_pretraining_logs_token_maps_predictions_and_attention(smoke_console_run):
    tmp_path, run = smoke_console_run  # `beit-lightning experiment=smoke ...` (1 epoch, 64 images), one thread
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
