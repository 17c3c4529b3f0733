"""GAN training (ViTGAN: Lee et al., "ViTGAN: Training GANs with Vision Transformers", ICLR 2022,
arXiv 2107.04589) as a LightningModule with manual optimisation.

One training step is one discriminator step and one generator step (``n_critic = 1``, official
``configs/gan/vitgan/c10_style64.gin``), each with its own Adam and learning rate, on the
non-saturating loss (Goodfellow et al. 2014; official ``options.loss = "nonsat"``):

* discriminator: ``softplus(D(T(G(z)))) + softplus(-D(T(x)))`` with ``T`` DiffAugment (optional),
  plus balanced consistency regularisation (bCR, Zhao et al. 2021: ``lambda_real ||D(T1(x)) -
  D(T2(x))||^2 + lambda_fake ||D(T1(G(z))) - D(T2(G(z)))||^2``, two independent augmentation draws)
  and R1 (Mescheder et al. 2018: ``gamma / 2 * E ||grad_x D(T(x))||^2`` on the real images before
  augmentation, as the official ``training/gan/aug_both.py``), both optional;
* generator: ``softplus(-D(T(G(z))))``.

An exponential moving average of the generator (``generator_ema``; half-life in thousands of
images, as the official ``--halflife_k``) makes the samples and the metrics. Validation measures
FID (and IS with Inception) between the validation images and as many EMA samples, and logs a grid
of samples from fixed latents. Both optimisers, both schedulers, the EMA generator and the
iteration count are in every Lightning checkpoint, so a resumed run continues where it stopped.

Lightning counts one ``global_step`` per optimiser step: with two optimisers one iteration is two
steps, so ``trainer.max_steps`` is twice the iterations (the experiments say so).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchvision.utils import make_grid

from ..models.diffaugment import DiffAugment
from ..visualise import log_image, to_uint8
from ..weights.sources import resolve_weights

__all__ = ["GANTraining", "inception_network"]

_METRIC_PREFIXES = ("fid.", "inception_score.")


def inception_network(weights_path: str, features: str = "2048") -> nn.Module:
    """torchmetrics' (torch-fidelity's) FID Inception-v3 with its weights from a local file
    (``pt_inception-2015-12-05-6726825d.pth``): ``"2048"`` pool features for FID,
    ``"logits_unbiased"`` for IS. Needs the ``torch-fidelity`` package."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    return NoTrainInceptionV3(name="inception-v3-compat", features_list=[features],
                              feature_extractor_weights_path=weights_path)


