"""Scaling and surviving: the SLURM launcher, FSDP, the lr rule, atomic checkpoints, kill and
resume, Hydra multirun, and Hydra with Lightning's DDP subprocess launcher (CPU, gloo)."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import OmegaConf

from beit_lightning.optim import scale_lr
from conftest import last_logged

EXE = str(Path(sys.executable).with_name("beit-lightning"))
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def _compose(overrides, hydra_config=False):
    with initialize_config_module(config_module="beit_lightning.conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=hydra_config)


def test_slurm_launcher_renders_one_task_per_gpu_and_lightning_requeue_signal(tmp_path):
    cfg = _compose(["experiment=beit_base_pretrain", "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                    "trainer.num_nodes=4", f"output_dir={tmp_path}"], hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params["nodes"] == 4 and params["tasks_per_node"] == params["gpus_per_node"] == cfg.trainer.devices == 8
    assert params["max_num_timeout"] == 0, "Lightning owns requeueing, not submitit"
    # the sbatch script submitit writes from these parameters (its own names: timeout_min -> time, ...)
    from submitit.slurm.slurm import SlurmExecutor, _make_sbatch_string

    rename = SlurmExecutor._equivalence_dict()
    not_sbatch = {"_target_", "submitit_folder", "max_num_timeout", "mem_gb"}
    sbatch = {rename.get(k, k): v for k, v in params.items() if k not in not_sbatch and v is not None}
    script = _make_sbatch_string(command="python -m beit_lightning", folder=str(tmp_path), **sbatch)
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --signal=USR1@120", "#SBATCH --time=4320"):
        assert line in script, line
    assert "srun" in script


def test_fsdp_trainer_wraps_each_transformer_block():
    from timm.models.beit import Block

    cfg = _compose(["model=beit_large", "trainer=fsdp", "output_dir=/tmp/x"])
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, pl.strategies.FSDPStrategy)
    policy = strategy.kwargs["auto_wrap_policy"]
    assert Block in policy._module_classes
    assert cfg.trainer.precision == "bf16-mixed"


def test_learning_rate_scales_with_world_size_batch_and_accumulation():
    trainer = SimpleNamespace(datamodule=SimpleNamespace(batch_size=128), world_size=16, accumulate_grad_batches=1)
    assert scale_lr(trainer, 1.5e-3, 1e-5, 2048) == pytest.approx((1.5e-3, 1e-5))
    trainer = SimpleNamespace(datamodule=SimpleNamespace(batch_size=64), world_size=4, accumulate_grad_batches=2)
    assert scale_lr(trainer, 1.5e-3, 1e-5, 2048) == pytest.approx((1.5e-3 / 4, 1e-5 / 4))
    assert scale_lr(trainer, 1.5e-3, 1e-5, None) == (1.5e-3, 1e-5)


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    import lightning_fabric.utilities.cloud_io as cloud_io

    from beit_lightning.data import GeneratedImages  # noqa: F401 - any module; the model below is tiny

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 2)

    trainer = pl.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu")
    trainer.strategy.connect(Tiny())
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    good = path.read_bytes()

    def crash(*args, **kwargs):  # the process dies while writing the new file
        raise KeyboardInterrupt

    monkeypatch.setattr(cloud_io.fsspec.implementations.local.LocalFileOpener, "write", crash)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(path)
    assert path.read_bytes() == good
    torch.load(path, weights_only=True)


def _run(args, timeout=300, **kw):
    return subprocess.run([EXE, *args], capture_output=True, text=True, env=ENV, timeout=timeout, **kw)


SMOKE = ["experiment=smoke", "data.num_train=64", "data.num_val=16", "data.batch_size=16", "trainer.max_epochs=-1",
         "trainer.max_steps=10", "trainer.enable_progress_bar=false", "callbacks.checkpoint_steps.every_n_train_steps=2",
         "callbacks.checkpoint_steps.save_top_k=-1", "logger=csv"]


@pytest.mark.slow
def test_local_multirun_sweep_writes_a_folder_per_job_and_returns_the_metric(tmp_path):
    out = _run(["-m", "experiment=smoke", "task.lr=1e-3,2e-3", "data.num_train=32", "data.num_val=16",
                "trainer.max_epochs=1", "trainer.enable_progress_bar=false", f"hydra.sweep.dir={tmp_path}"])
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = sorted(p for p in tmp_path.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    lrs = [OmegaConf.load(p / "config_resolved.yaml").task.lr for p in jobs]
    assert lrs == [1e-3, 2e-3]
    assert all((p / "checkpoints" / "last.ckpt").is_file() for p in jobs)

    from beit_lightning import cli

    cfg = _compose(["experiment=smoke", "data.num_train=32", "data.num_val=16", "trainer.max_epochs=1",
                    "trainer.enable_progress_bar=false", f"output_dir={tmp_path / 'direct'}"])
    value = cli.main.__wrapped__(cfg)  # what Hydra (and a sweeper such as Optuna) receives
    assert isinstance(value, float)
    assert value == pytest.approx(last_logged(tmp_path / "direct" / "csv" / "metrics.csv", "val/loss"), rel=1e-6)


@pytest.mark.slow
def test_hydra_with_lightning_ddp_subprocesses_shares_one_output_folder(tmp_path):
    """strategy=ddp on 2 CPU processes with Lightning's subprocess launcher under the Hydra app:
    the child reuses the parent's run folder, and fine-tuning takes the expected optimiser steps."""
    run_dir = tmp_path / "run"
    out = _run(["experiment=smoke_finetune", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                "trainer.precision=32-true", "trainer.max_epochs=2", "data.num_train=64", "data.num_val=32",
                "data.batch_size=8", "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}"],
               cwd=tmp_path, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    # 64 samples / (2 ranks x batch 8) = 4 steps per epoch, 2 epochs
    assert ckpt["global_step"] == 8
    made = [p for p in tmp_path.rglob("config_resolved.yaml")]
    assert made == [run_dir / "config_resolved.yaml"], made
    assert not (tmp_path / "outputs").exists(), "a DDP child must not open a run folder of its own"
