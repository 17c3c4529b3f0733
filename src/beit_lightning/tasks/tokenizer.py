"""Training a visual tokenizer: a DALL-E-style dVAE, or BEiT v2's VQ-KD against a frozen teacher.

Logged: the loss and its terms, the reconstruction error (dVAE: mean squared error of images
decoded from the *discrete* tokens; VQ-KD: cosine similarity to the teacher's features), and
codebook health: perplexity of the code distribution (``exp`` of its entropy; the number of
equally used codes it is worth) and the fraction of codes in use over the validation set. dVAE
image grids (originals above reconstructions) and the codebook's usage (codes sorted by how often
they were chosen) go to TensorBoard and as PNG files into ``<log dir>/images/``. The trained tokenizer is exported as a small stand-alone checkpoint
(``export_path``) after every validation and at the end of training.
"""

from __future__ import annotations

import os
from typing import Any

import pytorch_lightning as pl
import timm
import torch
from torch import nn
from torchvision.utils import make_grid

from ..models.tokenizers.checkpoint import save_tokenizer
from ..models.tokenizers.dvae import DiscreteVAE
from ..models.tokenizers.vqkd import VQKD, teacher_output_dim, teacher_patch_features
from ..optim import configure_adamw_cosine, param_groups, schedule_steps
from ..visualise import bar_chart, log_image, to_uint8
from .frozen import expect_frozen_in_eval_mode

__all__ = ["TokenizerTraining", "codebook_usage", "create_teacher"]

TEACHER_TARGETS = ("features", "projected")


def codebook_usage(histogram: torch.Tensor) -> tuple[float, float]:
    """(perplexity, fraction of codes used) of a histogram of code counts."""
    p = histogram.float() / histogram.sum().clamp_min(1)
    nonzero = p[p > 0]
    perplexity = float(torch.exp(-(nonzero * nonzero.log()).sum()))
    return perplexity, float((histogram > 0).float().mean())


