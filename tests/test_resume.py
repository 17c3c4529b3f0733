"""Resuming as users meet it: the command in a process of its own, a real SIGKILL (or a real SLURM
SIGUSR1) in the middle of an epoch, the README's restart command (`ckpt_path=last` in the same run
folder), and every weight and optimizer tensor compared with an uninterrupted run.

The runs are `beit_lightning.cli:main` (the console script's function) forked from a process that
imported the package once (tests/cli_process.py): 8 s less per run than a fresh interpreter, and
the same process, signals and files otherwise. tests/test_cli.py runs the installed script itself."""

import os
import stat
import time
from pathlib import Path

import pytest
import torch

from beit_lightning.data import generated_records, write_shards
from cli_process import CliRun

TESTS = Path(__file__).parent
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}
# 256 images / batch 32 = 8 steps per epoch, 3 epochs; a step checkpoint every 5 steps (5, 10, 15: mid-epoch),
# 2 data-loader workers (the default of data=generated)
COMMON = ["experiment=smoke", "trainer.max_epochs=3", "logger=csv", "trainer.enable_progress_bar=false",
          "callbacks.checkpoint_steps.every_n_train_steps=5", "data.num_workers=2"]
RUN = [*COMMON, "data.num_train=256", "data.num_val=32"]


def _start(args, env=ENV) -> CliRun:
    """`beit-lightning ARGS` started; its console output goes beside the run folder (hydra.run.dir)."""
    run_dir = Path(next(a for a in args if a.startswith("hydra.run.dir=")).split("=", 1)[1])
    return CliRun(args, env, run_dir.parent / f"{run_dir.name}-console")


