"""Fine-tuning for image classification with BEiT's recipe, and the from-scratch baseline.

The network is any timm classifier (for BEiT a ``Beit``: mean pooling of patch tokens,
``fc_norm``, per-block relative position bias initialised from the shared pre-trained one by
``load_checkpoint``; for the DeiT baseline a ``VisionTransformer``). What the recipe adds here:
layer-wise learning-rate decay, a warmup + cosine schedule stepped per optimiser step (BEiT) or
per epoch (DeiT), the official weight-decay groups (:func:`~beit_lightning.optim.official_no_weight_decay`:
for BEiT only biases, norms, ``pos_embed`` and ``cls_token`` are exempt, so the relative position
tables are decayed), mixup/cutmix with label smoothing (timm's ``Mixup`` and soft-target
cross-entropy), and an optional EMA of the weights (timm's ``ModelEmaV3``), evaluated beside the
model. RandAugment and random erasing come with the data (``data.mode=finetune``).
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from ..optim import configure_adamw_cosine, layer_decay_param_groups, param_groups

__all__ = ["ImageClassification"]


class ImageClassification(pl.LightningModule):
    """Image classification (task ``finetune``).

    Args:
        model: a timm classifier whose head has ``num_classes`` outputs.
        num_classes: number of classes.
        lr, min_lr, weight_decay, betas: AdamW and the cosine floor (BEiT-B: 4e-3 at batch 1024, 0.05).
        layer_decay: layer-wise lr decay (0.65 base, 0.75 large); ``None`` or 1.0 for none.
        warmup_epochs, warmup_steps: linear warmup (BEiT: 20 epochs).
        mixup, cutmix, mixup_prob, mixup_switch_prob: timm ``Mixup`` (0.8, 1.0); 0 and 0 disable it.
        label_smoothing: 0.1.
        ema_decay: keep an EMA of the weights (e.g. 0.9999) and validate it too; ``None`` disables.
        lr_base_batch: the total batch ``lr`` and ``min_lr`` are given for; they are scaled linearly
            to the run's effective batch (per-device batch x devices x accumulation). ``None``: as given.
        schedule_interval: ``"step"`` (BEiT: the lr changes every optimiser step) or ``"epoch"``
            (DeiT: timm's scheduler stepped once per epoch).
        warmup_lr: where the warmup starts (BEiT 0; DeiT ``--warmup-lr`` 1e-6).
        warmup_prefix: the cosine starts after the warmup (BEiT) or runs from step 0 with the warmup
            replacing its first values (timm's ``CosineLRScheduler`` without ``warmup_prefix``, DeiT).
        scale_min_lr: scale ``min_lr`` with ``lr`` by the linear rule (``False``: DeiT scales only ``lr``).
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        lr: float = 4e-3,
        min_lr: float = 1e-6,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        layer_decay: float | None = 0.65,
        warmup_epochs: float = 20.0,
        warmup_steps: int | None = None,
        mixup: float = 0.8,
        cutmix: float = 1.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
        ema_decay: float | None = None,
        lr_base_batch: int | None = None,
        schedule_interval: str = "step",
        warmup_lr: float = 0.0,
        warmup_prefix: bool = True,
        scale_min_lr: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        head_classes = getattr(model, "num_classes", num_classes)
        if head_classes != num_classes:
            raise ValueError(f"the model's head has {head_classes} classes but num_classes={num_classes}")
        self.model = model
        self.mixup = (
            Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=mixup_prob, switch_prob=mixup_switch_prob,
                  label_smoothing=label_smoothing, num_classes=num_classes)
            if (mixup > 0 or cutmix > 0) else None
        )
        self.model_ema = ModelEmaV3(model, decay=ema_decay) if ema_decay else None
        top5 = min(5, num_classes)
        self.val_top1 = MulticlassAccuracy(num_classes=num_classes, top_k=1, average="micro")
        self.val_top5 = MulticlassAccuracy(num_classes=num_classes, top_k=top5, average="micro")
        self.ema_top1 = MulticlassAccuracy(num_classes=num_classes, top_k=1, average="micro")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch["image"], batch["label"]
        if self.mixup is not None:
            if len(images) % 2:  # timm's Mixup pairs samples: drop an odd one out
                images, labels = images[:-1], labels[:-1]
            images, soft = self.mixup(images, labels)
            loss = SoftTargetCrossEntropy()(self(images).float(), soft)
        else:
            loss = F.cross_entropy(self(images).float(), labels, label_smoothing=self.hparams.label_smoothing)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"the classification loss is {loss.item()} at step {self.global_step}: lower the learning rate, "
                "raise the warmup or check the data, then resume from the last checkpoint"
            )
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_fit_start(self) -> None:
        # the weights may have been loaded after __init__ (init_checkpoint): start the EMA from them,
        # unless this run resumes, in which case the EMA comes from the checkpoint
        if self.model_ema is not None and self.trainer.ckpt_path is None:
            self.model_ema.set(self.model)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.model_ema is not None:
            self.model_ema.update(self.model, step=self.global_step)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch["image"], batch["label"]
        logits = self(images).float()
        self.log("val/loss", F.cross_entropy(logits, labels), sync_dist=True, prog_bar=True)
        self.val_top1(logits, labels)
        self.val_top5(logits, labels)
        self.log("val/acc1", self.val_top1, prog_bar=True)
        self.log("val/acc5", self.val_top5)
        if self.model_ema is not None:
            self.ema_top1(self.model_ema.module(images).float(), labels)
            self.log("val/ema_acc1", self.ema_top1)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        if hp.layer_decay is not None and hp.layer_decay < 1.0:
            groups = layer_decay_param_groups(self.model, hp.weight_decay, hp.layer_decay)
        else:
            groups = param_groups(self.model, hp.weight_decay)
        return configure_adamw_cosine(
            self.trainer, groups, hp.lr, hp.min_lr, hp.betas, hp.warmup_epochs, hp.warmup_steps, hp.lr_base_batch,
            interval=hp.schedule_interval, warmup_lr=hp.warmup_lr, warmup_prefix=hp.warmup_prefix,
            scale_min_lr=hp.scale_min_lr,
        )
