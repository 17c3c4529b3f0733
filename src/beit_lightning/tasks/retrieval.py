"""Image retrieval with vision transformers (IRT, El-Nouby et al., arXiv 2102.05644), task ``retrieval``.

A ViT / DeiT / BEiT / XCiT whose L2-normalised class token is the image descriptor is fine-tuned on
class-balanced batches with the paper's loss (§3.3-3.4)::

    loss = contrastive(batch, batch) [+ contrastive(batch, memory)] + lambda * KoLeo(batch)

(margin beta = 0.5 and lambda = 0.7 by default; the cross-batch memory of §4.2 with
``memory_size > 0``), and evaluated by Recall@K on classes never seen in training, by exact nearest
neighbours (:mod:`beit_lightning.models.retrieval`). ``lambda = 0`` is the paper's IRT_L, ``lambda >
0`` its IRT_R; the weights evaluated before any training are its IRT_O (off-the-shelf), e.g.
``trainer.validate`` on a fresh task.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from ..models.retrieval import CrossBatchMemory, contrastive_loss, koleo_loss, recall_at_k
from ..optim import configure_adamw_cosine, decay_param_groups

__all__ = ["ImageRetrieval", "RecallAtK"]


class RecallAtK(Metric):
    """Recall@K over a whole evaluation set, by exact nearest neighbours
    (:func:`~beit_lightning.models.retrieval.recall_at_k`).

    ``update`` collects descriptors, labels, sample indices and each sample's roles (query,
    gallery); ``compute`` gathers them from all processes, keeps one copy of each index (a
    distributed sampler repeats samples to even out the ranks), and searches each query's nearest
    neighbours among the gallery, leaving the query itself out. Returns ``{k: recall}``.
    """

    full_state_update = False

    def __init__(self, ks: Sequence[int] = (1, 10, 100, 1000), chunk_size: int = 256, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not ks or any(int(k) < 1 for k in ks):
            raise ValueError(f"recall_ks must be positive integers; got {list(ks)}")
        self.ks, self.chunk_size = sorted(int(k) for k in ks), int(chunk_size)
        for name in ("embeddings", "labels", "indices", "is_query", "is_gallery"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, embeddings: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
               is_query: torch.Tensor | None = None, is_gallery: torch.Tensor | None = None) -> None:
        ones = torch.ones(len(labels), dtype=torch.bool, device=labels.device)
        self.embeddings.append(embeddings.detach().float())
        self.labels.append(labels)
        self.indices.append(indices)
        self.is_query.append(ones if is_query is None else is_query.bool())
        self.is_gallery.append(ones if is_gallery is None else is_gallery.bool())

    def compute(self) -> dict[int, torch.Tensor]:
        emb, labels, idx = dim_zero_cat(self.embeddings), dim_zero_cat(self.labels), dim_zero_cat(self.indices)
        is_query, is_gallery = dim_zero_cat(self.is_query), dim_zero_cat(self.is_gallery)
        unique, first = _first_occurrences(idx)
        emb, labels, idx, is_query, is_gallery = emb[first], labels[first], unique, is_query[first], is_gallery[first]
        q, g = is_query, is_gallery
        values = recall_at_k(emb[q], labels[q], emb[g], labels[g], self.ks, idx[q], idx[g], self.chunk_size)
        return {k: torch.tensor(v, device=emb.device) for k, v in values.items()}


def _first_occurrences(indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted unique values, position of each one's first occurrence in ``indices``)."""
    unique, inverse = torch.unique(indices, return_inverse=True)
    positions = torch.arange(len(indices), device=indices.device)
    first = torch.full((len(unique),), len(indices), dtype=torch.long, device=indices.device)
    first.scatter_reduce_(0, inverse, positions, reduce="amin")
    return unique, first


