"""Lightning callbacks of the project (configured in ``conf/callbacks/``)."""

from __future__ import annotations

import pytorch_lightning as pl


class SkippedSamplesMonitor(pl.Callback):
    """Log ``data/skipped``: samples skipped so far because they could not be read or decoded,
    summed over ranks, at the end of every training epoch (from the DataModule's
    ``skipped_samples``; a corrupt JPEG is a warning and a count, never a crash)."""

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        count = getattr(datamodule, "skipped_samples", None)
        if count is not None:
            pl_module.log("data/skipped", float(count), reduce_fx="sum", sync_dist=True)
