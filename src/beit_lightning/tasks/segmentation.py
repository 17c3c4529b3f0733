"""Semantic segmentation with BEiT + UperNet (task ``segmentation``), the recipe of the official
``beit/semantic_segmentation`` (mmseg 0.11) configs without mmcv.

Training: per-pixel cross-entropy (``ignore_index`` 255) of the decode head plus 0.4 x that of
the auxiliary FCN head, both upsampled to the label's size first (bilinear, as mmseg). As in mmseg
0.11, the mean runs over all pixels of the batch, ignored ones included (they add 0): the loss is
scaled by the fraction of labelled pixels (``loss_average="valid"`` divides by the labelled pixels
only, PyTorch's default). AdamW with BEiT's layer-wise lr decay over the backbone (neck and heads at
scale 1.0), weight decay on everything but 1-d tensors and biases (the official constructor's
name check for ``cls_token``/``pos_embed`` never matches, so they and the relative position tables
are decayed), linear warmup then poly decay per iteration
(:func:`~beit_lightning.optim.configure_adamw_poly`); no gradient clipping.

Evaluation: each image (resized so that its short side is the crop size by the data) is covered
by overlapping crop windows (:func:`slide_inference`: crop 512, stride 341), the logits of the
windows are averaged where they overlap, resized back to the label's original size and compared
there. Optional multi-scale + flip averages the softmax over scales and flips (mmseg's
``aug_test``); a scale ``r`` resizes the image by ``max(r, 1)``, as the official ``SETR_Resize``
never lets the short side fall below the crop (ratios 0.5 and 0.75 give the 1.0 view again). Metrics come from one dataset-level confusion matrix: mIoU (mean over the classes
present in the label or the prediction, the benchmark's definition), mAcc (mean class accuracy
over classes present in the label) and aAcc (pixel accuracy); a per-class IoU table is printed at
the end of validation. Evaluation runs in float32 even when the Trainer trains under bf16 autocast
(``eval_precision="fp32"``, the default): the official ``tools/test.py`` evaluates in fp32, and bf16
logits move the argmax at class boundaries (docs/recipes.md measures by how much).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_info
from torch import nn
from torchmetrics.classification import MulticlassConfusionMatrix, MulticlassJaccardIndex

from ..optim import configure_adamw_poly, layer_decay_param_groups, matching_names, param_groups

__all__ = ["SemanticSegmentation", "scores_from_confusion", "slide_inference"]


def _window_starts(size: int, crop: int, stride: int) -> list[int]:
    """mmseg's grid: ``max(size - crop + stride - 1, 0) // stride + 1`` windows, the last one
    moved back so that it ends at the border."""
    count = max(size - crop + stride - 1, 0) // stride + 1
    return sorted({max(min(i * stride, size - crop), 0) for i in range(count)})


def slide_inference(
    logits_fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, num_classes: int, crop_size: int,
    stride: int,
) -> torch.Tensor:
    """Logits ``B x num_classes x H x W`` for ``images`` (``B x 3 x H x W``) from windows of
    ``crop_size`` every ``stride`` pixels (mmseg's ``slide_inference``), averaged where they overlap.

    ``logits_fn`` maps a ``B x 3 x crop x crop`` batch to logits at any resolution; they are
    resized to the window (bilinear). A side shorter than the crop is zero-padded at the bottom or
    right (0 is the normalised mean colour) and the padding's logits are cut off, so the network
    always sees ``crop_size`` inputs (BEiT's relative position tables are sized for it).
    """
    b, _, h, w = images.shape
    out = images.new_zeros((b, num_classes, h, w), dtype=torch.float32)
    count = images.new_zeros((1, 1, h, w), dtype=torch.float32)
    for top in _window_starts(h, crop_size, stride):
        for left in _window_starts(w, crop_size, stride):
            window = images[:, :, top : top + crop_size, left : left + crop_size]
            wh, ww = window.shape[-2:]
            if (wh, ww) != (crop_size, crop_size):
                window = F.pad(window, (0, crop_size - ww, 0, crop_size - wh))
            logits = logits_fn(window).float()
            logits = F.interpolate(logits, size=(crop_size, crop_size), mode="bilinear", align_corners=False)
            out[:, :, top : top + wh, left : left + ww] += logits[:, :, :wh, :ww]
            count[:, :, top : top + wh, left : left + ww] += 1
    if (count == 0).any():  # cannot happen with stride <= crop; a guard against a wrong grid
        raise RuntimeError("the sliding windows left pixels uncovered: use stride <= crop_size")
    return out / count


def scores_from_confusion(confusion: torch.Tensor) -> dict[str, torch.Tensor]:
    """Benchmark scores from a ``C x C`` confusion matrix (rows: label, columns: prediction),
    ignored pixels already left out: per-class IoU and accuracy (NaN for classes absent from both
    label and prediction, resp. from the label), their NaN-means ``mIoU`` and ``mAcc``, and the
    pixel accuracy ``aAcc`` (mmseg's ``eval_metrics``)."""
    confusion = confusion.double()
    tp = confusion.diag()
    label_count, pred_count = confusion.sum(1), confusion.sum(0)
    union = label_count + pred_count - tp
    nan = torch.tensor(float("nan"), dtype=torch.double, device=confusion.device)
    iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
    acc = torch.where(label_count > 0, tp / label_count.clamp(min=1), nan)
    return {
        "IoU": iou, "Acc": acc, "mIoU": iou.nanmean(), "mAcc": acc.nanmean(),
        "aAcc": tp.sum() / confusion.sum().clamp(min=1),
    }


class SemanticSegmentation(pl.LightningModule):
    """Semantic segmentation (task ``segmentation``); see the module docstring.

    Args:
        model: a segmentation network with ``forward_with_aux(images) -> (logits, aux_logits | None)``
            at any resolution (e.g. :class:`~beit_lightning.models.BeitUperNet`).
        num_classes: classes (ADE20K: 150).
        lr, weight_decay, betas: AdamW (BEiT-B on ADE20K from a self-supervised checkpoint: 7e-4,
            0.05, (0.9, 0.999); from an intermediate fine-tuned one: 3e-5).
        layer_decay: layer-wise lr decay over ``model.backbone`` (0.65; 0.9 for the intermediate
            fine-tuned checkpoint); ``None`` or 1.0 for none.
        warmup_steps, warmup_ratio: linear warmup from ``warmup_ratio x lr`` (1,500 iterations, 1e-6).
        power, min_lr: poly decay to ``min_lr`` over ``trainer.max_steps`` (1.0, 0.0).
        lr_base_batch: the total batch ``lr`` is given for, scaled linearly (``None``: as given; the
            official runs use 16 = 8 GPUs x 2).
        aux_weight: weight of the auxiliary head's loss (0.4).
        ignore_index: label value that is neither trained on nor evaluated (255).
        crop_size, stride: sliding-window evaluation (512, 341).
        eval_scales, eval_flip: multi-scale / flip evaluation (mmseg's ``aug_test``; the official
            multi-scale test uses 0.5, 0.75, 1.0, 1.25, 1.5, 1.75 and flip). ``(1.0,)`` and ``False``:
            single scale.
        class_names: names for the per-class table (``None``: the DataModule's ``classes``, if any).
        loss_average: ``"all"`` (mmseg 0.11, official: mean over every pixel, ignored ones count as
            0) or ``"valid"`` (mean over labelled pixels).
        no_weight_decay: parameter names (``fnmatch`` patterns, e.g. ``"*relative_position_bias_table"``)
            exempt from weight decay besides 1-d tensors and biases; empty: the official groups.
        eval_precision: ``"fp32"`` (default, as the official evaluation): validation, test and the
            logged masks run the network in float32 with autocast off, whatever the Trainer's
            precision; ``"bf16"``: under the Trainer's autocast (faster, slightly different mIoU).
    """

    #: the kind of data this task needs (checked against the DataModule's before a run starts)
    data_kind = "segmentation"

    def __init__(
        self,
        model: nn.Module,
        num_classes: int = 150,
        lr: float = 7e-4,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        layer_decay: float | None = 0.65,
        warmup_steps: int = 1500,
        warmup_ratio: float = 1e-6,
        power: float = 1.0,
        min_lr: float = 0.0,
        lr_base_batch: int | None = None,
        aux_weight: float = 0.4,
        ignore_index: int = 255,
        crop_size: int = 512,
        stride: int = 341,
        eval_scales: Sequence[float] = (1.0,),
        eval_flip: bool = False,
        class_names: Sequence[str] | None = None,
        loss_average: str = "all",
        no_weight_decay: Sequence[str] = (),
        eval_precision: str = "fp32",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        if not hasattr(model, "forward_with_aux"):
            raise TypeError(f"{type(model).__name__} has no forward_with_aux(images) -> (logits, aux_logits)")
        if loss_average not in ("all", "valid"):
            raise ValueError(f"loss_average must be 'all' (mmseg 0.11) or 'valid'; got {loss_average!r}")
        if eval_precision not in ("fp32", "bf16"):
            raise ValueError(f"eval_precision must be 'fp32' (the official evaluation) or 'bf16' (the Trainer's "
                             f"autocast); got {eval_precision!r}")
        if not 0 < stride <= crop_size:
            raise ValueError(f"need 0 < stride <= crop_size for the sliding window; got stride={stride}, crop={crop_size}")
        self.model = model
        self.class_names = list(class_names) if class_names is not None else None
        self.val_confusion = MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index)
        # torchmetrics' dataset-level mIoU, logged beside ours as a cross-check of the definition
        self.val_jaccard = MulticlassJaccardIndex(num_classes, ignore_index=ignore_index, average="macro")

    def setup(self, stage: str) -> None:
        precision = str(getattr(self.trainer, "precision", "")) if self._trainer is not None else ""
        if self.hparams.get("eval_precision", "fp32") == "fp32" and precision in ("bf16-true", "16-true"):
            raise ValueError(
                f"trainer.precision={precision} keeps the weights in half precision, so task.eval_precision=fp32 cannot "
                "evaluate in float32: use trainer.precision=bf16-mixed, or set task.eval_precision=bf16")
        data = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        classes = getattr(data, "num_classes", 0)
        if classes and classes != self.hparams.num_classes:
            raise ValueError(
                f"the data has {classes} classes but task.num_classes={self.hparams.num_classes}: set task.num_classes={classes}"
            )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Decode-head logits at the network's output resolution (1/4 for UperNet)."""
        return self.model(images)

    # --- training ----------------------------------------------------------------------------
    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
        if self.hparams.loss_average == "valid":
            return F.cross_entropy(logits, labels, ignore_index=self.hparams.ignore_index)
        return F.cross_entropy(logits, labels, ignore_index=self.hparams.ignore_index, reduction="none").mean()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch["image"], batch["label"]
        logits, aux = self.model.forward_with_aux(images)
        decode_loss = self._loss(logits, labels)
        loss = decode_loss
        if aux is not None and self.hparams.aux_weight:
            aux_loss = self._loss(aux, labels)
            loss = loss + self.hparams.aux_weight * aux_loss
            self.log("train/loss_aux", aux_loss)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"the segmentation loss is {loss.item()} at step {self.global_step}: lower the learning rate, raise "
                "the warmup or check the labels (values other than 0..num_classes-1 and ignore_index), then resume "
                "from the last checkpoint"
            )
        self.log("train/loss_decode", decode_loss)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    # --- evaluation --------------------------------------------------------------------------
    def _eval_precision(self, images: torch.Tensor) -> tuple[contextlib.AbstractContextManager, torch.Tensor]:
        """Autocast off and float32 inputs for ``eval_precision="fp32"``; as they come for ``"bf16"``."""
        if self.hparams.get("eval_precision", "fp32") == "bf16":
            return contextlib.nullcontext(), images
        return torch.autocast(images.device.type, enabled=False), images.float()

    def predict_logits(self, images: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        """Class scores ``B x C x H x W`` (float32) at ``size`` (default: the images' size) by
        sliding-window inference, over ``eval_scales`` and flips when set (softmax averaged, as
        mmseg), else logits; in float32 with autocast off unless ``eval_precision="bf16"``."""
        context, images = self._eval_precision(images)
        with context:
            return self._predict_logits(images, size)

    def _predict_logits(self, images: torch.Tensor, size: Sequence[int] | None) -> torch.Tensor:
        hp = self.hparams
        size = tuple(size) if size is not None else tuple(images.shape[-2:])

        def one(x: torch.Tensor) -> torch.Tensor:
            logits = slide_inference(self.model, x, hp.num_classes, hp.crop_size, hp.stride)
            return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

        scales, flip = tuple(hp.eval_scales), bool(hp.eval_flip)
        if scales == (1.0,) and not flip:
            return one(images)
        total = None
        for scale in scales:
            h, w = images.shape[-2:]
            scale = max(float(scale), 1.0)  # SETR_Resize: the short side stays >= the crop
            x = images if scale == 1.0 else F.interpolate(
                images, size=(round(h * scale), round(w * scale)), mode="bilinear", align_corners=False)
            for flipped in (False, True) if flip else (False,):
                probs = one(x.flip(-1) if flipped else x).softmax(1)
                probs = probs.flip(-1) if flipped else probs
                total = probs if total is None else total + probs
        return total / (len(scales) * (2 if flip else 1))

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch["image"], batch["label"]
        scores = self.predict_logits(images, size=labels.shape[-2:])
        preds = scores.argmax(1)
        self.val_confusion.update(preds, labels)
        self.val_jaccard.update(preds, labels)

    def on_validation_epoch_end(self) -> None:
        confusion = self.val_confusion.compute()  # summed over ranks by torchmetrics
        self.val_confusion.reset()
        scores = scores_from_confusion(confusion)
        self.log("val/mIoU", scores["mIoU"].float(), prog_bar=True, sync_dist=True)
        self.log("val/mAcc", scores["mAcc"].float(), sync_dist=True)
        self.log("val/aAcc", scores["aAcc"].float(), sync_dist=True)
        self.log("val/mIoU_torchmetrics", self.val_jaccard.compute(), sync_dist=True)
        self.val_jaccard.reset()
        if not self.trainer.sanity_checking:
            rank_zero_info(self.per_class_table(scores))

    def per_class_table(self, scores: dict[str, torch.Tensor]) -> str:
        """The per-class IoU / accuracy table of a validation (classes absent from label and
        prediction show ``nan``)."""
        names = self.class_names or list(getattr(getattr(self.trainer, "datamodule", None), "classes", []) or [])
        rows = [f"{'class':<24} {'IoU':>7} {'Acc':>7}"]
        for c in range(self.hparams.num_classes):
            name = names[c] if c < len(names) else str(c)
            rows.append(f"{name[:24]:<24} {100 * scores['IoU'][c].item():7.2f} {100 * scores['Acc'][c].item():7.2f}")
        rows.append(f"{'mean':<24} {100 * scores['mIoU'].item():7.2f} {100 * scores['mAcc'].item():7.2f}"
                    f"   aAcc {100 * scores['aAcc'].item():.2f}")
        return "\n".join(rows)

    # --- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        if hp.layer_decay is not None and hp.layer_decay < 1.0:
            groups = layer_decay_param_groups(self.model, hp.weight_decay, hp.layer_decay, backbone="backbone",
                                              no_weight_decay=hp.no_weight_decay)
        else:
            groups = param_groups(self.model, hp.weight_decay,
                                  skip_names=matching_names(self.model, hp.no_weight_decay), official_exemptions=False)
        return configure_adamw_poly(
            self.trainer, groups, hp.lr, hp.betas, hp.warmup_steps, hp.warmup_ratio, hp.power, hp.min_lr,
            hp.lr_base_batch,
        )
