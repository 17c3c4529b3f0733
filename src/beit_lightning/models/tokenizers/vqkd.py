"""VQ-KD, the tokenizer of BEiT v2 (Peng et al., 2022): vector-quantised knowledge distillation.

A ViT encoder maps patches to low-dimensional vectors; a cosine-similarity quantizer snaps each
to the nearest of ``vocab_size`` l2-normalised codes; a small Transformer decoder must regress the
patch features of a frozen teacher from the codes alone (cosine-similarity loss). The codebook
is not learned by gradient. As in the official ``beit2/norm_ema_quantizer.py``, it is
initialised by a cosine k-means on the first training batch and then follows a normalised
exponential moving average: every code used in a step moves towards the normalised mean of the
(normalised) encoder vectors assigned to it, over all ranks, and is re-normalised; unused codes
stay as they are. Restarting dead codes on encoder vectors is an option, off by default (the
official code has none).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from .base import VisualTokenizer

__all__ = ["VQKD", "CosineVectorQuantizer", "kmeans_cosine", "teacher_patch_features"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: the official encoder input: ``process_type='default'`` maps [0, 1] to [-1, 1]
HALF = (0.5, 0.5, 0.5)


def _distributed() -> bool:
    # decided at call time: Lightning creates the process group after modules are built
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def kmeans_cosine(samples: torch.Tensor, num_clusters: int, iters: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means of l2-normalised ``samples`` (N x D): (unit-norm means K x D, counts K).

    Means start on randomly drawn samples (with repetition when N < K); each iteration assigns
    every sample to the mean of highest cosine similarity and replaces each mean by the
    normalised mean of its samples; a cluster left empty keeps its previous mean.
    """
    n = samples.shape[0]
    if n >= num_clusters:
        pick = torch.randperm(n, device=samples.device)[:num_clusters]
    else:
        pick = torch.randint(0, n, (num_clusters,), device=samples.device)
    means = samples[pick].clone()
    counts = torch.zeros(num_clusters, device=samples.device, dtype=samples.dtype)
    for _ in range(iters):
        buckets = (samples @ means.t()).argmax(-1)
        counts = torch.bincount(buckets, minlength=num_clusters).to(samples.dtype)
        sums = torch.zeros_like(means).index_add_(0, buckets, samples)
        means = torch.where((counts == 0)[:, None], means, F.normalize(sums, dim=-1))
    return means, counts


