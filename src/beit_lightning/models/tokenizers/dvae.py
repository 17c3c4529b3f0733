"""A trainable discrete VAE of DALL-E's family, for users who need a tokenizer of their own data.

Training follows DALL-E (Ramesh et al., 2021, section 2.1 and appendix A):

* the encoder's code logits are relaxed with Gumbel-softmax; the temperature follows a cosine
  from ``tau_start`` to ``tau_end`` over ``tau_anneal_steps``;
* the KL divergence to a uniform prior over the codes is weighted by ``kl_weight``, warmed up
  linearly from 0 over ``kl_warmup_steps`` (a free start lets the codes spread before the prior
  pulls the posterior towards uniform);
* the reconstruction loss is the negative log-likelihood of DALL-E's *logit-Laplace*
  distribution on pixels mapped into [eps, 1 - eps]. Pixels are bounded, and this density lives
  on (0, 1), unlike a Gaussian (MSE) or Laplace (L1) loss, which put mass outside the valid range
  and blur; the decoder predicts a location and a scale per pixel and channel. Both terms are
  sums per image divided by the number of pixel values, so ``kl_weight`` has DALL-E's meaning
  (6.6 there).

Tokens are the argmax of the encoder logits, as for OpenAI's encoder.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from .base import VisualTokenizer
from .dall_e import DallEDecoder, DallEEncoder, map_pixels, unmap_pixels

__all__ = ["DiscreteVAE", "logit_laplace_nll"]


def logit_laplace_nll(x: torch.Tensor, mu: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Element-wise negative log-density of x in (0, 1) under a logit-Laplace(mu, exp(log_scale))."""
    logit = torch.log(x) - torch.log1p(-x)
    return math.log(2.0) + log_scale + torch.log(x * (1 - x)) + (logit - mu).abs() * torch.exp(-log_scale)


class DiscreteVAE(VisualTokenizer):
    """DALL-E-style dVAE: :class:`DallEEncoder` + :class:`DallEDecoder` over ``vocab_size`` codes.

    Args:
        vocab_size: number of codes (8192).
        image_size: input side in pixels; the grid is ``image_size / 8`` (112 -> 14x14).
        n_hid, n_blk_per_group: encoder/decoder width and depth (DALL-E: 256, 2).
        n_init: decoder stem width (DALL-E: 128).
        tau_start, tau_end, tau_anneal_steps: Gumbel-softmax temperature schedule.
        kl_weight, kl_warmup_steps: weight of the KL to the uniform prior and its warm-up.
    """

    downsample = 8

    def __init__(
        self,
        vocab_size: int = 8192,
        image_size: int = 112,
        n_hid: int = 256,
        n_blk_per_group: int = 2,
        n_init: int = 128,
        input_channels: int = 3,
        tau_start: float = 1.0,
        tau_end: float = 1.0 / 16,
        tau_anneal_steps: int = 150_000,
        kl_weight: float = 6.6,
        kl_warmup_steps: int = 5000,
    ) -> None:
        super().__init__()
        if image_size % self.downsample:
            raise ValueError(f"image_size must be a multiple of {self.downsample}; got {image_size}")
        self.config: dict[str, Any] = dict(
            vocab_size=vocab_size, image_size=image_size, n_hid=n_hid, n_blk_per_group=n_blk_per_group, n_init=n_init,
            input_channels=input_channels, tau_start=tau_start, tau_end=tau_end, tau_anneal_steps=tau_anneal_steps,
            kl_weight=kl_weight, kl_warmup_steps=kl_warmup_steps,
        )
        self.vocab_size, self.image_size = vocab_size, image_size
        self.encoder = DallEEncoder(n_hid, n_blk_per_group, vocab_size, input_channels)
        self.decoder = DallEDecoder(n_init, n_hid, n_blk_per_group, vocab_size, input_channels)

    def encode_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(map_pixels(images))

    def temperature(self, step: int) -> float:
        c = self.config
        progress = min(1.0, step / max(1, c["tau_anneal_steps"]))
        return c["tau_end"] + 0.5 * (c["tau_start"] - c["tau_end"]) * (1 + math.cos(math.pi * progress))

    def kl_weight_at(self, step: int) -> float:
        c = self.config
        return c["kl_weight"] * min(1.0, step / max(1, c["kl_warmup_steps"]))

    def decode_soft(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder output for (relaxed) one-hot codes ``B x V x h x w``: (location, log-scale)."""
        mu, log_scale = self.decoder(codes).float().chunk(2, dim=1)
        return mu, log_scale.clamp(-7.0, 4.0)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] for token grids ``B x h x w``."""
        one_hot = F.one_hot(tokens, self.vocab_size).permute(0, 3, 1, 2).float()
        mu, _ = self.decode_soft(one_hot)
        return unmap_pixels(torch.sigmoid(mu))

    def training_losses(self, images: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """Loss terms and diagnostics for a batch of images in [0, 1]."""
        x = map_pixels(images)
        logits = self.encoder(x).float()
        tau = self.temperature(step)
        soft = F.gumbel_softmax(logits, tau=tau, hard=False, dim=1)
        mu, log_scale = self.decode_soft(soft)
        values_per_image = x[0].numel()
        nll = logit_laplace_nll(x.float(), mu, log_scale).flatten(1).sum(1).mean() / values_per_image
        log_q = F.log_softmax(logits, dim=1)
        kl = (log_q.exp() * (log_q + math.log(self.vocab_size))).sum(1).flatten(1).sum(1).mean() / values_per_image
        beta = self.kl_weight_at(step)
        with torch.no_grad():
            recon = unmap_pixels(torch.sigmoid(mu))
            recon_mse = F.mse_loss(recon, images.float())
        return {
            "loss": nll + beta * kl, "nll": nll, "kl": kl, "recon_mse": recon_mse,
            "tau": torch.tensor(tau), "kl_weight": torch.tensor(beta), "codes": logits.argmax(1), "recon": recon,
        }
