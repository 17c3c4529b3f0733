"""Lightning callbacks of the project (configured in ``conf/callbacks/``)."""

from __future__ import annotations

import random

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint


class SkippedSamplesMonitor(pl.Callback):
    """Log ``data/skipped``: samples skipped so far because they could not be read or decoded,
    summed over ranks, at the end of every training epoch (from the DataModule's
    ``skipped_samples``; a corrupt JPEG is a warning and a count, never a crash)."""

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        count = getattr(datamodule, "skipped_samples", None)
        if count is not None:
            pl_module.log("data/skipped", float(count), reduce_fx="sum", sync_dist=True)


class RandomStateCheckpoint(pl.Callback):
    """Save the training process's random state (torch, CUDA, NumPy, Python) in every checkpoint
    and restore it on resume, so that drop path and the other random draws of training continue
    as in an uninterrupted run. (Data augmentation is seeded per sample by the data streams.)
    The state is kept as tensors and plain tuples, so checkpoints stay loadable weights-only."""

    def state_dict(self) -> dict:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state = {
            "torch": torch.get_rng_state(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
            "python": random.getstate(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        torch.set_rng_state(state_dict["torch"])
        kind, keys, pos, has_gauss, gauss = state_dict["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        version, internal, gauss_next = state_dict["python"]
        random.setstate((version, tuple(internal), gauss_next))
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


class NewestCheckpoint(ModelCheckpoint):
    """The one owner of ``last.ckpt``: a ``ModelCheckpoint`` that saves every
    ``every_n_train_steps`` optimiser steps (keeping ``save_top_k`` of those files) and writes
    ``last.ckpt`` at each of those steps *and* at the end of every training epoch (after
    validation), so ``last.ckpt`` always holds the newest state of the run.

    Why: two ``ModelCheckpoint`` callbacks with ``save_last=True`` in one folder write
    ``last.ckpt`` and ``last-v1.ckpt``, and Lightning's own ``save_last`` writes only at the steps
    its callback saves, so neither file is always the newest. Give every other checkpoint
    callback ``save_last: false``. Saving goes through Lightning (a temporary file renamed into
    place), so a killed process never leaves a truncated ``last.ckpt``.
    """

    def __init__(self, *args, save_last: bool = True, **kwargs) -> None:
        if not save_last:
            raise ValueError("NewestCheckpoint exists to write last.ckpt: use ModelCheckpoint for save_last=False")
        super().__init__(*args, save_last=True, **kwargs)

    def _save_last_if_behind(self, trainer: pl.Trainer) -> None:
        # _should_skip_saving_checkpoint is true when this callback already saved at this step
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_behind(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_behind(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._save_last_if_behind(trainer)
