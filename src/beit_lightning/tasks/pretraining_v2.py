"""BEiT v2 pre-training: BEiT's masked image modeling with the patch-aggregation loss added.

Everything but the loss is v1's :class:`~beit_lightning.tasks.MaskedImageModeling` (the targets
are the frozen tokenizer's codes at masked positions; with BEiT v2 that tokenizer is VQ-KD on the
224px view). The model (:class:`~beit_lightning.models.beitv2.BeitV2ForMaskedImageModeling`)
predicts the masked tokens twice, from the backbone and from the patch-aggregation head, and the
loss is the sum of the two cross-entropies against the same targets, unweighted, as the official
``engine_for_pretraining.py`` (``loss = loss_1 + loss_2``).
"""

from __future__ import annotations

import torch

from ..models.beitv2 import BeitV2ForMaskedImageModeling
from ..models.tokenizers.base import VisualTokenizer
from .pretraining import MaskedImageModeling

__all__ = ["MaskedImageModelingV2"]


class MaskedImageModelingV2(MaskedImageModeling):
    """BEiT v2's pre-training task. Arguments: as :class:`MaskedImageModeling`; ``model`` must be a
    :class:`BeitV2ForMaskedImageModeling`.

    Logged besides v1's ``loss`` / ``mlm_acc`` (which are the total loss and the backbone's
    accuracy): ``loss_mim`` and ``loss_aggregation`` (the two terms, the official ``loss_1`` /
    ``loss_2``) and ``mlm_acc_aggregation`` (the head's accuracy, the official ``mlm_acc_2``).
    """

    def __init__(self, model: BeitV2ForMaskedImageModeling, tokenizer: VisualTokenizer, **kwargs) -> None:
        if not isinstance(model, BeitV2ForMaskedImageModeling):
            raise TypeError(
                f"MaskedImageModelingV2 needs a BeitV2ForMaskedImageModeling (the patch-aggregation head), got "
                f"{type(model).__name__}: use task=pretrain_v2 with a BEiT model, or task=pretrain for BEiT v1"
            )
        super().__init__(model, tokenizer, **kwargs)

    def forward(self, image: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor | None = None,
                num_masked: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        """``(logits, aggregation_logits)`` at ``positions`` (default: the masked patches)."""
        if positions is None or positions is mask:
            return self.model.forward_with_aggregation(image, mask, num_masked)
        return self.model.forward_with_aggregation(image, mask, positions=positions)

    def loss(self, logits: torch.Tensor | tuple[torch.Tensor, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        """``CE(backbone logits) + CE(aggregation-head logits)``; a single tensor is v1's loss."""
        if isinstance(logits, torch.Tensor):
            return super().loss(logits, targets)
        main, aggregation = logits
        self._terms = (super().loss(main, targets), super().loss(aggregation, targets))
        return self._terms[0] + self._terms[1]

    def _step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        loss, (logits, aggregation), targets = super()._step(batch)
        stage = "train" if self.training else "val"
        sync = stage == "val"
        self.log(f"{stage}/loss_mim", self._terms[0], sync_dist=sync)
        self.log(f"{stage}/loss_aggregation", self._terms[1], sync_dist=sync)
        if targets.numel():
            accuracy = (aggregation.detach().argmax(-1) == targets).float().mean()
            self.log(f"{stage}/mlm_acc_aggregation", accuracy, sync_dist=sync)
        return loss, logits, targets
