"""Lightning callbacks of the project (configured in ``conf/callbacks/``)."""

from __future__ import annotations

import os
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
    ``last.ckpt`` at each of those steps, at the end of every training epoch (after its
    validation when the run validates every epoch; at each validation when validation runs on
    its own schedule) and at the end of training, so ``last.ckpt`` holds the newest saved state.
    File names are never versioned (no ``last-v1.ckpt``): a fresh run in a folder that holds
    checkpoints is refused by ``beit-lightning`` (see :func:`~beit_lightning.cli.train`).

    Why: two ``ModelCheckpoint`` callbacks with ``save_last=True`` in one folder write
    ``last.ckpt`` and ``last-v1.ckpt``, and Lightning's own ``save_last`` writes only at the steps
    its callback saves, so neither file is always the newest. Give every other checkpoint
    callback ``save_last: false``. Saving goes through Lightning (a temporary file renamed into
    place), so a killed process never leaves a truncated ``last.ckpt``.
    """

    def __init__(self, *args, save_last: bool = True, enable_version_counter: bool = False, **kwargs) -> None:
        if save_last is not True:
            raise ValueError(f"NewestCheckpoint exists to write last.ckpt as a file: save_last must be true, got {save_last!r}")
        super().__init__(*args, save_last=True, enable_version_counter=enable_version_counter, **kwargs)

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


def class_palette(num_classes: int, seed: int = 0) -> torch.Tensor:
    """A fixed colour per class (``num_classes x 3`` uint8), and black for ignored pixels (the last row)."""
    generator = torch.Generator().manual_seed(seed)
    colours = torch.randint(0, 256, (num_classes, 3), generator=generator, dtype=torch.uint8)
    return torch.cat([colours, torch.zeros(1, 3, dtype=torch.uint8)])


class SegmentationMaskImages(pl.Callback):
    """Every ``every_n_epochs`` validations, log the first ``num_images`` validation images beside
    their ground truth and predicted masks (one colour per class, ignored pixels black) as one
    grid: to TensorBoard (``val/masks``) and as PNG files under ``<log dir>/images/`` (next to the
    CSV logger's metrics). Rank zero only; the predictions are the task's sliding-window ones, so
    the images show what the metrics measure. Does nothing for tasks without ``predict_logits``."""

    def __init__(self, every_n_epochs: int = 1, num_images: int = 4) -> None:
        self.every_n_epochs, self.num_images = max(1, every_n_epochs), num_images
        self._samples: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _active(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        return (hasattr(pl_module, "predict_logits") and trainer.is_global_zero and not trainer.sanity_checking
                and trainer.current_epoch % self.every_n_epochs == 0)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._samples = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not self._active(trainer, pl_module) or len(self._samples) >= self.num_images:
            return
        for image, label in zip(batch["image"], batch["label"], strict=True):
            if len(self._samples) < self.num_images:
                self._samples.append((image.detach(), label.detach()))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active(trainer, pl_module) or not self._samples:
            return
        import torch.nn.functional as F
        from PIL import Image

        num_classes = int(pl_module.hparams.num_classes)
        ignore = int(pl_module.hparams.get("ignore_index", 255))
        palette = class_palette(num_classes)
        mean = torch.tensor(getattr(trainer.datamodule, "mean", (0.485, 0.456, 0.406))).view(3, 1, 1)
        std = torch.tensor(getattr(trainer.datamodule, "std", (0.229, 0.224, 0.225))).view(3, 1, 1)
        rows = []
        for image, label in self._samples:
            with torch.no_grad():
                pred = pl_module.predict_logits(image[None], size=label.shape[-2:]).argmax(1)[0].cpu()
            label = label.cpu().long()
            rgb = F.interpolate(image[None].float().cpu(), size=label.shape[-2:], mode="bilinear", align_corners=False)[0]
            rgb = ((rgb * std + mean).clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0)

            def colour(mask: torch.Tensor) -> torch.Tensor:
                index = torch.where((mask == ignore) | (mask < 0) | (mask >= num_classes), num_classes, mask)
                return palette[index]

            rows.append(torch.cat([rgb, colour(label), colour(pred)], dim=1))
        width = max(r.shape[1] for r in rows)
        grid = torch.cat([F.pad(r.permute(2, 0, 1), (0, width - r.shape[1])).permute(1, 2, 0) for r in rows], dim=0)
        step = trainer.global_step
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                experiment.add_image("val/masks", grid.numpy(), step, dataformats="HWC")
        folder = os.path.join(trainer.log_dir or trainer.default_root_dir, "images")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(grid.numpy()).save(os.path.join(folder, f"masks-step{step:07d}.png"))
