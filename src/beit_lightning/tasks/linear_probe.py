"""Linear probing as BEiT's official evaluation (``beit/run_linear_eval.py``) does it: the
encoder is frozen (eval mode, no gradients), and one plain ``nn.Linear`` per block (weights
N(0, 0.01), bias 0, no normalisation) is trained at once on concat(CLS token, mean of the patch
tokens) of that block's raw output (no final LayerNorm); the loss is the sum of the heads'
cross-entropies; AdamW with weight decay on every head parameter and a cosine schedule stepped
once per epoch to 0 with no warmup. The validation accuracy of every block is logged and the
best block reported.

Any supported timm backbone can be probed (:func:`~beit_lightning.models.backbones.probe_features`):
BEiT, ViT and DeiT give concat(CLS, mean patch token) per block (DeiT's distillation token is left
out); XCiT's ``L`` patch blocks have no class token and give the mean patch token, and its
class-attention blocks are probed too, as layers ``L, L + 1`` (concat(CLS, mean patch token)).
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from ..models.backbones import num_probe_layers, probe_dims, probe_features
from ..optim import configure_adamw_cosine
from .frozen import expect_frozen_in_eval_mode

__all__ = ["LinearProbe"]


class LinearProbe(pl.LightningModule):
    """Task ``linear_probe``.

    Args:
        model: a timm ``Beit``, ``VisionTransformer`` (ViT, DeiT) or ``Xcit``, loaded from a
            pre-trained checkpoint by ``init_checkpoint``; it is frozen here.
        num_classes: number of classes.
        blocks: which blocks to probe (0-based); ``None``: all. For XCiT, ``L + j`` is its
            class-attention block ``j`` (``L`` patch blocks).
        lr, min_lr, weight_decay, betas, warmup_epochs, warmup_steps: the heads' optimiser
            (official: 4e-3 at a total batch of 1024, 0, 1e-4, (0.9, 0.999), 0, None).
        lr_base_batch: the total batch ``lr`` and ``min_lr`` are given for; they are scaled linearly
            to the run's effective batch (per-device batch x devices x accumulation). ``None``: as given.
        schedule_interval: ``"epoch"`` (official: ``CosineAnnealingLR`` stepped per epoch) or ``"step"``.
        init_std: std of the heads' normal initialisation (official 0.01).
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        blocks: list[int] | None = None,
        lr: float = 4e-3,
        min_lr: float = 0.0,
        weight_decay: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_epochs: float = 0.0,
        warmup_steps: int | None = None,
        lr_base_batch: int | None = 1024,
        schedule_interval: str = "epoch",
        init_std: float = 0.01,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.model = model.eval().requires_grad_(False)
        depth = num_probe_layers(model)
        self.blocks = list(range(depth)) if blocks is None else [int(b) for b in blocks]
        if not self.blocks or min(self.blocks) < 0 or max(self.blocks) >= depth:
            raise ValueError(f"blocks must be indices in [0, {depth - 1}]; got {blocks}")
        self.heads = nn.ModuleList(nn.Linear(dim, num_classes) for dim in probe_dims(model, self.blocks))
        with torch.no_grad():
            for head in self.heads:
                head.weight.normal_(0.0, init_std)
                head.bias.zero_()
        self.accuracies = nn.ModuleList(MulticlassAccuracy(num_classes=num_classes, average="micro") for _ in self.blocks)

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        self.model.eval()
        return self

    def on_fit_start(self) -> None:
        expect_frozen_in_eval_mode([self.model])

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """concat(CLS, mean patch token) of every probed block's output (XCiT's patch blocks: the
        mean patch token; see :func:`~beit_lightning.models.backbones.probe_features`)."""
        return [f.float() for f in probe_features(self.model, images, self.blocks)]

    def logits(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each head on its block's features, in float32 outside any autocast: the official script
        autocasts only the frozen encoder (``run_linear_eval.py``), not the linear heads."""
        with torch.autocast(device_type=feats[0].device.type, enabled=False):
            return [head(f.float()) for head, f in zip(self.heads, feats, strict=True)]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        feats = self.features(batch["image"])
        losses = [F.cross_entropy(out, batch["label"]) for out in self.logits(feats)]
        loss = torch.stack(losses).sum()
        self.log("train/loss", loss / len(losses), prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        feats = self.features(batch["image"])
        for out, acc in zip(self.logits(feats), self.accuracies, strict=True):
            acc.update(out, batch["label"])

    def on_validation_epoch_end(self) -> None:
        values = [acc.compute() for acc in self.accuracies]  # synced across ranks by torchmetrics
        for block, value, acc in zip(self.blocks, values, self.accuracies, strict=True):
            self.log(f"val/acc1_block{block}", value)
            acc.reset()
        best = int(torch.stack(values).argmax())
        self.log("val/acc1", values[best], prog_bar=True)
        self.log("val/best_block", float(self.blocks[best]))

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups = [{"params": list(self.heads.parameters()), "weight_decay": hp.weight_decay}]
        return configure_adamw_cosine(
            self.trainer, groups, hp.lr, hp.min_lr, hp.betas, hp.warmup_epochs, hp.warmup_steps, hp.lr_base_batch,
            interval=hp.schedule_interval,
        )
