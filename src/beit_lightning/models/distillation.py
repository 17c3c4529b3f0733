"""DeiT's distillation through a distillation token (Touvron et al. 2021; facebookresearch/deit
``losses.py``), as plain functions and a teacher factory; the task is
:class:`~beit_lightning.tasks.ImageClassification` with ``distillation="hard" | "soft"``.

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

import os
from collections.abc import Mapping
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DISTILLATION_TYPES", "SOFT_REDUCTIONS", "create_teacher", "distillation_loss"]

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

    Args:
        model_name: any timm model name (DeiT's teacher: ``regnety_160``, a RegNetY-16GF).
        checkpoint: its weights: the official release (``{"model": state_dict}``, e.g. DeiT's
            ``regnety_160-a5fe301d.pth``), a timm state dict, or one of our fine-tuning runs'
            Lightning checkpoints (only the ``model.`` weights are read; an EMA, a teacher of its own
            are not). Every key must fit (no head of another class count).
        num_classes: the student's class count (the teacher's head must have as many).
        img_size: the input side, for models that take it (``None``: the model's default).
        arch: further timm arguments (DeiT: ``global_pool="avg"`` for the RegNet teacher).
        how_to_get: added to the error when ``checkpoint`` does not exist (e.g. the command that
            trains it).
    """
    from ..checkpoints import load_checkpoint

    if checkpoint is None:
        raise ValueError(f"a distillation teacher needs weights: set the teacher's checkpoint (a {model_name} checkpoint)")
    if not isinstance(checkpoint, Mapping) and not os.path.isfile(checkpoint):
        hint = f": {how_to_get}" if how_to_get else ""
        raise FileNotFoundError(f"the teacher checkpoint {os.fspath(checkpoint)!r} does not exist{hint}")
    kwargs: dict[str, Any] = dict(arch or {})
    if img_size is not None:
        kwargs["img_size"] = img_size
    teacher = timm.create_model(model_name, pretrained=False, num_classes=num_classes, **kwargs)
    state = _model_weights(checkpoint)
    result = load_checkpoint(teacher, state, strict=True)
    if result.initialised:
        raise ValueError(f"the teacher checkpoint does not hold {', '.join(result.initialised)}: a teacher must be a "
                         f"trained {num_classes}-class classifier")
    return teacher.eval().requires_grad_(False)


def _model_weights(checkpoint: str | os.PathLike | Mapping[str, Any]) -> str | os.PathLike | Mapping[str, Any]:
    """The network's weights of a checkpoint: a Lightning checkpoint's ``model.*`` only (not its
    EMA, tokenizer or teacher); any other format as it is (``load_checkpoint`` reads it)."""
    if not isinstance(checkpoint, Mapping) and os.fspath(checkpoint).endswith(".safetensors"):
        return checkpoint
    obj = checkpoint if isinstance(checkpoint, Mapping) else torch.load(checkpoint, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        return {k[len("model."):]: v for k, v in obj["state_dict"].items() if k.startswith("model.")}
    return obj
