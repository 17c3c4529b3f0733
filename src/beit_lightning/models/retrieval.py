"""Image retrieval with a vision transformer (IRT: El-Nouby et al., "Training Vision Transformers for
Image Retrieval", arXiv 2102.05644): the descriptor network, the training losses, the cross-batch
memory, and exact Recall@K.

* The descriptor is the L2-normalised class token of a timm ViT / DeiT / BEiT / XCiT (paper §3.2:
  "CLS" pooling, Table 9 shows it is the best pooling for a transformer).
* :func:`contrastive_loss` is the paper's Eq. 1, ``(1/N) sum_i [ sum_{j: y_j = y_i} (1 - z_i.z_j) +
  sum_{j: y_j != y_i} [z_i.z_j - beta]_+ ]``, summed over pairs and divided by the number of
  anchors. pytorch-metric-learning's ``ContrastiveLoss`` is not used: its default reducer
  (``AvgNonZeroReduction``) averages the positive and the negative terms separately over their
  non-zero pairs, which is another loss, and the sum above is a few lines.
* :func:`koleo_loss` is the Kozachenko-Leonenko differential-entropy regulariser (Eq. 5,
  Sablayrolles et al. 2019): ``-(1/N) sum_i log(min_{j != i} ||z_i - z_j||)``.
* :class:`CrossBatchMemory` is the memory of Wang et al. (2020, XBM) the paper trains with (§4.2:
  "a dynamic offline memory queue of the same size as the dataset"): a FIFO of past descriptors
  and labels that the batch is also contrasted with.
* :func:`first_positive_rank` and :func:`recall_at_k` compute Recall@K by exact nearest neighbours,
  one block of queries at a time, so a 60k x 60k search never holds the full similarity matrix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .classifier import create_classifier

__all__ = [
    "CrossBatchMemory",
    "contrastive_loss",
    "create_retrieval_model",
    "first_positive_rank",
    "koleo_loss",
    "recall_at_k",
]


def create_retrieval_model(
    model_name: str,
    img_size: int | None = None,
    drop_path_rate: float = 0.0,
    arch: Mapping[str, Any] | None = None,
    pool: str = "token",
) -> nn.Module:
    """A timm backbone without a head whose output is the descriptor before normalisation:
    ``create_classifier(model_name, num_classes=0, ...)`` with ``global_pool=pool``.

    ``pool="token"`` (the paper's choice): the class token after the final norm (ViT, DeiT, BEiT,
    XCiT after its class-attention blocks; a distilled DeiT averages its class and distillation
    tokens). ``"avg"``: the mean of the patch tokens (BEiT and ViT then apply ``fc_norm``).
    Pre-trained weights are loaded afterwards (``init_checkpoint`` /
    :func:`~beit_lightning.checkpoints.load_checkpoint`); the checkpoint's head is dropped.
    """
    return create_classifier(model_name, num_classes=0, img_size=img_size, drop_path_rate=drop_path_rate,
                             arch={**dict(arch or {}), "global_pool": pool})


def contrastive_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    margin: float = 0.5,
    ref_embeddings: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 1 of the paper over every pair (anchor ``i`` of ``embeddings``, reference ``j``).

    Positive pairs (same label) cost ``1 - s_ij``, negative pairs ``max(0, s_ij - margin)``, with
    ``s`` the inner product of L2-normalised descriptors (cosine similarity); the sum over all
    pairs is divided by the number of anchors ``N``. The references are the batch itself by default
    (then each anchor's pair with itself is left out); with ``ref_embeddings`` (a cross-batch
    memory) they are those, and ``exclude`` (``N x M`` bool) marks pairs to leave out, e.g. an
    anchor and its own copy in the memory.
    """
    if ref_embeddings is None:
        ref_embeddings, ref_labels = embeddings, labels
        if exclude is None:
            exclude = torch.eye(len(embeddings), dtype=torch.bool, device=embeddings.device)
    elif ref_labels is None:
        raise ValueError("ref_embeddings needs ref_labels")
    sim = embeddings @ ref_embeddings.to(embeddings.dtype).t()
    positive = labels[:, None] == ref_labels[None, :]
    keep = ~exclude if exclude is not None else torch.ones_like(positive)
    pos = torch.where(positive & keep, 1.0 - sim, torch.zeros_like(sim))
    neg = torch.where(~positive & keep, F.relu(sim - margin), torch.zeros_like(sim))
    return (pos.sum() + neg.sum()) / len(embeddings)


