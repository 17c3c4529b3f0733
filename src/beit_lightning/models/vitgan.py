"""ViTGAN: a Vision Transformer generator and discriminator (Lee, Chang, Jiang, Zhang, Tu, Liu,
"ViTGAN: Training GANs with Vision Transformers", ICLR 2022, arXiv 2107.04589). Section numbers
below are those of the ICLR version as we know it; when this was written only the paper's abstract,
its published results and the authors' PyTorch reproduction (``mlpc-ucsd/ViTGAN``) could be read, so
the section numbers are unverified and equations are cited by their content, not their number.

Discriminator (paper sec. 4.1, "Regularizing ViT-based discriminator"):

* :class:`L2Attention`: self-attention whose logits are the negative squared L2 distance between
  queries and keys, with the query and key projections tied (``W_q = W_k``):
  ``softmax(-||x_i W_q - x_j W_q||^2 / sqrt(d_h)) x W_v``. Dot-product attention is not
  Lipschitz; this one is (Kim et al., "The Lipschitz Constant of Self-Attention", ICML 2021,
  which the paper follows), and the paper shows it removes the discriminator's gradient spikes.
* :func:`improved_spectral_norm`: every weight is divided by its spectral norm and multiplied by
  the spectral norm it had at initialisation, ``W_ISN = sigma(W_init) * W / sigma(W)`` (the
  paper's improved spectral normalisation, ISN): the Lipschitz constant is fixed at its initial
  value instead of 1, which with 1 made the transformer too weak to train.
* :class:`OverlappingPatchEmbed`: patches of side ``P + 2o`` taken every ``P`` pixels (``o``
  pixels of overlap on each side), so the discriminator does not over-fit to a fixed patch grid.

Generator (paper sec. 4.2, "Generator design"):

* The transformer's input is the learned position embedding ``E_pos`` alone; the latent
  ``z`` enters only through self-modulated LayerNorm (:class:`SelfModulatedLayerNorm`),
  ``SLN(h, w) = gamma(w) * LN(h) + beta(w)`` with ``w = MLP(z)``, in every block and after the
  last one.
* Each output token ``y_i`` becomes a patch through an implicit neural representation
  (:class:`PatchINR`): Fourier features of the patch's pixel coordinates go through a small
  SIREN-style MLP (sine activations) whose weights ``y_i`` modulates (StyleGAN2's weight
  modulation, as the official reproduction's CIPS patch generator).
* Patches may overlap (``overlap`` pixels on each side, like the discriminator's); overlapping
  pixels are the mean of the patches that cover them and the outer border is cropped (the
  combination is our choice: the sources read here do not say how overlaps are merged). The
  official PyTorch generator (``mlpc-ucsd/ViTGAN`` ``vit_generator.py``) uses disjoint patches.

What the paper leaves open (marked where used): the generator's attention is timm's dot-product
attention (L2 attention and ISN are discriminator regularisers in sec. 4.1), and the mapping
network ``w = MLP(z)`` is StyleGAN's (pixel norm, then Linear + LeakyReLU(0.2) layers), as in
the official code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models.vision_transformer import Attention
from torch import nn
from torch.nn.utils import parametrize

__all__ = [
    "ImprovedSpectralNorm",
    "L2Attention",
    "OverlappingPatchEmbed",
    "PatchINR",
    "RandomFeatureNet",
    "SelfModulatedLayerNorm",
    "ViTGANDiscriminator",
    "ViTGANGenerator",
    "apply_improved_spectral_norm",
    "improved_spectral_norm",
    "l2_attention_logits",
    "spectral_norm_of",
]


# --------------------------------------------------------------------------- discriminator parts
def spectral_norm_of(weight: torch.Tensor) -> torch.Tensor:
    """The largest singular value of ``weight`` viewed as ``out x (everything else)``."""
    return torch.linalg.matrix_norm(weight.detach().flatten(1).float(), ord=2)


class ImprovedSpectralNorm(nn.Module):
    """Parametrisation ``W -> sigma(W_init) * W / sigma(W)`` (ViTGAN eq. for ISN, sec. 4.1).

    ``sigma(W_init)`` is computed exactly (SVD) when the parametrisation is registered, from the
    weight as initialised; ``sigma(W)`` is estimated by power iteration (``n_power_iterations``
    per forward pass in training mode, as ``torch.nn.utils.parametrizations.spectral_norm``),
    with the singular vectors kept as buffers so that they track the weight across steps.
    """

    def __init__(self, weight: torch.Tensor, n_power_iterations: int = 1, eps: float = 1e-12) -> None:
        super().__init__()
        if n_power_iterations < 1:
            raise ValueError(f"n_power_iterations must be >= 1; got {n_power_iterations}")
        self.n_power_iterations, self.eps = n_power_iterations, eps
        matrix = weight.detach().flatten(1)
        self.register_buffer("init_sigma", spectral_norm_of(weight).to(weight.dtype))
        u = F.normalize(torch.randn(matrix.shape[0], dtype=matrix.dtype, device=matrix.device), dim=0, eps=eps)
        v = F.normalize(torch.randn(matrix.shape[1], dtype=matrix.dtype, device=matrix.device), dim=0, eps=eps)
        self.register_buffer("_u", u)
        self.register_buffer("_v", v)
        self._power_iteration(matrix, 15)  # start from converged singular vectors

    @torch.no_grad()
    def _power_iteration(self, matrix: torch.Tensor, steps: int) -> None:
        for _ in range(steps):
            self._v.copy_(F.normalize(matrix.t() @ self._u, dim=0, eps=self.eps))
            self._u.copy_(F.normalize(matrix @ self._v, dim=0, eps=self.eps))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        matrix = weight.flatten(1)
        if self.training:
            self._power_iteration(matrix.detach(), self.n_power_iterations)
        # clones: the in-place updates of a later forward must not touch this graph (double backward of R1)
        u, v = self._u.clone(memory_format=torch.contiguous_format), self._v.clone(memory_format=torch.contiguous_format)
        sigma = torch.dot(u, matrix @ v)
        return weight * (self.init_sigma / sigma)


def improved_spectral_norm(module: nn.Module, name: str = "weight", n_power_iterations: int = 1) -> nn.Module:
    """Register :class:`ImprovedSpectralNorm` on ``module.<name>`` (its current value is ``W_init``)."""
    parametrize.register_parametrization(module, name, ImprovedSpectralNorm(getattr(module, name), n_power_iterations))
    return module


def apply_improved_spectral_norm(model: nn.Module, n_power_iterations: int = 1) -> nn.Module:
    """ISN on the weight of every ``nn.Linear`` and ``nn.Conv2d`` of ``model`` (the paper applies it
    to every layer of the discriminator); call after the weights are initialised."""
    for module in list(model.modules()):
        if isinstance(module, (nn.Linear, nn.Conv2d)) and not parametrize.is_parametrized(module, "weight"):
            improved_spectral_norm(module, "weight", n_power_iterations)
    return model


def l2_attention_logits(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``-||q_i - k_j||^2 / sqrt(d)`` for ``q, k`` of shape ``... x N x d`` (``... x N x N``)."""
    d2 = q.pow(2).sum(-1, keepdim=True) + k.pow(2).sum(-1).unsqueeze(-2) - 2.0 * q @ k.transpose(-2, -1)
    return -d2.clamp_min(0.0) / math.sqrt(q.shape[-1])


