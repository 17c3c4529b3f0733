"""VQ-KD, the tokenizer of BEiT v2 (Peng et al., 2022): vector-quantised knowledge distillation.

A ViT encoder maps patches to low-dimensional vectors; a cosine-similarity quantizer snaps each
to the nearest of ``vocab_size`` l2-normalised codes; a small Transformer decoder must regress the
patch features of a frozen teacher from the codes alone (cosine-similarity loss). The codebook
is not learned by gradient: it follows an exponential moving average of the (normalised) encoder
vectors assigned to each code, and codes that fall out of use are restarted on random encoder
vectors of the current batch, which keeps the codebook in use.
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

__all__ = ["VQKD", "CosineVectorQuantizer", "teacher_patch_features"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _distributed() -> bool:
    # decided at call time: Lightning creates the process group after modules are built
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class CosineVectorQuantizer(nn.Module):
    """Nearest code by cosine similarity over l2-normalised vectors, EMA codebook, dead-code restart.

    Args:
        num_codes, dim: codebook size and code dimension.
        decay: EMA decay of the per-code counts and sums (0.99).
        dead_threshold: a code whose EMA count falls below this is restarted.
    """

    def __init__(self, num_codes: int, dim: int, decay: float = 0.99, dead_threshold: float = 0.03, eps: float = 1e-6):
        super().__init__()
        self.num_codes, self.dim, self.decay, self.dead_threshold, self.eps = num_codes, dim, decay, dead_threshold, eps
        codes = F.normalize(torch.randn(num_codes, dim), dim=-1)
        self.register_buffer("embedding", codes)
        self.register_buffer("cluster_size", torch.ones(num_codes))
        self.register_buffer("embed_sum", codes.clone())

    def assign(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code of every vector (cosine similarity)."""
        return (F.normalize(z, dim=-1) @ self.embedding.t()).argmax(-1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (straight-through quantised vectors, code indices, commitment loss)."""
        z = F.normalize(z.float(), dim=-1)
        idx = self.assign(z)
        e = self.embedding[idx]
        if self.training:
            self._ema_update(z.reshape(-1, self.dim).detach(), idx.reshape(-1))
        commitment = F.mse_loss(z, e.detach())
        return z + (e - z).detach(), idx, commitment

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, idx: torch.Tensor) -> None:
        counts = torch.bincount(idx, minlength=self.num_codes).to(flat.dtype)
        sums = torch.zeros(self.num_codes, self.dim, device=flat.device, dtype=flat.dtype).index_add_(0, idx, flat)
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        self.embedding.copy_(F.normalize(self.embed_sum / (self.cluster_size[:, None] + self.eps), dim=-1))
        dead = self.cluster_size < self.dead_threshold
        if dead.any():
            picks = flat[torch.randint(0, flat.shape[0], (int(dead.sum()),), device=flat.device)]
            if _distributed():  # every rank restarts the same codes on the same vectors
                dist.broadcast(picks, src=0)
            self.embedding[dead] = picks
            self.embed_sum[dead] = picks
            self.cluster_size[dead] = 1.0


def teacher_patch_features(teacher: nn.Module, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Patch features ``B x (h w) x C`` of a timm model, resized to ``grid`` when needed.

    Works for ViT-like models (prefix tokens are dropped) and CNNs (feature maps are flattened).
    """
    feats = teacher.forward_features(images)
    if feats.ndim == 4:  # CNN: B x C x H x W
        fmap = feats
    else:
        feats = feats[:, getattr(teacher, "num_prefix_tokens", 0):]
        side = int(round(feats.shape[1] ** 0.5))
        fmap = feats.transpose(1, 2).reshape(feats.shape[0], -1, side, feats.shape[1] // side)
    if tuple(fmap.shape[-2:]) != tuple(grid):
        fmap = F.interpolate(fmap, size=grid, mode="bilinear", align_corners=False)
    return fmap.flatten(2).transpose(1, 2)


class VQKD(VisualTokenizer):
    """BEiT v2's VQ-KD tokenizer: ViT encoder -> cosine quantizer -> Transformer decoder.

    Args:
        teacher_dim: width of the teacher features the decoder regresses.
        vocab_size, code_dim: codebook (BEiT v2: 8192 x 32).
        image_size, patch_size: input side and patch size (224/16 -> 14x14 codes).
        embed_dim, depth, num_heads: encoder ViT (BEiT v2: 768, 12, 12).
        decoder_dim, decoder_depth: decoder Transformer (BEiT v2: 768, 3).
        decay, dead_threshold: codebook EMA decay and dead-code threshold.
        commitment_weight: weight of the commitment loss.
        mean, std: input normalisation of the encoder.
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
        dead_threshold: float = 0.03,
        commitment_weight: float = 1.0,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.config: dict[str, Any] = dict(
            teacher_dim=teacher_dim, vocab_size=vocab_size, code_dim=code_dim, image_size=image_size,
            patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads, decoder_dim=decoder_dim,
            decoder_depth=decoder_depth, decay=decay, dead_threshold=dead_threshold,
            commitment_weight=commitment_weight, mean=tuple(mean), std=tuple(std),
        )
        self.vocab_size, self.image_size, self.downsample = vocab_size, image_size, patch_size
        self.encoder = VisionTransformer(
            img_size=image_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
            num_classes=0, global_pool="", class_token=True,
        )
        self.encode_head = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.Tanh(), nn.Linear(embed_dim, code_dim))
        self.quantizer = CosineVectorQuantizer(vocab_size, code_dim, decay, dead_threshold)
        num_patches = (image_size // patch_size) ** 2
        self.decode_in = nn.Linear(code_dim, decoder_dim)
        self.decoder_pos = nn.Parameter(torch.zeros(1, num_patches, decoder_dim))
        self.decoder = nn.Sequential(*[Block(decoder_dim, max(1, decoder_dim // 64)) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decode_out = nn.Sequential(nn.Linear(decoder_dim, decoder_dim), nn.Tanh(), nn.Linear(decoder_dim, teacher_dim))
        trunc_normal_(self.decoder_pos, std=0.02)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder.forward_features((images - self.mean) / self.std)[:, self.encoder.num_prefix_tokens:]
        return self.encode_head(tokens)

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
        """Loss terms and diagnostics for images in [0, 1] and the teacher's patch features."""
        quantized, idx, commitment = self.quantizer(self._encode(images))
        predicted = self.decode_codes(quantized)
        cosine = F.cosine_similarity(predicted.float(), teacher_features.float(), dim=-1).mean()
        h, w = self.grid_size
        return {
            "loss": (1 - cosine) + self.config["commitment_weight"] * commitment,
            "cosine": cosine.detach(), "commitment": commitment.detach(), "codes": idx.reshape(-1, h, w),
        }