def koleo_loss(embeddings: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The Kozachenko-Leonenko differential-entropy regulariser (Eq. 5): ``-mean_i log(rho_i + eps)``
    with ``rho_i`` the Euclidean distance of descriptor ``i`` to its nearest other descriptor of the
    batch. The neighbour is chosen without gradient (largest inner product of the normalised
    descriptors); the distance to it carries the gradient, as in Sablayrolles et al.'s code."""
    if len(embeddings) < 2:
        raise ValueError("the KoLeo regulariser needs at least 2 descriptors in the batch")
    with torch.no_grad():
        dots = embeddings @ embeddings.t()
        dots.fill_diagonal_(float("-inf"))
        nearest = dots.argmax(dim=1)
    rho = (embeddings - embeddings[nearest]).norm(dim=1)
    return -torch.log(rho + eps).mean()


class CrossBatchMemory(nn.Module):
    """A FIFO queue of the last ``size`` descriptors, their labels and their sample ids (Wang et al.,
    "Cross-Batch Memory for Embedding Learning", 2020), which the batch is contrasted with besides
    itself. Entries are detached: the memory carries no gradient.

    The queue lives in non-persistent buffers (so that model checkpoints and ``init_checkpoint``
    never see it); :class:`~beit_lightning.tasks.ImageRetrieval` saves it beside the state dict so
    that a resumed run continues with the same memory.
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"a cross-batch memory needs size >= 1 and dim >= 1; got {size}, {dim}")
        self.size = int(size)
        self.register_buffer("embeddings", torch.zeros(size, dim), persistent=False)
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long), persistent=False)
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long), persistent=False)
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("filled", torch.zeros((), dtype=torch.long), persistent=False)

    @torch.no_grad()
    def enqueue(self, embeddings: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor) -> None:
        """Add a batch, overwriting the oldest entries (a batch larger than the memory keeps its last ``size``)."""
        embeddings, labels, ids = embeddings[-self.size :], labels[-self.size :], ids[-self.size :]
        n = len(embeddings)
        slots = (self.pointer + torch.arange(n, device=self.pointer.device)) % self.size
        self.embeddings[slots] = embeddings.detach().to(self.embeddings.dtype)
        self.labels[slots] = labels.to(self.labels.dtype)
        self.ids[slots] = ids.to(self.ids.dtype)
        self.pointer.copy_((self.pointer + n) % self.size)
        self.filled.copy_(torch.clamp(self.filled + n, max=self.size))

    def get(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(embeddings, labels, ids)`` of the entries written so far."""
        n = int(self.filled)
        return self.embeddings[:n], self.labels[:n], self.ids[:n]

    def state(self) -> dict[str, torch.Tensor]:
        return {name: buf.detach().cpu().clone() for name, buf in self.named_buffers()}

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        for name, buf in self.named_buffers():
            if name not in state or state[name].shape != buf.shape:
                raise ValueError(f"the saved cross-batch memory does not fit ({name}): was task.memory_size changed?")
            buf.copy_(state[name])


@torch.no_grad()
def first_positive_rank(
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    gallery: torch.Tensor,
    gallery_labels: torch.Tensor,
    query_ids: torch.Tensor | None = None,
    gallery_ids: torch.Tensor | None = None,
    chunk_size: int = 256,
) -> torch.Tensor:
    """For each query, the rank (1-based) of its most similar gallery item of the same label, by
    exact search over inner products (cosine similarity of normalised descriptors, the same order as
    Euclidean distance).

    A gallery item with the query's own id (the query itself, when the gallery is the query set as
    in SOP's and CUB's protocol) takes no part. Ties count against the query: the rank is
    ``1 + #{other-label items at least as similar as the best same-label item}``, so a collapsed
    embedding (all descriptors equal) ranks every positive last, never first. A query without any
    same-label gallery item gets ``len(gallery) + 1`` (a miss at every K). Queries are processed
    ``chunk_size`` at a time: memory ``chunk_size x len(gallery)``, never ``len(queries) x len(gallery)``.
    """
    if queries.shape[1:] != gallery.shape[1:]:
        raise ValueError(f"queries {tuple(queries.shape)} and gallery {tuple(gallery.shape)} differ in descriptor size")
    if (query_ids is None) != (gallery_ids is None):
        raise ValueError("give both query_ids and gallery_ids (to leave each query out of its own gallery), or neither")
    ranks = torch.empty(len(queries), dtype=torch.long, device=queries.device)
    gallery_t = gallery.t()
    for start in range(0, len(queries), chunk_size):
        q = queries[start : start + chunk_size]
        sim = q @ gallery_t
        same = query_labels[start : start + chunk_size, None] == gallery_labels[None, :]
        valid = torch.ones_like(same)
        if query_ids is not None:
            valid = query_ids[start : start + chunk_size, None] != gallery_ids[None, :]
        positive = same & valid
        best = torch.where(positive, sim, torch.full_like(sim, float("-inf"))).amax(dim=1)
        ahead = ((sim >= best[:, None]) & ~same & valid).sum(dim=1)
        ranks[start : start + chunk_size] = torch.where(positive.any(dim=1), ahead + 1, len(gallery) + 1)
    return ranks


def recall_at_k(
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    gallery: torch.Tensor,
    gallery_labels: torch.Tensor,
    ks: Sequence[int] = (1, 10, 100, 1000),
    query_ids: torch.Tensor | None = None,
    gallery_ids: torch.Tensor | None = None,
    chunk_size: int = 256,
) -> dict[int, float]:
    """Recall@K: the fraction of queries with an item of their label among their K nearest gallery
    items (see :func:`first_positive_rank` for self-exclusion, ties and chunking)."""
    ranks = first_positive_rank(queries, query_labels, gallery, gallery_labels, query_ids, gallery_ids, chunk_size)
    return {int(k): float((ranks <= k).float().mean()) for k in ks}