class L2Attention(nn.Module):
    """Multi-head L2-distance self-attention with tied query/key projection (ViTGAN sec. 4.1,
    after Kim et al. 2021): ``softmax(-||x W_q - x W_q||^2 / sqrt(d_h)) x W_v``, then ``W_o``."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not a multiple of num_heads={num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qk = nn.Linear(dim, dim, bias=qkv_bias)  # W_q = W_k: one projection
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q = self._heads(self.qk(x))
        attn = self.attn_drop(l2_attention_logits(q, q).softmax(dim=-1))
        out = (attn @ self._heads(self.v(x))).transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(out))


class OverlappingPatchEmbed(nn.Module):
    """Patches of side ``patch_size + 2 * overlap`` every ``patch_size`` pixels, zero padded by
    ``overlap`` at the border (ViTGAN sec. 4.1, "Overlapping image patches"): a
    ``(img_size / patch_size)^2`` grid like the plain ViT's, each token seeing its neighbours' edges."""

    def __init__(self, img_size: int = 32, patch_size: int = 4, overlap: int = 2, in_chans: int = 3,
                 embed_dim: int = 384) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} is not a multiple of patch_size={patch_size}")
        if overlap < 0:
            raise ValueError(f"overlap must be >= 0; got {overlap}")
        self.img_size, self.patch_size, self.overlap = img_size, patch_size, overlap
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size + 2 * overlap, stride=patch_size, padding=overlap)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"the discriminator takes {self.img_size}px images; got {tuple(x.shape[-2:])}")
        return self.proj(x).flatten(2).transpose(1, 2)


class DiscriminatorBlock(nn.Module):
    """Pre-norm transformer block with :class:`L2Attention` and timm's ``Mlp``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = L2Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def _init_vit_(module: nn.Module) -> None:
    """timm's ViT initialisation: truncated normal (std 0.02) linear weights, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class ViTGANDiscriminator(nn.Module):
    """ViT discriminator of ViTGAN: overlapping patch embedding, class token and learned position
    embedding, blocks of L2 attention, a linear head on the class token giving one logit per image;
    improved spectral normalisation on every weight (``spectral_norm=True``).

    Args:
        img_size, patch_size, overlap: ``P`` and ``o`` of :class:`OverlappingPatchEmbed`.
        embed_dim, depth, num_heads, mlp_ratio: the transformer.
        drop_path_rate: stochastic depth, linearly increasing over the blocks.
        spectral_norm: ISN on every ``Linear`` / ``Conv2d`` weight (off only for ablations).
        n_power_iterations: power iterations of ISN per training forward pass.
    """

    def __init__(self, img_size: int = 32, patch_size: int = 4, overlap: int = 2, in_chans: int = 3,
                 embed_dim: int = 384, depth: int = 4, num_heads: int = 6, mlp_ratio: float = 4.0,
                 drop_path_rate: float = 0.0, spectral_norm: bool = True, n_power_iterations: int = 1) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_embed = OverlappingPatchEmbed(img_size, patch_size, overlap, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        rates = [drop_path_rate * i / max(1, depth - 1) for i in range(depth)]  # no tensor: builds on meta
        self.blocks = nn.ModuleList(DiscriminatorBlock(embed_dim, num_heads, mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, 1)
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        _init_vit_(self)
        if spectral_norm:
            apply_improved_spectral_norm(self, n_power_iterations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``B x 3 x H x W`` in [-1, 1] -> logits ``B`` (real: high)."""
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0])).squeeze(-1)


