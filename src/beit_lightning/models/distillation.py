"""DeiT's distillation through a distillation token (Touvron et al. 2021; facebookresearch/deit
``losses.py``), as plain functions; the task is :class:`~beit_lightning.tasks.ImageClassification`
with ``distillation="hard" | "soft"``, and the task's module builds the frozen teacher
(:func:`~beit_lightning.tasks.classification.create_teacher`: the model code never loads weights).

The student is one of timm's distilled DeiTs (``VisionTransformerDistilled``,
``deit_*_distilled_patch16_224``): with ``set_distilled_training(True)`` it returns ``(class-head
logits, distillation-head logits)`` in training mode, and the average of the two in eval mode.
The loss is the official ``DistillationLoss``::

    loss = (1 - alpha) * base(class logits, targets) + alpha * distillation(distillation logits, teacher logits)

with ``base`` the task's criterion (soft-target cross-entropy on mixup's targets, or label-smoothed
cross-entropy) and ``distillation``

* ``hard``: ``cross_entropy(distillation logits, argmax teacher)``;
* ``soft``: ``KL(softmax(teacher / tau) || softmax(student / tau)) * tau**2`` summed over the batch
  and the classes, divided by the number of *elements* ``B x K`` (``reduction="numel"``, the
  official code's "legacy PyTorch behaviour") or by the batch size ``B`` (``reduction="batchmean"``,
  timm's ``TokenDistillationTask``): the two differ by the number of classes ``K``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["DISTILLATION_TYPES", "SOFT_REDUCTIONS", "distillation_loss"]

DISTILLATION_TYPES = ("none", "soft", "hard")
SOFT_REDUCTIONS = ("numel", "batchmean")


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str,
    tau: float = 1.0,
    reduction: str = "numel",
) -> torch.Tensor:
    """The distillation term of DeiT's loss, for the distillation head's logits (``B x K``).

    Args:
        student_logits: the student's distillation-head logits.
        teacher_logits: the teacher's logits for the same (mixed) images.
        kind: ``"hard"`` (cross-entropy with the teacher's argmax) or ``"soft"`` (KL at temperature ``tau``).
        tau: the soft temperature (official default 1.0); unused by ``hard``.
        reduction: how ``soft`` is normalised: ``"numel"`` (official: sum / (B x K)) or
            ``"batchmean"`` (timm: sum / B).
    """
    if kind == "hard":
        return F.cross_entropy(student_logits, teacher_logits.argmax(dim=-1))
    if kind != "soft":
        raise ValueError(f"distillation must be one of {DISTILLATION_TYPES[1:]} here; got {kind!r}")
    if reduction not in SOFT_REDUCTIONS:
        raise ValueError(f"soft distillation reduction must be one of {SOFT_REDUCTIONS}; got {reduction!r}")
    kl = F.kl_div(
        F.log_softmax(student_logits / tau, dim=-1), F.log_softmax(teacher_logits / tau, dim=-1),
        reduction="sum", log_target=True,
    ) * (tau * tau)
    return kl / (student_logits.numel() if reduction == "numel" else student_logits.shape[0])

