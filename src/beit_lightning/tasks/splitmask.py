"""SplitMask pre-training (El-Nouby et al., "Are Large-scale Datasets Necessary for
Self-Supervised Pre-training?", arXiv 2112.10740, section 4): split, inpaint, match.

``training_step`` reads as the method:

1. ``targets``: the frozen tokenizer's visual tokens of every patch (both halves are predicted).
2. ``forward``: the batch's ``mask`` is half B of a random split (``data.masking=split``); the
   encoder sees each half alone, the decoder inpaints the other half's tokens from it and pools
   its outputs into a global vector (:class:`~beit_lightning.models.SplitMaskModel`).
3. ``loss``: BEiT's cross-entropy over all patches (section 4.2: "the loss function is also
   computed over all the patches") plus ``contrastive_weight`` x the symmetrised InfoNCE between
   the two halves' global vectors, the other images of the (global) batch as negatives
   (section 4.3, eq. 2; temperature 0.2, section 5.5).

Everything else is :class:`~beit_lightning.tasks.MaskedImageModeling`'s: the frozen tokenizer
(eval mode, not in checkpoints), the stop on a non-finite loss, AdamW with warmup and cosine from
:mod:`beit_lightning.optim`, and checkpoints whose encoder loads like a BEiT pre-training
checkpoint (the decoder lives in ``lm_head``, which the loaders drop).

Where the paper is silent (documented choices): the two losses are summed with weight 1; the
global vectors are L2-normalised (cosine similarity, as MoCo v3 whose temperature the paper
follows) with no projection head; a query's negatives are the other images' vectors of the other
half (MoCo v3's cross-view form), gathered over all devices (with gradients) so that "the batch"
is the global batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..models.splitmask import SplitMaskModel, info_nce
from ..models.tokenizers.base import VisualTokenizer
from .pretraining import MaskedImageModeling

__all__ = ["SplitMaskPretraining"]


class SplitMaskPretraining(MaskedImageModeling):
    """SplitMask pre-training task.

    Args:
        model: a :class:`~beit_lightning.models.SplitMaskModel` (its ``vocab_size`` and patch grid
            must match the tokenizer's).
        tokenizer: the frozen visual tokenizer (not stored in checkpoints).
        temperature: InfoNCE temperature (0.2, paper section 5.5).
        contrastive_weight: weight of the InfoNCE loss next to the token cross-entropy (the paper
            sums them without a stated weight: 1.0); 0 turns the match step off (Table 8, row 2).
        gather_negatives: under DDP, use every device's images as negatives (``False``: the
            device's own batch only).
        **kwargs: optimisation arguments of :class:`MaskedImageModeling` (``lr``, ``min_lr``,
            ``weight_decay``, ``betas``, ``warmup_epochs`` / ``warmup_steps``, ``lr_base_batch``, ...).
    """

    #: the kind of data this task reads (checked against the data group by the cli)
    data_kind = "images"

    def __init__(
        self,
        model: SplitMaskModel,
        tokenizer: VisualTokenizer,
        temperature: float = 0.2,
        contrastive_weight: float = 1.0,
        gather_negatives: bool = True,
        **kwargs: Any,
    ) -> None:
        if not isinstance(model, SplitMaskModel):
            raise TypeError(
                f"SplitMaskPretraining needs a beit_lightning.models.SplitMaskModel; got {type(model).__name__} "
                "(task=splitmask builds one)"
            )
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0; got {temperature}")
        super().__init__(model, tokenizer, **kwargs)
        self.save_hyperparameters(ignore=["model", "tokenizer"])

    # --- the method ----------------------------------------------------------------------------
    def contrastive(self, pooled_a: torch.Tensor, pooled_b: torch.Tensor) -> torch.Tensor:
        """Symmetrised InfoNCE between the halves' global vectors (eq. 2 both ways, averaged).
        Negatives come from all devices in training (equal batch sizes there: the loaders drop the
        last partial batch); validation uses each device's batch."""
        keys_a, keys_b, offset = pooled_a, pooled_b, 0
        trainer = self._trainer
        if self.hparams.gather_negatives and self.training and trainer is not None and trainer.world_size > 1:
            keys_a = self.all_gather(pooled_a, sync_grads=True).flatten(0, 1)
            keys_b = self.all_gather(pooled_b, sync_grads=True).flatten(0, 1)
            offset = trainer.global_rank * pooled_a.shape[0]
        t = self.hparams.temperature
        return 0.5 * (info_nce(pooled_a, keys_b, t, offset) + info_nce(pooled_b, keys_a, t, offset))

    def _split_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mask = batch["mask"].bool()
        tokens = self.tokenizer.encode(batch["tokenizer_image"])
        out = self.model.forward_split(batch["image"], mask)
        logits = torch.cat((out["logits_b"], out["logits_a"]))
        targets = torch.cat((tokens[mask], tokens[~mask]))
        mim = F.cross_entropy(logits.float(), targets)
        nce = self.contrastive(out["pooled_a"], out["pooled_b"])
        return {"loss": mim + self.hparams.contrastive_weight * nce, "mim": mim, "nce": nce,
                "logits": logits, "targets": targets}

    def _step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        step = self._split_step(batch)
        return step["loss"], step["logits"], step["targets"]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        step = self._split_step(batch)
        if self.hparams.check_finite_loss:
            self._stop_on_non_finite(step["loss"])
        self.train_acc(step["logits"].detach(), step["targets"])
        self.log("train/loss", step["loss"], prog_bar=True)
        self.log("train/mim_loss", step["mim"])
        self.log("train/nce_loss", step["nce"])
        self.log("train/mlm_acc", self.train_acc, prog_bar=True)
        return step["loss"]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        step = self._split_step(batch)
        self.val_acc(step["logits"], step["targets"])
        self.log("val/loss", step["loss"], sync_dist=True, prog_bar=True)
        self.log("val/mim_loss", step["mim"], sync_dist=True)
        self.log("val/nce_loss", step["nce"], sync_dist=True)
        self.log("val/mlm_acc", self.val_acc, prog_bar=True)
