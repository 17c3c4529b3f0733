from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from beit_lightning.models import BeitForMaskedImageModeling
from beit_lightning.models.tokenizers import VisualTokenizer

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))  # reference_beit and the other helpers

from xdist_balance import pytest_collection_modifyitems, pytest_configure  # noqa: E402, F401 - the hooks


class ColourTokenizer(VisualTokenizer):
    """A small deterministic tokenizer for tests: each 8x8 cell's mean colour quantised to
    4 levels per channel (64 codes). Unlike a random network its codes are spread out, so a
    model can only fit them by learning."""

    downsample = 8

    def __init__(self, image_size: int = 32, levels: int = 4):
        super().__init__()
        self.image_size, self.levels, self.vocab_size = image_size, levels, levels**3

    def encode_logits(self, images: torch.Tensor) -> torch.Tensor:
        cells = torch.nn.functional.avg_pool2d(images, self.downsample)
        q = (cells * self.levels).long().clamp(0, self.levels - 1)
        codes = q[:, 0] * self.levels**2 + q[:, 1] * self.levels + q[:, 2]
        return torch.nn.functional.one_hot(codes, self.vocab_size).permute(0, 3, 1, 2).float()


def micro_model(vocab_size: int = 64, img_size: int = 32, **kwargs) -> BeitForMaskedImageModeling:
    return BeitForMaskedImageModeling("beit_lightning_micro_patch8_32", vocab_size=vocab_size, img_size=img_size, **kwargs)


@pytest.fixture
def colour_tokenizer() -> ColourTokenizer:
    return ColourTokenizer()


if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under pytest-xdist (make test: one worker per core) each worker computes on one thread, and so do
    # the processes it starts (notebook kernels, CLI runs, data-loader workers): OpenMP threads that
    # spin-wait on an oversubscribed machine slow everything down many times.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    import random

    random.seed(0)


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory):
    """Generated shards go to a per-session folder, not the user's cache; weights are never downloaded
    (a name or URL whose file is not in that folder is an error, as on a node without network)."""
    import os

    os.environ["BEIT_LIGHTNING_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ["BEIT_LIGHTNING_OFFLINE"] = "1"


# The smoke pre-training run of several tests, made once per session: `experiment=smoke` on 64 images
# for one epoch. Tests that use one mark themselves with its xdist group, so pytest-xdist runs them on
# the worker that holds the fixture.
SMOKE_PRETRAIN = ["experiment=smoke", "trainer.max_epochs=1", "data.num_train=64", "data.num_val=32",
                  "trainer.enable_progress_bar=false"]


@pytest.fixture(scope="session")
def smoke_console_run(tmp_path_factory):
    """`beit-lightning experiment=smoke ...` as a user types it: the console script in a subprocess (one
    thread, warnings shown), its folder and its completed process (return code, stdout, stderr)."""
    import subprocess

    folder = tmp_path_factory.mktemp("smoke_console")
    exe = Path(sys.executable).with_name("beit-lightning")
    run = subprocess.run([str(exe), *SMOKE_PRETRAIN, f"hydra.run.dir={folder}"], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    return folder, run


@pytest.fixture(scope="session")
def smoke_pretrain_run(tmp_path_factory):
    """The same run through `cli.train` in this process (logging every step): its folder, its composed
    configuration and the metric train() returned."""
    from hydra import compose, initialize_config_module

    from beit_lightning.cli import train

    folder = tmp_path_factory.mktemp("smoke_pretrain")
    with initialize_config_module(config_module="beit_lightning.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*SMOKE_PRETRAIN, f"output_dir={folder}",
                                                       "trainer.log_every_n_steps=1"])
    return folder, cfg, train(cfg)


def logged(csv_path, key: str) -> list[float]:
    """Every value of ``key`` in a CSVLogger ``metrics.csv``, in the order the run logged them."""
    import csv

    with open(csv_path) as f:
        return [float(row[key]) for row in csv.DictReader(f) if row.get(key)]


def last_logged(csv_path, key: str) -> float:
    """The last value of ``key`` in a CSVLogger ``metrics.csv`` (what a run reported last)."""
    values = logged(csv_path, key)
    assert values, f"{key} was never logged in {csv_path}"
    return values[-1]
