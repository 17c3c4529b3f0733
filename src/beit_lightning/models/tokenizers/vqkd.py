"""VQ-KD, the tokenizer of BEiT v2 (Peng et al., 2022): vector-quantised knowledge distillation.

A ViT encoder maps patches to low-dimensional vectors; a cosine-similarity quantizer snaps each
to the nearest of ``vocab_size`` l2-normalised codes; a small Transformer decoder must regress the
patch features of a frozen teacher from the codes alone (cosine-similarity loss). The codebook
is not learned by gradient. As in the official ``beit2/norm_ema_quantizer.py``, it is
initialised by a cosine k-means on the first training batch and then follows a normalised
exponential moving average: every code used in a step moves towards the normalised mean of the
(normalised) encoder vectors assigned to it, over all ranks, and is re-normalised; unused codes
stay as they are. Restarting dead codes on encoder vectors is an option, off by default (the
official code has none). Encoder and decoder are the official ViT (``modeling_finetune.py``, built as
timm's ``Beit``, which has its parameter names and initialisation), so the released tokenizer files load
with :meth:`VQKD.from_official`.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.layers import LayerNorm, trunc_normal_
from timm.models.beit import Beit
from torch import nn

from .base import VisualTokenizer

__all__ = ["VQKD", "CosineVectorQuantizer", "convert_official_vqkd", "kmeans_cosine", "official_vit",
           "official_vqkd_state", "teacher_patch_features"]

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


def official_vit(img_size: int, patch_size: int, in_chans: int, embed_dim: int, depth: int, num_heads: int) -> Beit:
    """The ViT of BEiT v2's ``modeling_finetune.py`` as ``get_model_default_params()`` configures it for
    VQ-KD's encoder and decoder: q/v biases (no k bias), LayerNorm eps 1e-6, a class token and an absolute
    position embedding, no layer scale, no relative position bias, and ``fc_norm`` (mean-pooling layout)
    instead of a final ``norm``. timm's ``Beit`` has exactly these parameter names and the same
    initialisation (trunc-normal 0.02, zero biases, ``attn.proj``/``mlp.fc2`` divided by sqrt(2 (i + 1))),
    so official weights load key for key."""
    return Beit(
        img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=0, global_pool="avg",
        embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=4.0, qkv_bias=True,
        norm_layer=partial(LayerNorm, eps=1e-6), init_values=None, use_abs_pos_emb=True, use_rel_pos_bias=False,
        use_shared_rel_pos_bias=False,
    )


def _task_layer(dim: int, out_dim: int) -> nn.Sequential:
    """Linear -> tanh -> linear, trunc-normal(0.02) weights and zero biases (official ``_init_weights``)."""
    layer = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, out_dim))
    for linear in (layer[0], layer[2]):
        trunc_normal_(linear.weight, std=0.02)
        nn.init.zeros_(linear.bias)
    return layer


class VQKD(VisualTokenizer):
    """BEiT v2's VQ-KD tokenizer: ViT encoder -> cosine quantizer -> ViT decoder, as ``modeling_vqkd.py``.

    The encoder is the official ViT over image patches; the decoder is the same ViT over the 32-d codes
    (a 1x1 patch embedding on the ``h x w`` code map, a class token, position embedding, ``decoder_depth``
    blocks); each is followed by a linear-tanh-linear task layer. :meth:`from_official` loads the released
    tokenizer files (``vqkd_encoder_base_decoder_3x768x12_clip`` and the 1-layer CLIP / DINO ones).

    Args:
        teacher_dim: width of the teacher features the decoder regresses (512 for the official
            CLIP ViT-B/16 target, the projected patch tokens; 768 for the DINO teacher).
        vocab_size, code_dim: codebook (BEiT v2: 8192 x 32).
        image_size, patch_size: input side and patch size (224/16 -> 14x14 codes).
        embed_dim, depth, num_heads: encoder ViT (BEiT v2: 768, 12, 12).
        decoder_dim, decoder_depth, decoder_num_heads: decoder ViT (BEiT v2: 768, 3, 12; ``None`` heads:
            ``num_heads``).
        decay, dead_threshold, kmeans_init: codebook EMA decay, dead-code restart threshold
            (``None``: off) and k-means initialisation (see :class:`CosineVectorQuantizer`).
        commitment_weight: weight of the commitment loss (official ``beta`` 1.0).
        mean, std: input normalisation of the encoder (official: 0.5/0.5, i.e. [-1, 1]).
        precision, channels_last, compile: how ``encode`` runs (:meth:`configure_inference`).
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
        decoder_num_heads: int | None = None,
        decay: float = 0.99,
        dead_threshold: float | None = None,
        commitment_weight: float = 1.0,
        mean: tuple[float, float, float] = HALF,
        std: tuple[float, float, float] = HALF,
        kmeans_init: bool = True,
        precision: str = "fp32",
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} is not a multiple of patch_size={patch_size}")
        decoder_num_heads = num_heads if decoder_num_heads is None else decoder_num_heads
        self.config: dict[str, Any] = dict(
            teacher_dim=teacher_dim, vocab_size=vocab_size, code_dim=code_dim, image_size=image_size,
            patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads, decoder_dim=decoder_dim,
            decoder_depth=decoder_depth, decoder_num_heads=decoder_num_heads, decay=decay,
            dead_threshold=dead_threshold, commitment_weight=commitment_weight, mean=tuple(mean), std=tuple(std),
            kmeans_init=kmeans_init,
        )
        self.vocab_size, self.image_size, self.downsample = vocab_size, image_size, patch_size
        self.encoder = official_vit(image_size, patch_size, 3, embed_dim, depth, num_heads)
        self.encode_head = _task_layer(embed_dim, code_dim)  # official encode_task_layer
        self.quantizer = CosineVectorQuantizer(vocab_size, code_dim, decay, dead_threshold, kmeans_init)
        # official decoder_config: img_size = image_size // patch_size, patch_size 1, in_chans = code_dim
        self.decoder = official_vit(image_size // patch_size, 1, code_dim, decoder_dim, decoder_depth, decoder_num_heads)
        self.decode_head = _task_layer(decoder_dim, teacher_dim)  # official decode_task_layer (last: teacher_dim)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.configure_inference(precision, channels_last, compile)

    def no_weight_decay(self) -> set[str]:
        """The official ``VQKD.no_weight_decay()`` (its codebook is no parameter here)."""
        return {"encoder.cls_token", "encoder.pos_embed", "decoder.cls_token", "decoder.pos_embed"}

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        x = self.encoder.forward_features((images - self.mean) / self.std)
        tokens = self.encoder.fc_norm(x[:, self.encoder.num_prefix_tokens:])  # official return_patch_tokens
        with torch.autocast(device_type=tokens.device.type, enabled=False):  # official: encode_task_layer in fp32
            return self.encode_head(tokens.to(self.encode_head[-1].weight.dtype))

    def encode_logits(self, images: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self._encode(images).float(), dim=-1)
        sims = z @ self.quantizer.embedding.t()  # B x N x V, cosine similarities
        h, w = self.grid_size
        return sims.transpose(1, 2).reshape(z.shape[0], self.vocab_size, h, w)

    def decode_codes(self, quantized: torch.Tensor) -> torch.Tensor:
        """Predicted teacher features ``B x N x teacher_dim`` from quantised vectors ``B x N x code_dim``."""
        h, w = self.grid_size
        code_map = quantized.transpose(1, 2).reshape(quantized.shape[0], -1, h, w)  # official 'b c h w'
        x = self.decoder.forward_features(code_map.to(self.decoder.cls_token.dtype))
        return self.decode_head(self.decoder.fc_norm(x[:, self.decoder.num_prefix_tokens:]))

    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Predicted teacher features ``B x N x teacher_dim`` of token ids ``B x h x w``."""
        return self.decode_codes(self.quantizer.embedding[tokens.flatten(1)])

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

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        if prefix + "decode_in.weight" in state_dict:
            raise ValueError(
                "this VQ-KD state was written by beit-lightning before its decoder matched the official one "
                "(a linear layer + 3 blocks without class token); it cannot be mapped: train the tokenizer again "
                "(task=tokenizer_vqkd), or start from an official file with VQKD.from_official"
            )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @classmethod
    def from_official(
        cls,
        checkpoint: str | os.PathLike | Mapping[str, Any],
        num_heads: int = 12,
        decoder_num_heads: int | None = None,
        mean: tuple[float, float, float] = HALF,
        std: tuple[float, float, float] = HALF,
        map_location: str | torch.device = "cpu",
    ) -> VQKD:
        """A released BEiT v2 tokenizer (``vqkd_encoder_base_decoder_{1,3}x768x12_{clip,dino}-*.pth``), in eval mode.

        ``checkpoint``: its path or its content (``{"model": state_dict}`` as ``utils.save_model`` writes it,
        ``{"state_dict": ...}`` or a bare state dict). The sizes are read from the tensors' shapes; the
        head counts are not in the file (official: 12 for encoder and decoder), nor the input
        normalisation (``--process_type default``: 0.5/0.5). Every key is placed (see
        :func:`convert_official_vqkd`), else the error names the ones left over or missing.
        """
        state = official_vqkd_state(read_official_file(checkpoint, map_location) if isinstance(
            checkpoint, (str, os.PathLike)) else checkpoint)
        if state is None:
            raise ValueError(
                "not an official VQ-KD tokenizer: expected a state dict (or {'model': state dict}) with "
                "'quantize.embedding.weight', as beit2/modeling_vqkd.py saves it"
            )
        converted = convert_official_vqkd(state)
        tokenizer = cls(**official_vqkd_config(converted, num_heads, decoder_num_heads, mean, std))
        missing, unexpected = tokenizer.load_state_dict(converted, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"the official VQ-KD state does not fit: keys not in the file {sorted(missing)}, keys of the file "
                f"no parameter takes {sorted(unexpected)}"
            )
        return tokenizer.eval()


#: official keys that no computation reads (``norm_ema_quantizer.py``): ``EmbeddingEMA.cluster_size`` holds the
#: k-means counts and is never updated after (``cluster_size_ema_update`` is never called), ``embed_avg`` is
#: only read by ``weight_update``, which is never called
OFFICIAL_UNREAD = ("quantize.embedding.cluster_size", "quantize.embedding.embed_avg")
#: prefixes the official loader deletes before loading (``modeling_vqkd.py``: the teacher and its scaling)
OFFICIAL_DROPPED = ("loss", "teacher", "scaling")
_OFFICIAL_RENAMES = {"encode_task_layer.": "encode_head.", "decode_task_layer.": "decode_head.",
                     "quantize.embedding.weight": "quantizer.embedding", "quantize.cluster_size": "quantizer.cluster_size",
                     "quantize.embedding.initted": "quantizer.initted"}


def read_official_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` of an official BEiT v2 file with the weights-only unpickler; the training
    checkpoints also hold the run's ``argparse.Namespace`` (``utils.save_model``), which is allowed."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(os.fspath(path), map_location=map_location, weights_only=True)


def official_vqkd_state(obj: Any) -> dict[str, torch.Tensor] | None:
    """The official VQ-KD state dict inside a loaded file (``model``/``state_dict`` entry or bare), else ``None``."""
    if not isinstance(obj, Mapping):
        return None
    for key in ("model", "state_dict"):
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    return dict(obj) if "quantize.embedding.weight" in obj else None


def convert_official_vqkd(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official ``VQKD`` keys -> ours. ``encoder.*``/``decoder.*`` keep their names (same ViT layout);
    the task layers and the codebook are renamed; the teacher, its scaling layer and :data:`OFFICIAL_UNREAD`
    are dropped. Any other key is kept as it is, so a strict load names it."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(OFFICIAL_DROPPED) or key in OFFICIAL_UNREAD:
            continue
        for old, new in _OFFICIAL_RENAMES.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value.reshape(()).bool() if key == "quantizer.initted" else value
    return out


def official_vqkd_config(state: Mapping[str, torch.Tensor], num_heads: int = 12, decoder_num_heads: int | None = None,
                         mean: tuple[float, float, float] = HALF, std: tuple[float, float, float] = HALF) -> dict[str, Any]:
    """:class:`VQKD` arguments of a converted official state dict, read from the tensors' shapes."""
    def depth(prefix: str) -> int:
        return len({k.split(".")[2] for k in state if k.startswith(f"{prefix}.blocks.")})

    vocab_size, code_dim = state["quantizer.embedding"].shape
    patch_size = state["encoder.patch_embed.proj.weight"].shape[-1]
    side = math.isqrt(state["encoder.pos_embed"].shape[1] - 1)
    return dict(
        teacher_dim=state["decode_head.2.weight"].shape[0], vocab_size=vocab_size, code_dim=code_dim,
        image_size=side * patch_size, patch_size=patch_size, embed_dim=state["encoder.cls_token"].shape[-1],
        depth=depth("encoder"), num_heads=num_heads, decoder_dim=state["decoder.cls_token"].shape[-1],
        decoder_depth=depth("decoder"), decoder_num_heads=decoder_num_heads, mean=mean, std=std,
    )