class CosineVectorQuantizer(nn.Module):
    """Nearest l2-normalised code by cosine similarity, with BEiT v2's normalised-EMA codebook.

    For a code ``k`` used by ``n_k > 0`` of the step's vectors (counted over all ranks), with
    ``s_k`` the sum of those normalised vectors, ``w_k <- l2norm(decay * w_k + (1 - decay) *
    l2norm(s_k / n_k))``; codes no vector chose are left unchanged. Training only.

    Args:
        num_codes, dim: codebook size and code dimension.
        decay: EMA decay of the codes (0.99).
        dead_threshold: ``None`` (official): no restarts. A number: a code whose EMA usage count
            (vectors per step, over all ranks) falls below it is restarted on a random encoder
            vector of the step (the same on every rank).
        kmeans_init: initialise the codebook by :func:`kmeans_cosine` (``kmeans_iters`` iterations)
            on the first training batch's normalised vectors. Under DDP rank 0 computes it and
            broadcasts it, so every rank starts from the same codebook. ``False``: random unit codes.
    """

    def __init__(
        self,
        num_codes: int,
        dim: int,
        decay: float = 0.99,
        dead_threshold: float | None = None,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
    ) -> None:
        super().__init__()
        self.num_codes, self.dim, self.decay = num_codes, dim, decay
        self.dead_threshold, self.kmeans_iters = dead_threshold, kmeans_iters
        self.register_buffer("embedding", F.normalize(torch.randn(num_codes, dim), dim=-1))
        # EMA of how many vectors chose each code per step (usage statistic; drives restarts)
        self.register_buffer("cluster_size", torch.ones(num_codes))
        # whether the k-means initialisation has run: a buffer, so a resumed run does not redo it
        self.register_buffer("initted", torch.tensor(not kmeans_init))

    def assign(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code of every vector (cosine similarity)."""
        return (F.normalize(z, dim=-1) @ self.embedding.t()).argmax(-1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (straight-through quantised vectors, code indices, commitment loss), all computed
        in float32 on the l2-normalised ``z``; the commitment loss is ``mse(z, code.detach())``."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = F.normalize(z.float(), dim=-1)
            flat = z.reshape(-1, self.dim)
            if self.training and not bool(self.initted):
                self._kmeans_init(flat.detach())
            idx = (flat @ self.embedding.t()).argmax(-1)
            codes = self.embedding[idx]  # a copy: the update below does not change it
            if self.training:
                self._ema_update(flat.detach(), idx)
            commitment = F.mse_loss(flat, codes.detach())
            quantized = flat + (codes - flat).detach()
        return quantized.view_as(z), idx.view(z.shape[:-1]), commitment

    @torch.no_grad()
    def _kmeans_init(self, flat: torch.Tensor) -> None:
        if _distributed() and dist.get_rank() != 0:
            codes, counts = torch.empty_like(self.embedding), torch.empty_like(self.cluster_size)
        else:
            codes, counts = kmeans_cosine(flat, self.num_codes, self.kmeans_iters)
        if _distributed():
            dist.broadcast(codes, src=0)
            dist.broadcast(counts, src=0)
        self.embedding.copy_(codes)
        self.cluster_size.copy_(counts)
        self.initted.fill_(True)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, idx: torch.Tensor) -> None:
        counts = torch.bincount(idx, minlength=self.num_codes).to(flat.dtype)
        sums = torch.zeros(self.num_codes, self.dim, device=flat.device, dtype=flat.dtype).index_add_(0, idx, flat)
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        means = F.normalize(sums / counts.clamp_min(1)[:, None], dim=-1)
        moved = F.normalize(self.decay * self.embedding + (1 - self.decay) * means, dim=-1)
        self.embedding.copy_(torch.where((counts > 0)[:, None], moved, self.embedding))
        if self.dead_threshold is None:
            return
        dead = self.cluster_size < self.dead_threshold
        if dead.any():
            picks = flat[torch.randint(0, flat.shape[0], (int(dead.sum()),), device=flat.device)]
            if _distributed():  # every rank restarts the same codes on the same vectors
                dist.broadcast(picks, src=0)
            self.embedding[dead] = picks
            self.cluster_size[dead] = 1.0

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # checkpoints of the former VQ-VAE-style EMA: ``embed_sum`` is gone and their codebook is trained
        state_dict.pop(prefix + "embed_sum", None)
        if prefix + "embedding" in state_dict and prefix + "initted" not in state_dict:
            state_dict[prefix + "initted"] = torch.tensor(True)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def _teacher_head(teacher: nn.Module) -> nn.Linear:
    """The linear head a timm model applies to its pooled features: for a CLIP image tower, the
    image projection (timm converts OpenAI's ``visual.proj`` into ``head.weight``)."""
    head = teacher.get_classifier() if hasattr(teacher, "get_classifier") else getattr(teacher, "head", None)
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"teacher_target='projected' needs a teacher whose head is a linear projection (a timm CLIP ViT built "
            f"with its pretrained num_classes, e.g. vit_base_patch16_clip_quickgelu_224.openai); "
            f"{type(teacher).__name__} has a {type(head).__name__} head"
        )
    return head


def teacher_input_size(teacher: nn.Module) -> tuple[int, int] | None:
    """The fixed input size of a timm ViT-like teacher, ``None`` when it takes any size (CNNs)."""
    embed = getattr(teacher, "patch_embed", None)
    size = getattr(embed, "img_size", None)
    if size is None or getattr(teacher, "dynamic_img_size", False) or not getattr(embed, "strict_img_size", True):
        return None
    return tuple(size)


def teacher_patch_features(
    teacher: nn.Module,
    images: torch.Tensor,
    grid: tuple[int, int],
    projected: bool = False,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
) -> torch.Tensor:
    """Patch features ``B x (h w) x C`` of a timm model, resized to ``grid`` when needed.

    Works for ViT-like models (prefix tokens are dropped) and CNNs (feature maps are flattened).
    ``images`` are in [0, 1] and normalised here with ``mean``/``std`` when those are given (else
    they are already normalised). A ViT with a fixed input size other than the images' gets them
    resized to it (bicubic, antialiased); the official VQ-KD feeds its 224px CLIP teacher the 224px
    view unchanged. ``projected``: every patch token, after the final norm, goes through the
    model's linear head, which for a timm CLIP ViT is the image projection (BEiT v2's target:
    ``encode_image(all tokens) @ visual.proj``, 512-d for ViT-B/16). A grid other than the
    tokenizer's is resized bilinearly.
    """
    size = teacher_input_size(teacher)
    if size is not None and tuple(images.shape[-2:]) != size:
        images = F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)
        if mean is not None:
            images = images.clamp(0, 1)
    if mean is not None:
        images = (images - mean) / std
    feats = teacher.forward_features(images)
    if feats.ndim == 4:  # CNN: B x C x H x W
        if projected:
            raise ValueError("teacher_target='projected' needs a ViT-like teacher with a linear head, not a CNN")
        fmap = feats
    else:
        feats = feats[:, getattr(teacher, "num_prefix_tokens", 0):]
        if projected:  # the head's own input norm (Identity for CLIP, whose ``norm`` is ln_post), then the head
            feats = _teacher_head(teacher)(getattr(teacher, "fc_norm", nn.Identity())(feats))
        side = int(round(feats.shape[1] ** 0.5))
        fmap = feats.transpose(1, 2).reshape(feats.shape[0], -1, side, feats.shape[1] // side)
    if tuple(fmap.shape[-2:]) != tuple(grid):
        fmap = F.interpolate(fmap, size=grid, mode="bilinear", align_corners=False)
    return fmap.flatten(2).transpose(1, 2)


def teacher_output_dim(teacher: nn.Module, projected: bool = False) -> int:
    """Width of :func:`teacher_patch_features`."""
    return _teacher_head(teacher).out_features if projected else int(teacher.num_features)


class VQKD(VisualTokenizer):
    """BEiT v2's VQ-KD tokenizer: ViT encoder -> cosine quantizer -> Transformer decoder.

    Args:
        teacher_dim: width of the teacher features the decoder regresses (512 for the official
            CLIP ViT-B/16 target, the projected patch tokens).
        vocab_size, code_dim: codebook (BEiT v2: 8192 x 32).
        image_size, patch_size: input side and patch size (224/16 -> 14x14 codes).
        embed_dim, depth, num_heads: encoder ViT (BEiT v2: 768, 12, 12).
        decoder_dim, decoder_depth: decoder Transformer (BEiT v2: 768, 3).
        decay, dead_threshold, kmeans_init: codebook EMA decay, dead-code restart threshold
            (``None``: off) and k-means initialisation (see :class:`CosineVectorQuantizer`).
        commitment_weight: weight of the commitment loss (official ``beta`` 1.0).
        mean, std: input normalisation of the encoder (official: 0.5/0.5, i.e. [-1, 1]).
    """

    def __init__(
        self,
        teacher_dim: int,
        vocab_size: int = 8192,
        code_dim: int = 32,
        image_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        decoder_dim: int = 768,
        decoder_depth: int = 3,
        decay: float = 0.99,
        dead_threshold: float | None = None,
        commitment_weight: float = 1.0,
        mean: tuple[float, float, float] = HALF,
        std: tuple[float, float, float] = HALF,
        kmeans_init: bool = True,
    ) -> None:
        super().__init__()
        self.config: dict[str, Any] = dict(
            teacher_dim=teacher_dim, vocab_size=vocab_size, code_dim=code_dim, image_size=image_size,
            patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads, decoder_dim=decoder_dim,
            decoder_depth=decoder_depth, decay=decay, dead_threshold=dead_threshold,
            commitment_weight=commitment_weight, mean=tuple(mean), std=tuple(std), kmeans_init=kmeans_init,
        )
        self.vocab_size, self.image_size, self.downsample = vocab_size, image_size, patch_size
        self.encoder = VisionTransformer(
            img_size=image_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
            num_classes=0, global_pool="", class_token=True,
        )
        self.encode_head = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.Tanh(), nn.Linear(embed_dim, code_dim))
        self.quantizer = CosineVectorQuantizer(vocab_size, code_dim, decay, dead_threshold, kmeans_init)
        num_patches = (image_size // patch_size) ** 2
        self.decode_in = nn.Linear(code_dim, decoder_dim)
        self.decoder_pos = nn.Parameter(torch.zeros(1, num_patches, decoder_dim))
        self.decoder = nn.Sequential(*[Block(decoder_dim, max(1, decoder_dim // 64)) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decode_out = nn.Sequential(nn.Linear(decoder_dim, decoder_dim), nn.Tanh(), nn.Linear(decoder_dim, teacher_dim))
        trunc_normal_(self.decoder_pos, std=0.02)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def no_weight_decay(self) -> set[str]:
        # the official VQKD.no_weight_decay() also exempts the decoder's position embedding
        # (the encoder's cls token and position embedding come from timm's list)
        return {"decoder_pos"}

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder.forward_features((images - self.mean) / self.std)[:, self.encoder.num_prefix_tokens:]
        with torch.autocast(device_type=tokens.device.type, enabled=False):  # official: encode_task_layer in fp32
            return self.encode_head(tokens.to(self.encode_head[-1].weight.dtype))

    def encode_logits(self, images: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self._encode(images).float(), dim=-1)
        sims = z @ self.quantizer.embedding.t()  # B x N x V, cosine similarities
        h, w = self.grid_size
        return sims.transpose(1, 2).reshape(z.shape[0], self.vocab_size, h, w)

    def decode_codes(self, quantized: torch.Tensor) -> torch.Tensor:
        """Predicted teacher features ``B x N x teacher_dim`` from quantised vectors ``B x N x code_dim``."""
        x = self.decode_in(quantized) + self.decoder_pos
        return self.decode_out(self.decoder_norm(self.decoder(x)))

    def training_losses(self, images: torch.Tensor, teacher_features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss terms and diagnostics for images in [0, 1] and the teacher's patch features:
        ``loss = (1 - mean cosine(prediction, teacher)) + commitment_weight * commitment``."""
        quantized, idx, commitment = self.quantizer(self._encode(images))
        predicted = self.decode_codes(quantized)
        cosine = F.cosine_similarity(predicted.float(), teacher_features.float(), dim=-1).mean()
        h, w = self.grid_size
        return {
            "loss": (1 - cosine) + self.config["commitment_weight"] * commitment,
            "cosine": cosine.detach(), "commitment": commitment.detach(), "codes": idx.reshape(-1, h, w),
        }