def _run(args, env=ENV, timeout=300) -> CliRun:
    out = _start(args, env).wait(timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _assert_same_training_state(a_path: Path, b_path: Path) -> None:
    a = torch.load(a_path, weights_only=True)
    b = torch.load(b_path, weights_only=True)
    assert a["global_step"] == b["global_step"] and a["epoch"] == b["epoch"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    assert len(a["optimizer_states"]) == len(b["optimizer_states"])
    for opt_a, opt_b in zip(a["optimizer_states"], b["optimizer_states"], strict=True):  # GAN training: two
        sa, sb = opt_a["state"], opt_b["state"]
        assert sa.keys() == sb.keys() and len(sa) > 0
        for index, state in sa.items():
            for name, value in state.items():
                assert torch.equal(value, sb[index][name]), (index, name)
    assert a["lr_schedulers"] == b["lr_schedulers"]


def _kill_when(proc: CliRun, path: Path, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.kill_group()  # SIGKILL to the trainer and its data-loader workers, as a node failure would
    assert path.exists(), "the run ended before it could be killed"


def _shards(tmp_path: Path) -> str:
    folder = tmp_path / "shards"
    write_shards(generated_records(256, 64, 10, seed=3), str(folder), classes=[str(i) for i in range(10)],
                 samples_per_shard=64)
    return str(folder / "shard-{000000..000003}.tar")


@pytest.fixture(scope="session")
def straight_run(tmp_path_factory) -> Path:
    """The uninterrupted RUN (3 epochs, 24 steps), made once and compared with by the tests of the
    `straight_run` xdist group (pytest-xdist sends a group to one worker, which keeps this fixture)."""
    folder = tmp_path_factory.mktemp("straight")
    _run([*RUN, f"hydra.run.dir={folder}"])
    return folder


SHARES_STRAIGHT_RUN = pytest.mark.xdist_group("straight_run")


@pytest.mark.slow(seconds=20)
@pytest.mark.parametrize("source", [pytest.param("generated", marks=SHARES_STRAIGHT_RUN), "shards", "accumulation",
                                    "segmentation", "splitmask", "gan"])
def test_sigkill_mid_epoch_then_ckpt_path_last_continues_bit_for_bit(tmp_path, source, request):
    args, kill_at, epoch_end = list(RUN), 10, "epoch001-step0000016.ckpt"  # step 10: batch 2 of epoch 1
    if source == "shards":
        args = [*COMMON, "data=imagenet_shards", f"data.train_urls='{_shards(tmp_path)}'", "data.batch_size=32",
                 "data.tokenizer_size=64", "data.num_masking_patches=26", "data.min_num_patches=4"]
    if source == "segmentation":  # BEiT + UperNet on generated segmentation shards: 128 / 16 = 8 steps per epoch
        args = [a for a in COMMON if not a.startswith("experiment=")]
        args = ["experiment=smoke_segmentation", *args, "data.num_train=128", "data.num_val=8"]
    if source == "splitmask":  # SplitMask pre-training: the split drawn in the data workers, two losses
        args = ["experiment=smoke_splitmask", *[a for a in RUN if not a.startswith("experiment=")]]
    if source == "gan":  # ViTGAN, manual optimisation: two optimiser steps per batch, 16 per epoch; latents,
        # DiffAugment and the EMA generator must all continue exactly (step 10: batch 5 of epoch 0)
        args = ["experiment=smoke_vitgan", *[a for a in RUN if not a.startswith("experiment=")],
                "trainer.check_val_every_n_epoch=1", "trainer.max_steps=-1"]
        kill_at, epoch_end = 10, "epoch000-step0000016.ckpt"
    if source == "accumulation":  # 7 batches per epoch, 2 per step: 4 steps per epoch (the last of 1 batch)
        args, kill_at, epoch_end = [*COMMON, "data.num_train=224", "data.num_val=32", "trainer.accumulate_grad_batches=2"], \
            5, "epoch001-step0000008.ckpt"  # step 5: batches 0-1 of epoch 1
    if source == "generated":
        straight = request.getfixturevalue("straight_run")
    else:
        straight = tmp_path / "straight"
        _run([*args, f"hydra.run.dir={straight}"])
    if source == "accumulation":  # every batch of every epoch trained: 3 x 4 steps
        assert torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 12

    killed = tmp_path / "killed"
    proc = _start([*args, f"hydra.run.dir={killed}"])
    _kill_when(proc, killed / "checkpoints" / f"newest-step{kill_at:07d}.ckpt")
    assert not (killed / "checkpoints" / epoch_end).exists()
    resumed = _run([*args, f"hydra.run.dir={killed}", "ckpt_path=last"])
    assert "not resumable" not in resumed.stderr
    _assert_same_training_state(straight / "checkpoints" / "last.ckpt", killed / "checkpoints" / "last.ckpt")


@pytest.mark.slow
@SHARES_STRAIGHT_RUN
def test_exactly_one_last_ckpt_and_it_holds_the_newest_state(straight_run):
    # 24 steps in 3 epochs with a step checkpoint every 5: the last step checkpoint is at 20, training ends at 24
    names = sorted(p.name for p in (straight_run / "checkpoints").iterdir())
    assert names == ["epoch000-step0000008.ckpt", "epoch001-step0000016.ckpt", "epoch002-step0000024.ckpt", "last.ckpt",
                     "newest-step0000020.ckpt"]
    last = torch.load(straight_run / "checkpoints" / "last.ckpt", weights_only=True)
    epoch_end = torch.load(straight_run / "checkpoints" / "epoch002-step0000024.ckpt", weights_only=True)
    assert last["global_step"] == 24
    for key, value in epoch_end["state_dict"].items():
        assert torch.equal(value, last["state_dict"][key]), key


@pytest.mark.slow
@SHARES_STRAIGHT_RUN
def test_slurm_requeue_resumes_from_the_signal_checkpoint(tmp_path, straight_run):
    """SLURM's SIGUSR1 at step 12 makes Lightning save hpc_ckpt_1.ckpt and call `scontrol requeue`; the
    requeued command (`ckpt_path=last`) must resume that step-12 state, not last.ckpt (step 10)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    slurm = {**ENV, "PATH": f"{bin_dir}:{ENV['PATH']}", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1",
             "SLURM_JOB_NAME": "beit", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
             "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost", "SLURM_CPUS_ON_NODE": "2"}
    run_dir = tmp_path / "job"
    signal_args = ["+callbacks.signal._target_=signal_at_step.SignalAtStep", "+callbacks.signal.step=12"]
    proc = _start([*RUN, *signal_args, f"hydra.run.dir={run_dir}"], env=slurm)
    hpc = run_dir / "hpc_ckpt_1.ckpt"
    deadline = time.time() + 240
    while not (tmp_path / "scontrol.log").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.kill_group()  # SLURM ends the job after the requeue
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert torch.load(hpc, weights_only=True)["global_step"] == 12
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 10

    resumed = _run([*RUN, f"hydra.run.dir={run_dir}", "ckpt_path=last"], env=slurm)
    assert "hpc_ckpt_1.ckpt" in resumed.stdout + resumed.stderr
    _assert_same_training_state(straight_run / "checkpoints" / "last.ckpt", run_dir / "checkpoints" / "last.ckpt")
