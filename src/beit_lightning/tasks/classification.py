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

DeiT's distillation (facebookresearch/deit ``losses.py``, :mod:`beit_lightning.models.distillation`)
is an option: a distilled DeiT student (timm's ``deit_*_distilled_*``) and a frozen teacher; the
loss is ``(1 - alpha) * base(class head, targets) + alpha * distillation(distillation head,
teacher)``, hard (cross-entropy with the teacher's argmax) or soft (KL at temperature ``tau``). The
teacher sees the same images as the student (after mixup, as in the official ``engine.py``).
Evaluation averages the two heads (timm's distilled model in eval mode) and logs the student's
agreement with its teacher (``val/teacher_agreement``: the fraction of images on which their
argmax classes agree).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import partial
from typing import Any

import pytorch_lightning as pl
import timm
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from ..models.distillation import DISTILLATION_TYPES, SOFT_REDUCTIONS, distillation_loss
from ..optim import configure_adamw_cosine, decay_param_groups
from ..weights.lightning import model_weights
from ..weights.loader import load_checkpoint
from ..weights.safety import load_weights_file
from ..weights.sources import resolve_weights, source_kind

__all__ = ["ImageClassification", "create_teacher"]


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
        distillation: ``"none"``, ``"hard"`` or ``"soft"`` (DeiT's ``--distillation-type``, default none);
            hard and soft need a distilled student (``set_distilled_training``) and a ``teacher``.
        teacher: a frozen classifier with ``num_classes`` outputs
            (:func:`create_teacher`); kept in eval mode without gradients, and
            left out of this task's checkpoints (it is rebuilt from its own file).
        distillation_alpha: weight of the distillation term (``--distillation-alpha``, 0.5).
        distillation_tau: temperature of soft distillation (``--distillation-tau``, 1.0).
        soft_distillation_reduction: ``"numel"`` (official: the summed KL divided by batch x classes)
            or ``"batchmean"`` (timm's ``TokenDistillationTask``: divided by the batch).
        teacher_autocast: run the teacher under the Trainer's autocast (the official ``engine.py``
            runs it inside the fp16 autocast of the student); ``False`` (default): in float32 outside
            autocast, so that bf16 rounding cannot flip the teacher's hard labels.
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
        distillation: str = "none",
        teacher: nn.Module | None = None,
        distillation_alpha: float = 0.5,
        distillation_tau: float = 1.0,
        soft_distillation_reduction: str = "numel",
        teacher_autocast: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model", "teacher"])
        head_classes = getattr(model, "num_classes", num_classes)
        if head_classes != num_classes:
            raise ValueError(f"the model's head has {head_classes} classes but num_classes={num_classes}")
        _check_distillation(model, teacher, num_classes, distillation, soft_distillation_reduction)
        self.model = model
        self.teacher = teacher.eval().requires_grad_(False) if teacher is not None else None
        if distillation != "none":
            model.set_distilled_training(True)  # training mode returns (class logits, distillation logits)
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
        self.teacher_agreement = MulticlassAccuracy(num_classes=num_classes, top_k=1, average="micro")

    def train(self, mode: bool = True) -> ImageClassification:
        """Switch modes but keep the frozen teacher in eval mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def on_fit_start(self) -> None:
        if self.teacher is not None:
            from .frozen import expect_frozen_in_eval_mode

            expect_frozen_in_eval_mode([self.teacher])
        # the weights may have been loaded after __init__ (init_checkpoint): start the EMA from them,
        # unless this run resumes, in which case the EMA comes from the checkpoint
        if self.model_ema is not None and self.trainer.ckpt_path is None:
            self.model_ema.set(self.model)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen teacher's logits, in float32 outside autocast unless ``teacher_autocast``."""
        if self.hparams.teacher_autocast:
            return self.teacher(images).float()
        with torch.autocast(device_type=images.device.type, enabled=False):
            return self.teacher(images.float()).float()

    def loss(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss on (possibly mixed) ``images`` and ``targets`` (class indices, or mixup's
        soft targets), and its parts: with distillation, DeiT's ``(1 - alpha) * base(class head,
        targets) + alpha * distillation(distillation head, teacher(images))``."""
        hp = self.hparams
        if targets.ndim > 1:  # mixup's soft targets (label smoothing included)
            base = SoftTargetCrossEntropy()
        else:
            base = partial(F.cross_entropy, label_smoothing=hp.label_smoothing)
        outputs = self(images)
        if hp.distillation == "none":
            return base(outputs.float(), targets), {}
        class_logits, dist_logits = outputs
        base_loss = base(class_logits.float(), targets)
        distill = distillation_loss(dist_logits.float(), self.teacher_logits(images), hp.distillation,
                                    hp.distillation_tau, hp.soft_distillation_reduction)
        loss = (1.0 - hp.distillation_alpha) * base_loss + hp.distillation_alpha * distill
        return loss, {"base_loss": base_loss, "distillation_loss": distill}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, targets = batch["image"], batch["label"]
        if self.mixup is not None:
            if len(images) % 2:  # timm's Mixup pairs samples: drop an odd one out
                images, targets = images[:-1], targets[:-1]
            images, targets = self.mixup(images, targets)
        loss, parts = self.loss(images, targets)
        for name, value in parts.items():
            self.log(f"train/{name}", value)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"the classification loss is {loss.item()} at step {self.global_step}: lower the learning rate, "
                "raise the warmup or check the data, then resume from the last checkpoint"
            )
        self.log("train/loss", loss, prog_bar=True)
        return loss

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
        if self.teacher is not None:
            self.teacher_agreement(logits, self.teacher_logits(images).argmax(dim=-1))
            self.log("val/teacher_agreement", self.teacher_agreement, prog_bar=True)

    # --- checkpoints: the teacher is rebuilt from its own file, not stored --------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("teacher.")]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.teacher is not None:
            state = checkpoint["state_dict"]
            for key, value in self.teacher.state_dict().items():
                state.setdefault(f"teacher.{key}", value)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups = decay_param_groups(self.model, hp.weight_decay, hp.layer_decay)
        return configure_adamw_cosine(
            self.trainer, groups, hp.lr, hp.min_lr, hp.betas, hp.warmup_epochs, hp.warmup_steps, hp.lr_base_batch,
            interval=hp.schedule_interval, warmup_lr=hp.warmup_lr, warmup_prefix=hp.warmup_prefix,
            scale_min_lr=hp.scale_min_lr,
        )


def _check_distillation(model: nn.Module, teacher: nn.Module | None, num_classes: int, distillation: str,
                        reduction: str) -> None:
    """Fail early, with the fix, when the distillation options cannot work together."""
    if distillation not in DISTILLATION_TYPES:
        raise ValueError(f"distillation must be one of {DISTILLATION_TYPES}; got {distillation!r}")
    if reduction not in SOFT_REDUCTIONS:
        raise ValueError(f"soft_distillation_reduction must be one of {SOFT_REDUCTIONS}; got {reduction!r}")
    if distillation == "none":
        if teacher is not None:
            raise ValueError("a teacher is given but distillation='none': set task.distillation=hard (or soft), "
                             "or remove the teacher")
        return
    if not hasattr(model, "set_distilled_training"):
        raise ValueError(
            f"distillation={distillation!r} trains a distillation token: the student must be a distilled DeiT "
            f"(model=deit_tiny_distilled, deit_small_distilled, deit_base_distilled); got {type(model).__name__}"
        )
    if teacher is None:
        raise ValueError(f"distillation={distillation!r} needs a teacher (task.teacher: a timm model name and its checkpoint)")
    teacher_classes = getattr(teacher, "num_classes", num_classes)
    if teacher_classes != num_classes:
        raise ValueError(f"the teacher predicts {teacher_classes} classes but the student {num_classes}")


def create_teacher(
    model_name: str,
    checkpoint: str | os.PathLike | Mapping[str, Any] | None,
    num_classes: int,
    img_size: int | None = None,
    arch: Mapping[str, Any] | None = None,
    how_to_get: str | None = None,
) -> nn.Module:
    """A frozen classifier to distil from: ``timm.create_model(model_name, num_classes=...,
    img_size=..., **arch)`` with the weights of ``checkpoint``, in eval mode, without gradients.
    The task builds it and hands it to :class:`ImageClassification` (``task.teacher``).

    Args:
        model_name: any timm model name (DeiT's teacher: ``regnety_160``, a RegNetY-16GF).
        checkpoint: its weights, by path, ``http(s)`` URL, ``hf-hub:`` / ``timm:`` name or registry name
            (:mod:`beit_lightning.weights`): the official release (``{"model": state_dict}``, e.g. DeiT's
            ``https://dl.fbaipublicfiles.com/deit/regnety_160-a5fe301d.pth``), a timm state dict, or one of
            our fine-tuning runs' Lightning checkpoints (only the ``model.`` weights are read; an EMA, a
            teacher of its own are not). Every key must fit (no head of another class count).
        num_classes: the student's class count (the teacher's head must have as many).
        img_size: the input side, for models that take it (``None``: the model's default).
        arch: further timm arguments (DeiT: ``global_pool="avg"`` for the RegNet teacher).
        how_to_get: added to the error when a local ``checkpoint`` does not exist (e.g. the command
            that trains it).
    """
    if checkpoint is None:
        raise ValueError(f"a distillation teacher needs weights: set the teacher's checkpoint (a {model_name} checkpoint)")
    if not isinstance(checkpoint, Mapping):
        if source_kind(checkpoint) == "path" and not os.path.isfile(checkpoint):
            hint = f": {how_to_get}" if how_to_get else ""
            raise FileNotFoundError(f"the teacher checkpoint {os.fspath(checkpoint)!r} does not exist{hint}")
        checkpoint = resolve_weights(checkpoint)
    kwargs: dict[str, Any] = dict(arch or {})
    if img_size is not None:
        kwargs["img_size"] = img_size
    teacher = timm.create_model(model_name, pretrained=False, num_classes=num_classes, **kwargs)
    result = load_checkpoint(teacher, _network_weights(checkpoint), strict=True)
    if result.initialised:
        raise ValueError(f"the teacher checkpoint does not hold {', '.join(result.initialised)}: a teacher must be a "
                         f"trained {num_classes}-class classifier")
    return teacher.eval().requires_grad_(False)


def _network_weights(checkpoint: str | os.PathLike | Mapping[str, Any]) -> str | os.PathLike | Mapping[str, Any]:
    """The network's weights of a checkpoint: a Lightning checkpoint's ``model.*`` only (not its EMA,
    tokenizer or teacher); other files as they are (``load_checkpoint`` reads them)."""
    if isinstance(checkpoint, Mapping):
        return model_weights(checkpoint)
    path = os.fspath(checkpoint)
    if path.endswith(".safetensors") or os.path.isdir(path):
        return checkpoint
    obj = load_weights_file(path)
    return model_weights(obj) if isinstance(obj, Mapping) else obj
