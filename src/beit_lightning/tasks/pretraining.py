"""BEiT pre-training: masked image modeling against a frozen visual tokenizer.

The method in four short steps (``training_step`` reads as them):

1. ``targets``: the frozen tokenizer encodes the tokenizer view; keep the masked positions.
2. ``forward``: the backbone sees the patch view with masked patches replaced by the mask token
   and predicts logits at masked positions only.
3. ``loss``: cross-entropy between those logits and the visual tokens.
4. the Trainer does the rest (precision, gradient clipping, DDP); the optimiser and the
   per-step schedule come from :mod:`beit_lightning.optim`.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from ..models.beit import BeitForMaskedImageModeling
from ..models.tokenizers.base import VisualTokenizer
from ..optim import configure_adamw_cosine, cosine_schedule, param_groups, schedule_steps
from .frozen import expect_frozen_in_eval_mode

__all__ = ["MaskedImageModeling", "NonFiniteLossError"]


class NonFiniteLossError(FloatingPointError):
    """Raised when the loss is NaN or infinite, before any bad update is applied."""


class MaskedImageModeling(pl.LightningModule):
    """BEiT masked-image-modeling task.

    Args:
        model: the network (its ``vocab_size`` must equal the tokenizer's, its patch grid the
            tokenizer's grid).
        tokenizer: a frozen :class:`~beit_lightning.tokenizers.VisualTokenizer`. Its weights are
            not stored in this task's checkpoints (they come from the tokenizer's own file).
        lr: peak learning rate (BEiT: 1.5e-3 at a total batch of 2048).
        min_lr: floor of the cosine schedule.
        weight_decay: AdamW weight decay of the decayed group (0.05).
        weight_decay_end: if set, weight decay follows a cosine from ``weight_decay`` to it.
        betas: AdamW betas (0.9, 0.999).
        warmup_epochs: linear warmup length in epochs (10), used when ``warmup_steps`` is None.
        warmup_steps: linear warmup length in optimiser steps.
        check_finite_loss: stop with :class:`NonFiniteLossError` on a NaN/inf loss (all ranks agree).
        lr_base_batch: the total batch ``lr`` and ``min_lr`` are given for; they are scaled linearly
            to the run's effective batch (per-device batch x devices x accumulation). ``None``: as given.
    """

    def __init__(
        self,
        model: BeitForMaskedImageModeling,
        tokenizer: VisualTokenizer,
        lr: float = 1.5e-3,
        min_lr: float = 1e-5,
        weight_decay: float = 0.05,
        weight_decay_end: float | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_epochs: float = 10.0,
        warmup_steps: int | None = None,
        check_finite_loss: bool = True,
        lr_base_batch: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model", "tokenizer"])
        check_model_tokenizer(model, tokenizer)
        self.model = model
        self.tokenizer = tokenizer.eval().requires_grad_(False)
        self.train_acc = MulticlassAccuracy(num_classes=model.vocab_size, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=model.vocab_size, average="micro")

    def train(self, mode: bool = True) -> MaskedImageModeling:
        """Switch modes but keep the frozen tokenizer in eval mode."""
        super().train(mode)
        self.tokenizer.eval()
        return self

    def on_fit_start(self) -> None:
        expect_frozen_in_eval_mode([self.tokenizer])

    # --- the method ----------------------------------------------------------------------
    def targets(self, tokenizer_image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Visual tokens at the masked positions (batch-major), from the frozen tokenizer."""
        return self.tokenizer.encode(tokenizer_image)[mask]

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits at the masked positions, ``num_masked x vocab_size``."""
        return self.model(image, mask)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), targets)

    def _step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mask = batch["mask"].bool()
        targets = self.targets(batch["tokenizer_image"], mask)
        logits = self(batch["image"], mask)
        return self.loss(logits, targets), logits, targets

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, logits, targets = self._step(batch)
        if self.hparams.check_finite_loss:
            self._stop_on_non_finite(loss)
        self.train_acc(logits.detach(), targets)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/mlm_acc", self.train_acc, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, logits, targets = self._step(batch)
        self.val_acc(logits, targets)
        self.log("val/loss", loss, sync_dist=True, prog_bar=True)
        self.log("val/mlm_acc", self.val_acc, prog_bar=True)

    def _stop_on_non_finite(self, loss: torch.Tensor) -> None:
        bad = not bool(torch.isfinite(loss))
        if self.trainer is not None and self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            raise NonFiniteLossError(
                f"the masked-image-modeling loss is {loss.item()} at step {self.global_step} (on at least one "
                "rank); training stopped before applying this update, so saved checkpoints hold finite weights. "
                "Lower the learning rate or raise the warmup, check the input data, keep gradient clipping on "
                "(trainer.gradient_clip_val=3.0), or use bf16 instead of fp16, then resume from the last checkpoint."
            )

    # --- optimisation ----------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        self._total_steps, _ = schedule_steps(self.trainer, hp.warmup_epochs, hp.warmup_steps)
        return configure_adamw_cosine(
            self.trainer, param_groups(self.model, hp.weight_decay), hp.lr, hp.min_lr, hp.betas,
            hp.warmup_epochs, hp.warmup_steps, hp.lr_base_batch,
        )

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        hp = self.hparams
        if hp.weight_decay_end is None:
            return
        wd = cosine_schedule(self.global_step, self._total_steps, 0, hp.weight_decay, hp.weight_decay_end)
        for group in self.optimizers().optimizer.param_groups:
            if group["weight_decay"] > 0:
                group["weight_decay"] = wd

    # --- checkpoints: the tokenizer is referenced, not stored ------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("tokenizer.")]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key, value in self.tokenizer.state_dict().items():
            state.setdefault(f"tokenizer.{key}", value)


def check_model_tokenizer(model: BeitForMaskedImageModeling, tokenizer: VisualTokenizer) -> None:
    """Fail early, with the fix, when the model and the tokenizer cannot work together."""
    if model.vocab_size != tokenizer.vocab_size:
        raise ValueError(
            f"the model predicts {model.vocab_size} tokens but the tokenizer has a vocabulary of "
            f"{tokenizer.vocab_size}: set model.vocab_size={tokenizer.vocab_size}"
        )
    if tuple(model.patch_grid) != tuple(tokenizer.grid_size):
        raise ValueError(
            f"the model's patch grid is {model.patch_grid} but the tokenizer makes a {tokenizer.grid_size} grid: "
            f"set the tokenizer's image_size to {model.patch_grid[0] * tokenizer.downsample} "
            f"(and the data's tokenizer_size to match)"
        )