class GANTraining(pl.LightningModule):
    """Train ``generator`` against ``discriminator`` (ViTGAN's, or any pair with the same calls).

    Args:
        generator: maps latents ``B x generator.latent_dim`` to images in [-1, 1].
        discriminator: maps images to one logit per image.
        lr_g, lr_d: Adam learning rates (official CIFAR-10: 0.001 both).
        betas: Adam betas of both optimisers (official: (0.0, 0.99)).
        warmup_steps: iterations of linear learning-rate warmup, ``lr * min(1, (t + 1) / warmup)``
            (official ``--use_warmup``, ``options.warmup = 3000``); 0: none.
        diffaugment: DiffAugment policy for everything the discriminator sees (``""``/``None``: off).
        diffaugment_probability: chance of each DiffAugment operation per image.
        bcr_real, bcr_fake: bCR weights (0: off). bCR needs augmentation: ``diffaugment`` is used
            for its two draws, or ``"translation"`` when ``diffaugment`` is off.
        r1_gamma: R1 weight ``gamma`` (0: off).
        ema_halflife_kimg: half-life of the generator EMA in thousands of images; the decay per
            iteration is ``0.5 ** (total_batch / (1000 * ema_halflife_kimg))``.
        ema_start_kimg: the EMA copies the generator until this many thousand images were seen
            (``None``: ``ema_halflife_kimg``, as the official ``--ema_start_k`` default).
        grad_clip_norm: gradient norm clipping of both networks through ``self.clip_gradients``
            (``None``: none; the official code does not clip).
        fid_feature: what FID measures images with: an ``nn.Module`` mapping images in [0, 1] to
            features (e.g. :class:`~beit_lightning.models.vitgan.RandomFeatureNet` for tests and the
            CPU smoke run), or the string ``"inception"`` for the standard Inception-v3 FID with
            ``inception_weights`` (needs ``torch-fidelity``); ``None``: no FID.
        inception_weights: torch-fidelity's Inception weights: a local file, a URL or the registry name
            ``inception_v3_fid`` (:mod:`beit_lightning.weights`; resolved, and downloaded once, when the task is built).
        inception_score: also log IS (Inception only; 10 splits).
        num_sample_images: samples in the logged grid (fixed latents).
        sample_seed: seed of those latents.
    """

    data_kind = "images"

    def __init__(
        self,
        generator: nn.Module,
        discriminator: nn.Module,
        lr_g: float = 1e-3,
        lr_d: float = 1e-3,
        betas: tuple[float, float] = (0.0, 0.99),
        warmup_steps: int = 0,
        diffaugment: str | None = "color,translation,cutout",
        diffaugment_probability: float = 1.0,
        bcr_real: float = 0.0,
        bcr_fake: float = 0.0,
        r1_gamma: float = 0.0,
        ema_halflife_kimg: float = 10.0,
        ema_start_kimg: float | None = None,
        grad_clip_norm: float | None = None,
        fid_feature: nn.Module | str | None = None,
        inception_weights: str | None = None,
        inception_score: bool = False,
        num_sample_images: int = 64,
        sample_seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["generator", "discriminator", "fid_feature"])
        self.automatic_optimization = False
        if not hasattr(generator, "latent_dim"):
            raise TypeError(f"the generator ({type(generator).__name__}) must say its latent size as `latent_dim`")
        for name, value in (("bcr_real", bcr_real), ("bcr_fake", bcr_fake), ("r1_gamma", r1_gamma)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0; got {value}")
        if ema_halflife_kimg <= 0:
            raise ValueError(f"ema_halflife_kimg must be > 0; got {ema_halflife_kimg}")
        self.generator, self.discriminator = generator, discriminator
        self.generator_ema = copy.deepcopy(generator).requires_grad_(False).eval()
        self.augment = DiffAugment(diffaugment, diffaugment_probability) if diffaugment else nn.Identity()
        self.consistency_augment = self.augment if diffaugment else DiffAugment("translation")
        self.register_buffer("iterations", torch.zeros((), dtype=torch.long))  # in checkpoints
        sample_z = torch.randn(num_sample_images, generator.latent_dim, generator=torch.Generator().manual_seed(sample_seed))
        self.register_buffer("sample_z", sample_z, persistent=False)
        self.fid, self.inception_score = self._metrics(fid_feature, inception_weights, inception_score)

    @staticmethod
    def _metrics(feature: nn.Module | str | None, weights: str | None, with_is: bool) -> tuple[Any, Any]:
        if feature is None:
            if with_is:
                raise ValueError("inception_score=true needs the Inception network: set fid_feature=inception")
            return None, None
        if isinstance(feature, str):
            if feature != "inception":
                raise ValueError(f"fid_feature must be a module, 'inception' or None; got {feature!r}")
            if not weights:
                raise ValueError(
                    "fid_feature=inception needs the Inception weights: set task.inception_weights=inception_v3_fid "
                    "(torch-fidelity's release by its registry name, downloaded once into the cache; "
                    "`beit-lightning-weights download inception_v3_fid` prefetches it), a URL or a local file"
                )
            weights = resolve_weights(weights)
            fid = FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=weights)
            if not with_is:
                return fid, None
            from torchmetrics.image.inception import InceptionScore

            return fid, InceptionScore(feature=inception_network(weights, "logits_unbiased"), normalize=True)
        if with_is:
            raise ValueError("inception_score=true needs fid_feature=inception (IS is defined on Inception's classes)")
        return FrechetInceptionDistance(feature=feature, normalize=True), None

    # ----------------------------------------------------------------------------- the model
    def train(self, mode: bool = True) -> GANTraining:
        super().train(mode)
        self.generator_ema.eval()
        return self

    def latents(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.generator.latent_dim, device=self.device)

    @torch.no_grad()
    def sample(self, n: int | None = None, z: torch.Tensor | None = None) -> torch.Tensor:
        """Images from the EMA generator, in [-1, 1] (``n`` random latents, or the given ``z``)."""
        z = self.latents(n) if z is None else z.to(self.device)
        return self.generator_ema(z).clamp(-1.0, 1.0)

    def on_fit_start(self) -> None:
        data = getattr(self.trainer, "datamodule", None)
        mean, std = getattr(data, "mean", None), getattr(data, "std", None)
        if mean is not None and (tuple(mean) != (0.5,) * 3 or tuple(std) != (0.5,) * 3):
            raise ValueError(f"GAN training expects images in [-1, 1]: set data.mean and data.std to [0.5, 0.5, 0.5] "
                             f"(got mean={tuple(mean)}, std={tuple(std)})")

    # -------------------------------------------------------------------------- the losses
    def discriminator_loss(self, real: torch.Tensor, fake: torch.Tensor) -> dict[str, torch.Tensor]:
        hp = self.hparams
        real = real.detach().requires_grad_(hp.r1_gamma > 0)
        fake = fake.detach()
        d_real = self.discriminator(self.augment(real))
        d_fake = self.discriminator(self.augment(fake))
        out = {"adversarial": F.softplus(d_fake).mean() + F.softplus(-d_real).mean(),
               "d_real": d_real.detach().mean(), "d_fake": d_fake.detach().mean()}
        loss = out["adversarial"]
        if hp.bcr_real > 0 or hp.bcr_fake > 0:
            bcr_real = F.mse_loss(self.discriminator(self.consistency_augment(real)), d_real)
            bcr_fake = F.mse_loss(self.discriminator(self.consistency_augment(fake)), d_fake)
            out["bcr"] = hp.bcr_real * bcr_real + hp.bcr_fake * bcr_fake
            loss = loss + out["bcr"]
        if hp.r1_gamma > 0:
            (grad,) = torch.autograd.grad(d_real.sum(), real, create_graph=True)
            out["r1"] = grad.pow(2).flatten(1).sum(1).mean()
            loss = loss + 0.5 * hp.r1_gamma * out["r1"]
        out["loss"] = loss
        return out

    def generator_loss(self, fake: torch.Tensor) -> torch.Tensor:
        return F.softplus(-self.discriminator(self.augment(fake))).mean()

    # ------------------------------------------------------------------------- the training
    def _step(self, optimizer, scheduler, loss: torch.Tensor, module: nn.Module) -> None:
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.hparams.grad_clip_norm:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.grad_clip_norm, gradient_clip_algorithm="norm")
        optimizer.step()
        scheduler.step()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        opt_g, opt_d = self.optimizers()
        sch_g, sch_d = self.lr_schedulers()
        real = batch["image"]
        n = real.shape[0]

        self.toggle_optimizer(opt_d)
        with torch.no_grad():
            fake = self.generator(self.latents(n))
        d_out = self.discriminator_loss(real, fake)
        self._step(opt_d, sch_d, d_out["loss"], self.discriminator)
        self.untoggle_optimizer(opt_d)

        self.toggle_optimizer(opt_g)
        g_loss = self.generator_loss(self.generator(self.latents(n)))
        self._step(opt_g, sch_g, g_loss, self.generator)
        self.untoggle_optimizer(opt_g)

        self.update_ema(n * self.trainer.world_size)
        self.log("train/loss_d", d_out["adversarial"], prog_bar=True)
        self.log("train/loss_g", g_loss, prog_bar=True)
        for key in ("d_real", "d_fake", "bcr", "r1"):
            if key in d_out:
                self.log(f"train/{key}", d_out[key])
        self.log("train/iterations", self.iterations.float())

    @torch.no_grad()
    def update_ema(self, total_batch: int) -> None:
        """One EMA step after an iteration on ``total_batch`` images (official ``accumulate``)."""
        hp = self.hparams
        self.iterations += 1
        seen = int(self.iterations) * total_batch
        start = hp.ema_halflife_kimg if hp.ema_start_kimg is None else hp.ema_start_kimg
        decay = 0.5 ** (total_batch / (1000.0 * hp.ema_halflife_kimg)) if seen > 1000.0 * start else 0.0
        for ema, param in zip(self.generator_ema.parameters(), self.generator.parameters(), strict=True):
            ema.lerp_(param.detach(), 1.0 - decay)
        for ema, buf in zip(self.generator_ema.buffers(), self.generator.buffers(), strict=True):
            ema.copy_(buf)

    # ----------------------------------------------------------------------- the evaluation
    @staticmethod
    def _unit(images: torch.Tensor) -> torch.Tensor:
        return (images.float() * 0.5 + 0.5).clamp(0.0, 1.0)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        real = batch["image"]
        fake = self.sample(real.shape[0])
        if self.fid is not None:
            self.fid.update(self._unit(real), real=True)
            self.fid.update(self._unit(fake), real=False)
        if self.inception_score is not None:
            self.inception_score.update(self._unit(fake))

    def on_validation_epoch_end(self) -> None:
        if self.fid is not None and int(self.fid.fake_features_num_samples) > 1:
            self.log("val/fid", self.fid.compute(), sync_dist=True, prog_bar=True)
        if self.fid is not None:
            self.fid.reset()
        if self.inception_score is not None and self.inception_score.features:
            mean, std = self.inception_score.compute()
            self.log("val/is", mean, sync_dist=True)
            self.log("val/is_std", std, sync_dist=True)
            self.inception_score.reset()
        if not self.trainer.sanity_checking and self.trainer.is_global_zero and len(self.sample_z):
            grid = make_grid(self._unit(self.sample(z=self.sample_z)).cpu(), nrow=int(math.ceil(math.sqrt(len(self.sample_z)))))
            log_image(self.trainer, "val/samples", to_uint8(grid))

    # ---------------------------------------------------------------------- the checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The fixed feature networks of the metrics are rebuilt from the config, not saved."""
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(_METRIC_PREFIXES)]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        own = self.state_dict()
        for key in [k for k in own if k.startswith(_METRIC_PREFIXES)]:
            checkpoint["state_dict"].setdefault(key, own[key])

    def configure_optimizers(self):
        hp = self.hparams
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=hp.lr_g, betas=tuple(hp.betas))
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=hp.lr_d, betas=tuple(hp.betas))
        warmup = int(hp.warmup_steps)

        def factor(step: int) -> float:  # official train_stylegan2.py _update_warmup
            return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0

        schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, factor) for opt in (opt_g, opt_d)]
        return [opt_g, opt_d], schedulers