class ImageRetrieval(pl.LightningModule):
    """Metric learning of image descriptors (task ``retrieval``).

    Args:
        model: a timm backbone without a head whose output is the descriptor before normalisation
            (:func:`~beit_lightning.models.create_retrieval_model`: the class token).
        lr, min_lr: AdamW learning rate (paper: 3e-5, constant); ``min_lr=None`` keeps ``lr`` after the
            warmup (no decay), a value gives a cosine decay to it.
        weight_decay, betas: AdamW (paper: 5e-4; betas not stated, AdamW's defaults).
        layer_decay: layer-wise lr decay (``None``: none, the paper's).
        warmup_steps: linear warmup from 0 (paper: none).
        lr_base_batch: the total batch ``lr`` is given for, scaled linearly to the run's; ``None``: as given.
        margin: beta of the contrastive loss (paper: 0.5).
        koleo_weight: lambda of the differential-entropy regulariser (paper: 0.7; 0 gives IRT_L).
        koleo_eps: added to each nearest-neighbour distance inside the log.
        memory_size: entries of the cross-batch memory (paper, SOP and CUB: the training set's size;
            In-Shop: 0.2 of it); 0 disables it.
        memory_start_step: the memory is filled and used from this optimiser step on.
        recall_ks: the K of the logged ``val/recall@K`` (SOP: 1, 10, 100, 1000).
        eval_chunk_size: queries searched at once in evaluation (memory: chunk x gallery similarities).
    """

    data_kind = "retrieval"

    def __init__(
        self,
        model: nn.Module,
        lr: float = 3e-5,
        min_lr: float | None = None,
        weight_decay: float = 5e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        layer_decay: float | None = None,
        warmup_steps: int = 0,
        lr_base_batch: int | None = None,
        margin: float = 0.5,
        koleo_weight: float = 0.7,
        koleo_eps: float = 1e-8,
        memory_size: int = 0,
        memory_start_step: int = 0,
        recall_ks: Sequence[int] = (1, 10, 100, 1000),
        eval_chunk_size: int = 256,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        if koleo_weight < 0 or memory_size < 0 or memory_start_step < 0:
            raise ValueError(f"koleo_weight, memory_size and memory_start_step must be >= 0; got "
                             f"{koleo_weight}, {memory_size}, {memory_start_step}")
        dim = getattr(model, "num_features", None) or getattr(model, "embed_dim", None)
        if getattr(model, "num_classes", 0):
            raise ValueError(f"the retrieval model must have no classification head (num_classes=0); it has "
                             f"{model.num_classes}: build it with beit_lightning.models.create_retrieval_model")
        self.model = model
        self.memory = CrossBatchMemory(memory_size, int(dim)) if memory_size else None
        self.recall = RecallAtK(recall_ks, eval_chunk_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised descriptors (float32)."""
        return F.normalize(self.model(images).float(), dim=-1)

    def loss(self, z: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The paper's loss on normalised descriptors ``z``, and its parts."""
        hp = self.hparams
        contrastive = contrastive_loss(z, labels, hp.margin)
        parts = {"contrastive": contrastive}
        if self.memory is not None and self.global_step >= hp.memory_start_step:
            # as XBM's trainer: the batch is enqueued first (all ranks' batches, so that every rank holds
            # the same memory), then contrasted with the memory; a sample's pair with its own copy is left out
            self.memory.enqueue(*self._gathered(z.detach(), labels, indices))
            mem_z, mem_labels, mem_ids = self.memory.get()
            memory_term = contrastive_loss(z, labels, hp.margin, mem_z, mem_labels,
                                           exclude=indices[:, None] == mem_ids[None, :])
            contrastive = contrastive + memory_term
            parts["memory_contrastive"] = memory_term
        loss = contrastive
        if hp.koleo_weight > 0:
            parts["koleo"] = koleo_loss(z, hp.koleo_eps)
            loss = loss + hp.koleo_weight * parts["koleo"]
        return loss, parts

    def _gathered(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        if self._trainer is None or self.trainer.world_size == 1:
            return list(tensors)
        return [self.all_gather(t).flatten(0, 1) for t in tensors]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        z = self(batch["image"])
        loss, parts = self.loss(z, batch["label"], batch["index"])
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"the retrieval loss is {loss.item()} at step {self.global_step}: lower the learning rate or check the "
                "data, then resume from the last checkpoint"
            )
        for name, value in parts.items():
            self.log(f"train/{name}", value)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        z = self(batch["image"])
        self.recall.update(z, batch["label"], batch["index"], batch.get("is_query"), batch.get("is_gallery"))

    def on_validation_epoch_end(self) -> None:
        values = self.recall.compute()
        self.recall.reset()
        for k, value in values.items():
            self.log(f"val/recall@{k}", value, sync_dist=True, prog_bar=k == 1)

    # --- the memory is training state, kept beside the weights (never in the model's state dict) ----
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.memory is not None:
            checkpoint["retrieval_memory"] = self.memory.state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.memory is not None and "retrieval_memory" in checkpoint:
            self.memory.load_state(checkpoint["retrieval_memory"])

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups = decay_param_groups(self.model, hp.weight_decay, hp.layer_decay)
        min_lr = hp.lr if hp.min_lr is None else hp.min_lr
        return configure_adamw_cosine(self.trainer, groups, hp.lr, min_lr, hp.betas, warmup_steps=hp.warmup_steps,
                                      lr_base_batch=hp.lr_base_batch)
