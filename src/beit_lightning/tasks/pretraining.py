"""BEiT pre-training: masked image modeling against a frozen visual tokenizer.

The method in four short steps (``training_step`` reads as them):

1. ``targets``: the frozen tokenizer encodes the tokenizer view; keep the masked positions.
2. ``forward``: the backbone sees the patch view with masked patches replaced by the mask token
   and predicts logits at masked positions only.
3. ``loss``: cross-entropy between those logits and the visual tokens.
4. the Trainer does the rest (precision, gradient clipping, DDP); the optimiser and the
   per-step schedule come from :mod:`beit_lightning.optim`.

The ablations of the BEiT paper (Table 4) are options of the same four steps: ``target="pixels"``
regresses the pixels of the masked patches with a linear head (no tokenizer), ``loss_on="all"``
predicts the tokens of every patch ("recover 100% visual tokens"); random instead of blockwise
masking is the data's ``masking="random"``. The defaults are the paper's recipe.

The step never waits for the device (no host synchronisation), so the GPU never idles while
Python catches up: the masked positions are gathered with a count known on the host (masks have
exactly ``num_masking_patches``), metrics skip argument validation, and a non-finite loss or
gradient is caught on the device: the fused AdamW skips that update and every later one (its
``found_inf``, as GradScaler uses it), and the host reads the flag every
``check_finite_every_n_steps`` steps, at epoch end and before a checkpoint is written, then stops
with :class:`NonFiniteLossError` naming the step. The weights stay those of before the bad step.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.plugins.precision import MixedPrecision, Precision
from pytorch_lightning.utilities import rank_zero_info
from torchmetrics.classification import MulticlassAccuracy

from ..models.beit import BeitForMaskedImageModeling, gather_masked
from ..models.tokenizers.base import VisualTokenizer
from ..optim import configure_adamw_cosine, cosine_schedule, param_groups, schedule_steps
from .frozen import expect_frozen_in_eval_mode
from .nonfinite import ADVICE, NonFiniteGuard, NonFiniteLossError, optimizer_skips_on_device

__all__ = ["MaskedImageModeling", "NonFiniteLossError"]

#: what the model predicts: the tokenizer's visual tokens (BEiT) or the patches' pixels (ablation)
TARGETS = ("tokens", "pixels")
#: where the loss is taken: the masked patches (BEiT) or every patch (ablation)
LOSS_ON = ("masked", "all")


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
        check_finite_loss: stop with :class:`NonFiniteLossError` on a NaN/inf loss or gradient (all
            ranks agree), with no non-finite update applied. With a fused AdamW (the default, under
            32-true and bf16-mixed) the update is skipped on the device and the host checks every
            ``check_finite_every_n_steps`` steps; otherwise (fp16 with a GradScaler, FSDP, a non-fused
            optimiser, which cannot skip on the device) the loss is checked on the host every step.
        check_finite_every_n_steps: how often the host reads the device's non-finite flag (a sync);
            it also reads it at every epoch end and before every checkpoint is written.
        compile: ``torch.compile`` the model (``nn.Module.compile``: in place, so checkpoint keys stay
            plain). The tokenizer compiles its encoding when configured so (``tokenizer.compile``,
            :meth:`~beit_lightning.tokenizers.VisualTokenizer.configure_inference`).
        lr_base_batch: the total batch ``lr`` and ``min_lr`` are given for; they are scaled linearly
            to the run's effective batch (per-device batch x devices x accumulation). ``None``: as given.
        target: ``"tokens"`` (BEiT: cross-entropy against the visual tokens) or ``"pixels"`` (the
            paper's "- visual tokens" ablation: mean squared error against the patches' pixels; the
            model's LM head is then a linear regression head, ``vocab_size = patch * patch * 3``, and
            no tokenizer is used, so ``tokenizer`` may be ``None``).
        loss_on: ``"masked"`` (BEiT) or ``"all"`` (the ablation "recover 100% visual tokens": the
            loss covers every patch, masked or visible).
        pixel_norm: pixel targets normalised per patch (mean 0, variance 1, as MAE's
            ``norm_pix_loss``); ``False``: plain pixels in [0, 1] (the BEiT paper's ablation).
        pixel_mean, pixel_std: the normalisation of the data's patch view (``data.mean`` /
            ``data.std``), undone to get pixels in [0, 1]; ``None``: 0.5 (the code's default).
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
        target: str = "tokens",
        loss_on: str = "masked",
        pixel_norm: bool = False,
        pixel_mean: tuple[float, float, float] | None = None,
        pixel_std: tuple[float, float, float] | None = None,
        check_finite_every_n_steps: int = 50,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model", "tokenizer"])
        if target not in TARGETS or loss_on not in LOSS_ON:
            raise ValueError(f"target must be one of {TARGETS} and loss_on one of {LOSS_ON}; got {target!r}, {loss_on!r}")
        self.target, self.loss_on, self.pixel_norm = target, loss_on, bool(pixel_norm)
        self.pixel_mean = tuple(pixel_mean) if pixel_mean is not None else (0.5, 0.5, 0.5)
        self.pixel_std = tuple(pixel_std) if pixel_std is not None else (0.5, 0.5, 0.5)
        if target == "pixels":
            check_model_pixels(model)
            tokenizer = None  # the targets are the image's own pixels
        elif tokenizer is None:
            raise ValueError("target='tokens' needs a tokenizer (task.tokenizer); only target='pixels' runs without one")
        else:
            check_model_tokenizer(model, tokenizer)
        self.model = model
        self.tokenizer = tokenizer.eval().requires_grad_(False) if tokenizer is not None else None
        # no argument validation: it reads the targets on the host (a sync) every step
        self.train_acc = MulticlassAccuracy(num_classes=model.vocab_size, average="micro", validate_args=False)
        self.val_acc = MulticlassAccuracy(num_classes=model.vocab_size, average="micro", validate_args=False)
        self._guard = NonFiniteGuard(check_finite_every_n_steps)
        self._direct_clip = False  # this task clips gradients itself (decided in configure_optimizers)
        self._skip_on_device = False  # the optimiser skips non-finite steps (decided in on_train_start)

    def train(self, mode: bool = True) -> MaskedImageModeling:
        """Switch modes but keep the frozen tokenizer in eval mode."""
        super().train(mode)
        if self.tokenizer is not None:
            self.tokenizer.eval()
        return self

    def on_fit_start(self) -> None:
        expect_frozen_in_eval_mode([self.tokenizer])

    def configure_model(self) -> None:
        """``compile``: compile the model in place (Lightning calls this hook on every fit)."""
        if self.hparams.get("compile") and not self.__dict__.get("_model_compiled", False):
            self.model.compile()
            self.__dict__["_model_compiled"] = True

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count the masked patches on the host, before the batch goes to the device: when every
        mask has the same count (exact blockwise masks), ``num_masked`` lets the step gather the
        masked positions without waiting for the device."""
        if isinstance(batch, dict) and torch.is_tensor(batch.get("mask")) and batch["mask"].ndim >= 2:
            counts = batch["mask"].flatten(1).sum(1)
            if counts.numel() and bool((counts == counts[0]).all()):
                batch["num_masked"] = int(counts[0])
        return batch

    # --- the method ----------------------------------------------------------------------
    def positions(self, mask: torch.Tensor) -> torch.Tensor:
        """The patches the loss is taken on: the masked ones, or all (``loss_on="all"``)."""
        return mask if self.loss_on == "masked" else torch.ones_like(mask)

    def targets(self, tokenizer_image: torch.Tensor, mask: torch.Tensor, num_masked: int | None = None) -> torch.Tensor:
        """Visual tokens at the ``mask`` positions (batch-major), from the frozen tokenizer
        (``num_masked``: every mask has this many, gathered with no host synchronisation)."""
        tokens = self.tokenizer.encode(tokenizer_image)
        return tokens[mask] if num_masked is None else gather_masked(tokens.flatten(1), mask, num_masked)

    def pixel_targets(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Pixels of the patches at the ``mask`` positions, ``num x (patch * patch * 3)`` in (row, column,
        channel) order: the normalised patch view taken back to [0, 1], or normalised per patch."""
        p = self.model.patch_size
        mean = image.new_tensor(self.pixel_mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = image.new_tensor(self.pixel_std, dtype=torch.float32).view(1, -1, 1, 1)
        pixels = image.float() * std + mean
        b, c, h, w = pixels.shape
        patches = pixels.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, p * p * c)
        if self.pixel_norm:
            patches = (patches - patches.mean(-1, keepdim=True)) / (patches.var(-1, keepdim=True) + 1e-6).sqrt()
        return patches[mask.flatten(1)]

    def forward(self, image: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor | None = None,
                num_masked: int | None = None) -> torch.Tensor:
        """Predictions at ``positions`` (default: the masked ones), ``num x vocab_size``, batch-major."""
        if positions is None or positions is mask:
            return self.model(image, mask) if num_masked is None else self.model(image, mask, num_masked)
        patch_tokens = self.model.forward_features(image, mask)[:, self.model.num_prefix_tokens:]
        return self.model.lm_head(patch_tokens[positions.flatten(1)])

    def loss(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy against visual tokens; mean squared error against pixels."""
        if self.target == "pixels":
            return F.mse_loss(predictions.float(), targets)
        return F.cross_entropy(predictions.float(), targets)

    def _step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mask = batch["mask"].bool()
        positions = self.positions(mask)
        num_masked = batch.get("num_masked") if positions is mask else None  # exact masks: no host sync
        if self.target == "pixels":
            targets = self.pixel_targets(batch["image"], positions)
        else:
            targets = self.targets(batch["tokenizer_image"], positions, num_masked)
        predictions = self(batch["image"], mask, positions, num_masked)
        return self.loss(predictions, targets), predictions, targets

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, logits, targets = self._step(batch)
        if self.hparams.check_finite_loss:
            self._stop_on_non_finite(loss)
        self.log("train/loss", loss, prog_bar=True)
        if self.target == "tokens":
            self.train_acc(logits.detach(), targets)
            self.log("train/mlm_acc", self.train_acc, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, logits, targets = self._step(batch)
        self.log("val/loss", loss, sync_dist=True, prog_bar=True)
        if self.target == "tokens":  # accuracy at the masked patches, whatever the loss covers
            masked = batch["mask"].bool()[self.positions(batch["mask"].bool())]
            self.val_acc(logits[masked], targets[masked])
            self.log("val/mlm_acc", self.val_acc, prog_bar=True)

    # --- stopping on a non-finite loss or gradient (module doc, tasks/nonfinite.py) ------------
    def _stop_on_non_finite(self, loss: torch.Tensor) -> None:
        if self._skip_on_device:  # noted on the device; the optimiser skips, the host reads it later
            self._guard.note(~torch.isfinite(loss.detach()), self.global_step)
            return
        bad = not bool(torch.isfinite(loss))
        if self.trainer is not None and self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            raise NonFiniteLossError(
                f"the masked-image-modeling loss is {loss.item()} at step {self.global_step} (on at least one "
                f"rank); training stopped before applying this update, so saved checkpoints hold finite weights. {ADVICE}"
            )

    def on_train_start(self) -> None:
        optimizers = self.trainer.optimizers
        self._skip_on_device = bool(self.hparams.check_finite_loss and self._direct_clip and len(optimizers) == 1
                                    and optimizer_skips_on_device(optimizers[0]))
        self._guard.reset(self.global_step)
        if self.hparams.check_finite_loss and not self._skip_on_device:
            rank_zero_info("non-finite losses are checked on the host every step (a device sync): the optimiser "
                           "cannot skip an update on the device (not a fused AdamW, or a GradScaler / FSDP precision)")

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Clip as the Trainer asks, then (fused AdamW) hand the non-finite flag to the optimiser.
        With plain or bf16-mixed precision the clipping is torch's, as Lightning's would be; Lightning's
        mixed-precision plugin refuses to clip for a fused optimiser, which it assumes unscales itself."""
        if not self._direct_clip:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return None
        if gradient_clip_val and (gradient_clip_algorithm or "norm") == "norm":
            norm = torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
        else:
            if gradient_clip_val:
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if self._skip_on_device else None
        if self._skip_on_device:
            self._guard.before_step(optimizer, norm, self.global_step)
        return None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._skip_on_device:
            self._guard.check(self.trainer, self.global_step)

    def on_train_epoch_end(self) -> None:
        if self._skip_on_device:
            self._guard.check(self.trainer, self.global_step, force=True)

    def on_train_end(self) -> None:
        if self._skip_on_device:
            self._guard.check(self.trainer, self.global_step, force=True)

    # --- optimisation ----------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        self._total_steps, _ = schedule_steps(self.trainer, hp.warmup_epochs, hp.warmup_steps)
        # plain or bf16-mixed precision (no GradScaler, no FSDP): clip here, so AdamW can be fused under
        # bf16-mixed too (Lightning's plugin would refuse to clip) and skip non-finite steps on the device
        plugin = self.trainer.precision_plugin
        self._direct_clip = type(plugin) is Precision or (type(plugin) is MixedPrecision and plugin.scaler is None)
        return configure_adamw_cosine(
            self.trainer, param_groups(self.model, hp.weight_decay), hp.lr, hp.min_lr, hp.betas,
            hp.warmup_epochs, hp.warmup_steps, hp.lr_base_batch, fused=True if self._direct_clip else None,
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
        if self._skip_on_device and self._trainer is not None:  # never write a state after a skipped step
            self._guard.check(self.trainer, self.global_step, force=True)
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("tokenizer.")]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key, value in (self.tokenizer.state_dict() if self.tokenizer is not None else {}).items():
            state.setdefault(f"tokenizer.{key}", value)


def check_model_pixels(model: BeitForMaskedImageModeling) -> None:
    """Pixel regression needs one output per pixel value of a patch: fail early, with the fix."""
    width = model.patch_size**2 * 3
    if model.vocab_size != width:
        raise ValueError(
            f"target='pixels' regresses the {model.patch_size}x{model.patch_size}x3 pixels of a patch, but the model has "
            f"{model.vocab_size} outputs: set task.model.vocab_size={width} (and task.tokenizer=null)"
        )


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