# ------------------------------------------------------------------------------- generator parts
class SelfModulatedLayerNorm(nn.Module):
    """``SLN(h, w) = gamma(w) * LN(h) + beta(w)`` (ViTGAN sec. 4.2): LayerNorm without its own
    affine, whose scale and shift are affine functions of the style ``w``. ``gamma`` starts around
    1 (bias 1) and ``beta`` around 0, so the block starts close to a plain pre-norm block."""

    def __init__(self, dim: int, style_dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.gamma = nn.Linear(style_dim, dim)
        self.beta = nn.Linear(style_dim, dim)
        nn.init.ones_(self.gamma.bias)
        nn.init.zeros_(self.beta.bias)

    def forward(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``h``: ``B x N x dim`` tokens, ``w``: ``B x style_dim`` (one style per image)."""
        normed = F.layer_norm(h, (self.dim,), eps=self.eps)
        return self.gamma(w).unsqueeze(1) * normed + self.beta(w).unsqueeze(1)


class GeneratorBlock(nn.Module):
    """``h' = MSA(SLN(h, w)) + h``, ``h'' = MLP(SLN(h', w)) + h'`` (ViTGAN sec. 4.2)."""

    def __init__(self, dim: int, style_dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = SelfModulatedLayerNorm(dim, style_dim)
        self.attn = Attention(dim, num_heads, qkv_bias=True)
        self.norm2 = SelfModulatedLayerNorm(dim, style_dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        h = h + self.drop_path(self.attn(self.norm1(h, w)))
        return h + self.drop_path(self.mlp(self.norm2(h, w)))


class ModulatedSineLayer(nn.Module):
    """``sin((x * s(y)) W^T + b)``: a SIREN layer (Sitzmann et al. 2020: sine activation, weights
    uniform in ``+-sqrt(6 / fan_in)``) whose input features are scaled per patch by ``s(y) = A y + 1``,
    i.e. StyleGAN2's weight modulation ``W diag(s)`` without demodulation."""

    def __init__(self, in_features: int, out_features: int, style_dim: int) -> None:
        super().__init__()
        bound = math.sqrt(6.0 / in_features)
        self.weight = nn.Parameter(torch.empty(out_features, in_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(out_features).uniform_(-1.0 / math.sqrt(in_features), 1.0 / math.sqrt(in_features)))
        self.modulation = nn.Linear(style_dim, in_features)
        nn.init.ones_(self.modulation.bias)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x``: ``M x K x in`` (``K`` pixels of ``M`` patches), ``y``: ``M x style_dim``."""
        return torch.sin((x * self.modulation(y).unsqueeze(1)) @ self.weight.t() + self.bias)


class PatchINR(nn.Module):
    """Implicit neural representation of one patch (ViTGAN sec. 4.2): ``x_i = f(E_fou, y_i)``.

    ``E_fou`` are Fourier features ``[cos(2 pi B c), sin(2 pi B c)]`` of the pixel coordinates
    ``c`` in [-1, 1]^2 of a ``side x side`` patch (Tancik et al. 2020; ``B`` is learned, initialised
    from ``N(0, fourier_scale^2)``, as the official code's learned Fourier features); ``f`` is
    ``num_layers`` modulated sine layers (:class:`ModulatedSineLayer`) and a linear RGB output.
    """

    def __init__(self, style_dim: int, side: int, fourier_features: int = 64, hidden_dim: int = 128,
                 num_layers: int = 2, out_chans: int = 3, fourier_scale: float = 1.0) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1; got {num_layers}")
        self.side, self.out_chans = side, out_chans
        axis = torch.linspace(-1.0, 1.0, side)
        yy, xx = torch.meshgrid(axis, axis, indexing="ij")
        self.register_buffer("coords", torch.stack([xx, yy], dim=-1).view(side * side, 2), persistent=False)
        self.fourier = nn.Parameter(torch.randn(2, fourier_features) * fourier_scale)
        dims = [2 * fourier_features] + [hidden_dim] * num_layers
        self.layers = nn.ModuleList(ModulatedSineLayer(a, b, style_dim) for a, b in zip(dims[:-1], dims[1:], strict=True))
        self.to_rgb = nn.Linear(hidden_dim, out_chans)

    def fourier_features(self) -> torch.Tensor:
        """``E_fou``: ``side^2 x 2 fourier_features``."""
        angles = 2 * math.pi * self.coords @ self.fourier
        return torch.cat([angles.cos(), angles.sin()], dim=-1)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """Patch embeddings ``M x style_dim`` -> pixels ``M x side^2 x out_chans``."""
        x = self.fourier_features().unsqueeze(0).expand(y.shape[0], -1, -1)
        for layer in self.layers:
            x = layer(x, y)
        return self.to_rgb(x)


class MappingNetwork(nn.Module):
    """``w = MLP(z)``: StyleGAN's mapping (pixel norm of ``z``, then Linear + LeakyReLU(0.2) layers)."""

    def __init__(self, latent_dim: int, style_dim: int, num_layers: int = 8) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers += [nn.Linear(latent_dim if i == 0 else style_dim, style_dim), nn.LeakyReLU(0.2)]
        self.net = nn.Sequential(*layers) if layers else nn.Identity()
        if not layers and latent_dim != style_dim:
            raise ValueError(f"without mapping layers latent_dim ({latent_dim}) must equal style_dim ({style_dim})")

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z * torch.rsqrt(z.pow(2).mean(dim=1, keepdim=True) + 1e-8)
        return self.net(z)


class ViTGANGenerator(nn.Module):
    """ViTGAN's generator (sec. 4.2): learned position embeddings through transformer blocks
    modulated by ``w = MLP(z)`` via SLN, a final SLN, and one INR patch per token.

    Args:
        img_size, patch_size: output side and patch side ``P`` (a ``(img_size / P)^2`` token grid).
        overlap: ``o``: each token paints a ``(P + 2o)^2`` patch; overlaps are averaged.
        latent_dim: size of ``z``; style_dim: size of ``w`` and of the SLN input.
        embed_dim, depth, num_heads, mlp_ratio, drop_path_rate: the transformer.
        mapping_layers: layers of the mapping network (StyleGAN / official code: 8).
        inr_hidden_dim, inr_layers, fourier_features, fourier_scale: the patch INR.
    """

    def __init__(self, img_size: int = 32, patch_size: int = 4, overlap: int = 0, latent_dim: int = 384,
                 style_dim: int = 384, embed_dim: int = 384, depth: int = 4, num_heads: int = 6,
                 mlp_ratio: float = 4.0, drop_path_rate: float = 0.0, mapping_layers: int = 8,
                 inr_hidden_dim: int = 512, inr_layers: int = 3, fourier_features: int = 192,
                 fourier_scale: float = 1.0, out_chans: int = 3) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} is not a multiple of patch_size={patch_size}")
        if overlap < 0:
            raise ValueError(f"overlap must be >= 0; got {overlap}")
        self.img_size, self.patch_size, self.overlap, self.latent_dim = img_size, patch_size, overlap, latent_dim
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.mapping = MappingNetwork(latent_dim, style_dim, mapping_layers)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, embed_dim))
        rates = [drop_path_rate * i / max(1, depth - 1) for i in range(depth)]  # no tensor: builds on meta
        self.blocks = nn.ModuleList(GeneratorBlock(embed_dim, style_dim, num_heads, mlp_ratio, r) for r in rates)
        trunc_normal_(self.pos_embed, std=0.02)
        _init_vit_(self.blocks)
        self.norm = SelfModulatedLayerNorm(embed_dim, style_dim)
        side = patch_size + 2 * overlap
        self.inr = PatchINR(embed_dim, side, fourier_features, inr_hidden_dim, inr_layers, out_chans, fourier_scale)
        ones = torch.ones(1, side * side, self.num_patches)
        coverage = F.fold(ones, img_size, side, stride=patch_size, padding=overlap)
        self.register_buffer("coverage", coverage, persistent=False)  # patches covering each pixel

    def style(self, z: torch.Tensor) -> torch.Tensor:
        """``w = MLP(z)``."""
        return self.mapping(z)

    def patch_embeddings(self, w: torch.Tensor) -> torch.Tensor:
        """``y = SLN(h_L, w)``: ``B x num_patches x embed_dim``."""
        h = self.pos_embed.expand(w.shape[0], -1, -1)
        for block in self.blocks:
            h = block(h, w)
        return self.norm(h, w)

    def assemble(self, patches: torch.Tensor) -> torch.Tensor:
        """``B x L x side^2 x C`` patches -> ``B x C x H x W`` (overlaps averaged, border cropped)."""
        b, n, k, c = patches.shape
        columns = patches.permute(0, 3, 2, 1).reshape(b, c * k, n)
        side = self.patch_size + 2 * self.overlap
        image = F.fold(columns, self.img_size, side, stride=self.patch_size, padding=self.overlap)
        return image / self.coverage if self.overlap else image

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Latents ``B x latent_dim`` -> images ``B x 3 x img_size x img_size`` (data range [-1, 1])."""
        y = self.patch_embeddings(self.style(z))
        b, n, d = y.shape
        patches = self.inr(y.reshape(b * n, d)).view(b, n, -1, self.inr.out_chans)
        return self.assemble(patches)


# ---------------------------------------------------------------------------------- evaluation
class RandomFeatureNet(nn.Module):
    """A small fixed random convolutional feature extractor for FID where Inception weights are
    not available (tests, the CPU smoke run): images in [0, 1] -> ``num_features`` features
    (two strided convolutions, ReLU, global mean and standard deviation pooling). Its weights are
    drawn from ``seed`` only, so FIDs of different runs with the same seed are comparable; the
    numbers are not Inception FIDs and must not be compared with published ones.
    """

    def __init__(self, num_features: int = 64, seed: int = 0, in_chans: int = 3, width: int = 32) -> None:
        super().__init__()
        if num_features % 2:
            raise ValueError(f"num_features must be even (mean and std pooling); got {num_features}")
        self.num_features = num_features
        self.net = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(width, num_features // 2, 3, stride=2, padding=1), nn.ReLU(),
        )
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                fan_in = p[0].numel() if p.ndim > 1 else 1
                p.copy_(torch.randn(p.shape, generator=generator) * (math.sqrt(2.0 / fan_in) if p.ndim > 1 else 0.1))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> RandomFeatureNet:
        return super().train(False)  # fixed: never in training mode

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.net(images.float() * 2.0 - 1.0)
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)
