import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from beit_lightning.checkpoints import load_checkpoint
from beit_lightning.cli import ConfigError, train, validate_config
from conftest import last_logged

CONF = Path(__file__).parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
# values an experiment may leave to the user (paths to data and weights)
REQUIRED_BY_USER = {"tokenizer.path", "data.root", "data.train_urls", "task.teacher.checkpoint"}


def _compose(overrides):
    with initialize_config_module(config_module="beit_lightning.conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_builds_its_model(experiment, tmp_path):
    cfg = _compose([f"experiment={experiment}", f"output_dir={tmp_path}"])
    try:
        validate_config(cfg)
    except ConfigError as err:
        # only the paths a user must give may be missing, and the message must name them
        text = str(err)
        assert "required values unset" in text
        unset = text.split("unset: ")[1].split(". Set")[0].split(", ")
        assert set(unset) <= REQUIRED_BY_USER | {f"task.{k}" for k in REQUIRED_BY_USER}, unset
    if "model" in cfg.task:  # masked image modeling, fine-tuning, probing: the network of model=...
        with torch.device("meta"):
            model = instantiate(cfg.task.model)
        backbone = getattr(model, "backbone", model)
        assert backbone.default_cfg["architecture"] == cfg.model.name
        assert backbone.patch_embed.img_size[0] == cfg.data.get("input_size", cfg.data.get("crop_size"))
        if "crop_size" in cfg.data:  # segmentation: BEiT + UperNet at the crop size, one output per class
            assert model.decode_head.conv_seg.out_channels == cfg.task.num_classes == model.auxiliary_head.conv_seg.out_channels
        elif cfg.data.get("mode") == "pretrain":
            assert model.vocab_size == cfg.tokenizer.vocab_size
        else:
            assert backbone.num_classes == cfg.task.get("num_classes", 0) or backbone.num_classes == 0
    elif "generator" in cfg.task:  # GAN training: the ViTGAN pair of model=vitgan_*
        with torch.device("meta"):
            generator, discriminator = instantiate(cfg.task.generator), instantiate(cfg.task.discriminator)
        assert generator.img_size == discriminator.img_size == cfg.data.input_size and cfg.data.mode == "gan"
    else:  # tokenizer training: the tokenizer to train, sized for the data's view
        with torch.device("meta"):
            tokenizer = instantiate(cfg.task.tokenizer)
        assert tokenizer.image_size == cfg.data.tokenizer_size
        assert cfg.data.mode == "tokenizer"


def test_paper_recipe_values():
    cfg = _compose(["experiment=beit_base_pretrain", "output_dir=/tmp/x"])
    assert cfg.model.name == "beit_base_patch16_224"
    assert (cfg.task.lr, cfg.task.weight_decay, cfg.task.warmup_epochs, list(cfg.task.betas)) == (1.5e-3, 0.05, 10, [0.9, 0.999])
    assert cfg.trainer.max_epochs == 800 and cfg.trainer.gradient_clip_val == 3.0
    assert cfg.data.batch_size * cfg.trainer.devices * cfg.trainer.num_nodes == 2048
    assert (cfg.data.num_masking_patches, cfg.data.min_num_patches, cfg.data.tokenizer_size) == (75, 16, 112)
    assert (cfg.model.drop_path_rate, cfg.model.layer_scale_init) == (0.1, 0.1)
    with torch.device("meta"):
        model = instantiate(cfg.task.model)
    n = sum(p.numel() for p in model.backbone.parameters())
    assert 85e6 < n < 87e6  # ViT-B/16 with relative position bias
    assert model.patch_grid == (14, 14)


@pytest.mark.slow
@pytest.mark.xdist_group("smoke_pretrain")
def test_smoke_run_trains_and_writes_a_checkpoint(smoke_pretrain_run):
    tmp_path, cfg, metric = smoke_pretrain_run  # experiment=smoke, 1 epoch on 64 images, through train()
    # train() returns the run's final val/loss (what sweepers optimise): the value logged last
    assert metric == pytest.approx(last_logged(tmp_path / "csv" / "metrics.csv", "val/loss"), rel=1e-6)
    assert 0 < metric < math.log(512) + 0.5  # a cross-entropy over the 512 tokens, not above chance
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "config_resolved.yaml").is_file()
    header = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss", "train/mlm_acc", "val/loss", "val/mlm_acc", "data/skipped"} <= set(header)
    # the checkpoint holds plain data only and loads into a fresh model by load_checkpoint
    model = instantiate(cfg.task.model)
    result = load_checkpoint(model, tmp_path / "checkpoints" / "last.ckpt")
    assert result.source == "lightning" and not result.missing


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["+task.lrr=0.1"], "task.lrr is not an argument of beit_lightning.tasks.MaskedImageModeling"),
        (["tokenizer=dall_e"], "tokenizer.path"),
        (["tokenizer=dall_e", "tokenizer.path=/nonexistent/encoder.pkl"], "does not exist"),
        (["experiment=smoke", "data.num_masking_patches=65"], "exceeds the 8x8 patch grid"),
        (["experiment=smoke", "data.tokenizer_size=32", "tokenizer.image_size=32"], "set tokenizer.image_size and data.tokenizer_size to 64"),
        (["ckpt_path=/nonexistent.ckpt"], "ckpt_path"),
    ],
)
def test_config_errors_are_reported_before_any_work(overrides, message, tmp_path):
    cfg = _compose([*overrides, f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        train(cfg)
    assert not any(tmp_path.iterdir()), "nothing may be written before the configuration is validated"


@pytest.mark.slow
@pytest.mark.xdist_group("smoke_console")
def test_console_script_runs_the_smoke_experiment(smoke_console_run, tmp_path):
    folder, out = smoke_console_run  # `beit-lightning experiment=smoke ...` (1 epoch, 64 images) in a subprocess
    assert out.returncode == 0, out.stderr[-3000:]
    assert (folder / "checkpoints" / "last.ckpt").is_file()
    exe = Path(sys.executable).with_name("beit-lightning")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    bad = subprocess.run([str(exe), "+task.lrr=1", f"hydra.run.dir={tmp_path / 'bad'}"], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode != 0 and "task.lrr is not an argument" in bad.stderr


@pytest.mark.slow
def test_resume_last_checkpoint_of_a_run(tmp_path):
    base = ["experiment=smoke", f"output_dir={tmp_path}", "data.num_train=64", "data.num_val=0",
            "trainer.enable_progress_bar=false", "metric=train/loss"]
    train(_compose([*base, "trainer.max_epochs=1"]))
    first = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert first["global_step"] == 2
    train(_compose([*base, "trainer.max_epochs=2", "ckpt_path=last"]))
    second = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert second["global_step"] == 4 and second["epoch"] == 1


def test_a_fresh_run_in_a_folder_with_checkpoints_is_refused(tmp_path):
    """Without ckpt_path, a second run in the same folder would mix its files with the first one's (and
    `ckpt_path=last` could later resume the other run): refused, naming both ways out."""
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"ckpt_path=last.*hydra\.run\.dir"):
        train(_compose(["experiment=smoke", f"output_dir={tmp_path}"]))