def create_teacher(name: str, pretrained: bool, file: str | None = None, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name)`` with its published weights (``pretrained``) or those of ``file``; when
    the weights are neither in the local Hugging Face cache nor downloadable, the error names the
    model, its hub repository and how to fetch it (huggingface_hub's own error does not)."""
    if file is not None:
        if not os.path.isfile(file):
            raise FileNotFoundError(f"task.teacher_file={file!r} does not exist (the weights of teacher {name!r})")
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": file}, **kwargs)
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except OSError as err:  # huggingface_hub's LocalEntryNotFoundError, timm's missing-file errors
        if not pretrained:
            raise
        cfg = timm.models.get_pretrained_cfg(name)
        hub = getattr(cfg, "hf_hub_id", None) or getattr(cfg, "url", None) or "its timm pretrained config"
        raise FileNotFoundError(
            f"the weights of teacher {name!r} (Hugging Face {hub}) are not in the local cache and cannot be "
            f"downloaded ({type(err).__name__}). On a machine with network run\n"
            f"  python -c \"import timm; timm.create_model('{name}', pretrained=True)\"\n"
            f"and copy its cache folder (~/.cache/huggingface/hub/models--{hub.replace('/', '--')}, or under "
            f"$HF_HOME / $HF_HUB_CACHE) to this machine, or download the file and set task.teacher_file=<path>"
        ) from err


class TokenizerTraining(pl.LightningModule):
    """Train ``tokenizer`` (:class:`DiscreteVAE` or :class:`VQKD`) on ``batch["tokenizer_image"]``.

    Args:
        tokenizer: the model to train.
        teacher: VQ-KD only: a timm model name (e.g. ``vit_base_patch16_clip_quickgelu_224.openai``) or
            module; frozen, in eval mode, run without gradients, on the tokenizer view normalised with
            the teacher's own mean/std (resized bicubically only if the teacher has another fixed size).
        teacher_pretrained: load the teacher's published weights through timm (from the local Hugging Face
            cache when there is no network; the error says how to fetch them).
        teacher_file: load the teacher's weights from this file instead (timm's ``pretrained_cfg_overlay``:
            a timm state dict, e.g. the ``open_clip_pytorch_model.bin``/``pytorch_model.bin`` of its hub repo).
        teacher_target: ``"features"``: the teacher's patch tokens after its final norm (a name is
            built with ``num_classes=0``). ``"projected"`` (BEiT v2 with CLIP): those tokens through
            the model's linear head, which for a timm CLIP ViT is the image projection ``visual.proj``
            (a name is built with its pretrained ``num_classes``: 512 for CLIP ViT-B/16).
        lr, min_lr, weight_decay, betas: AdamW peaked at ``lr`` with a per-step warmup + cosine to ``min_lr``.
        lr_base_batch: the total batch ``lr`` is given for; it is scaled linearly to the run's effective
            batch (official VQ-KD: 5e-5 at 128). ``min_lr`` is never scaled, as in the official script.
            ``None``: ``lr`` as given.
        warmup_steps, warmup_epochs: the linear warmup, in optimiser steps or (when ``warmup_steps`` is
            ``None``) in epochs; capped at half the run.
        export_path: where the stand-alone tokenizer checkpoint is written (``None``: not written).
        num_logged_images: images per reconstruction grid (dVAE).
    """

    def __init__(
        self,
        tokenizer: DiscreteVAE | VQKD,
        teacher: nn.Module | str | None = None,
        teacher_pretrained: bool = False,
        teacher_file: str | None = None,
        teacher_target: str = "features",
        lr: float = 1e-3,
        min_lr: float = 1e-5,
        weight_decay: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int | None = 500,
        warmup_epochs: float | None = None,
        lr_base_batch: int | None = None,
        export_path: str | None = None,
        num_logged_images: int = 8,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer", "teacher"])
        self.tokenizer = tokenizer
        self.teacher: nn.Module | None = None
        if isinstance(tokenizer, VQKD):
            if teacher is None:
                raise ValueError("VQ-KD needs a teacher: set task.teacher to a timm model name")
            if teacher_target not in TEACHER_TARGETS:
                raise ValueError(f"task.teacher_target must be one of {TEACHER_TARGETS}; got {teacher_target!r}")
            projected = teacher_target == "projected"
            if isinstance(teacher, str):
                # "projected" keeps the pretrained head: for CLIP towers it holds the image projection
                kwargs = {} if projected else {"num_classes": 0}
                teacher = create_teacher(teacher, teacher_pretrained, teacher_file, **kwargs)
            self.teacher = teacher.eval().requires_grad_(False)
            cfg = timm.data.resolve_data_config({}, model=self.teacher)
            self.register_buffer("teacher_mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("teacher_std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)
            dim = teacher_output_dim(self.teacher, projected)
            if dim != tokenizer.config["teacher_dim"]:
                raise ValueError(
                    f"the teacher's {teacher_target} are {dim}-d but the tokenizer's decoder predicts "
                    f"{tokenizer.config['teacher_dim']}: set task.tokenizer.teacher_dim={dim}"
                )
        elif not isinstance(tokenizer, DiscreteVAE):
            raise TypeError(f"can train a DiscreteVAE or a VQKD, not a {type(tokenizer).__name__}")
        self.register_buffer("val_histogram", torch.zeros(tokenizer.vocab_size, dtype=torch.long), persistent=False)
        self._val_images: tuple[torch.Tensor, torch.Tensor] | None = None

    def train(self, mode: bool = True) -> TokenizerTraining:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def on_fit_start(self) -> None:
        expect_frozen_in_eval_mode([self.teacher])

    def on_train_start(self) -> None:
        # Lightning keeps the modes modules had when fit() was called; a tokenizer left in eval mode
        # (e.g. after encoding a batch) would train without its codebook updates
        self.train()

    @torch.no_grad()
    def teacher_targets(self, images: torch.Tensor) -> torch.Tensor:
        """VQ-KD: the teacher's patch features ``B x N x teacher_dim`` for tokenizer views in [0, 1]."""
        return teacher_patch_features(
            self.teacher, images, self.tokenizer.grid_size, projected=self.hparams.teacher_target == "projected",
            mean=self.teacher_mean, std=self.teacher_std,
        )

    def losses(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if isinstance(self.tokenizer, VQKD):
            return self.tokenizer.training_losses(images, self.teacher_targets(images))
        return self.tokenizer.training_losses(images, self.global_step)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.losses(batch["tokenizer_image"])
        perplexity, used = codebook_usage(torch.bincount(out["codes"].flatten(), minlength=self.tokenizer.vocab_size))
        self.log("train/loss", out["loss"], prog_bar=True)
        for key in ("nll", "kl", "recon_mse", "tau", "kl_weight", "cosine", "commitment"):
            if key in out:
                self.log(f"train/{key}", out[key], prog_bar=key in ("recon_mse", "cosine"))
        self.log("train/perplexity", perplexity)
        self.log("train/codes_used", used)
        return out["loss"]

    def on_validation_epoch_start(self) -> None:
        self.val_histogram.zero_()
        self._val_images = None

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        images = batch["tokenizer_image"]
        out = self.losses(images)
        tokens = self.tokenizer.encode(images)
        self.val_histogram += torch.bincount(tokens.flatten(), minlength=self.tokenizer.vocab_size)
        self.log("val/loss", out["loss"], sync_dist=True, prog_bar=True)
        if isinstance(self.tokenizer, DiscreteVAE):
            recon = self.tokenizer.decode(tokens)  # from the discrete tokens, as a user would decode them
            self.log("val/recon_mse", torch.nn.functional.mse_loss(recon, images), sync_dist=True, prog_bar=True)
            if self._val_images is None:
                n = self.hparams.num_logged_images
                self._val_images = (images[:n].detach().cpu(), recon[:n].detach().cpu())
        else:
            self.log("val/cosine", out["cosine"], sync_dist=True, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        histogram = self.trainer.strategy.reduce(self.val_histogram.clone(), reduce_op="sum")
        perplexity, used = codebook_usage(histogram)
        self.log("val/perplexity", perplexity)
        self.log("val/codes_used", used)
        if not self.trainer.sanity_checking:
            self._log_images(*(self._val_images or (None, None)), histogram)
        if not self.trainer.sanity_checking:
            self.export()

    def _log_images(self, originals: torch.Tensor | None, reconstructions: torch.Tensor | None,
                    histogram: torch.Tensor) -> None:
        """Originals above their reconstructions (dVAE: decoded from the discrete tokens), and the
        codebook's usage over the validation set (codes sorted by how often they were chosen)."""
        if not self.trainer.is_global_zero:
            return
        if originals is not None:
            grid = make_grid(torch.cat([originals, reconstructions]).clamp(0, 1), nrow=len(originals))
            log_image(self.trainer, "val/reconstructions", to_uint8(grid))
        log_image(self.trainer, "val/codebook_usage", bar_chart(histogram.cpu()))

    def export(self) -> None:
        """Write the stand-alone tokenizer checkpoint (rank zero)."""
        path = self.hparams.export_path
        if path and (self.trainer is None or self.trainer.is_global_zero):
            save_tokenizer(self.tokenizer, path)

    def on_train_end(self) -> None:
        self.export()

    # --- the frozen teacher is rebuilt from its name, not stored in every checkpoint --------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("teacher.")]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.teacher is not None:
            for key, value in self.teacher.state_dict().items():
                checkpoint["state_dict"].setdefault(f"teacher.{key}", value)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        total, warmup = schedule_steps(self.trainer, hp.warmup_epochs, hp.warmup_steps)
        warmup = min(warmup, total // 2)
        groups = param_groups(self.tokenizer, hp.weight_decay)
        # the official run_vqkd_training.py scales only lr by the batch, not min_lr
        return configure_adamw_cosine(
            self.trainer, groups, hp.lr, hp.min_lr, hp.betas, warmup_steps=warmup, lr_base_batch=hp.lr_base_batch,
            scale_min_lr=False,
        )
