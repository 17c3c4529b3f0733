"""Lightning callbacks of the project (configured in ``conf/callbacks/``)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint, ModelSummary


class SkippedSamplesMonitor(pl.Callback):
    """Log ``data/skipped``: samples skipped so far because they could not be read or decoded,
    summed over ranks, at the end of every training epoch (from the DataModule's
    ``skipped_samples``; a corrupt JPEG is a warning and a count, never a crash)."""

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        count = getattr(datamodule, "skipped_samples", None)
        if count is not None:
            pl_module.log("data/skipped", float(count), reduce_fx="sum", sync_dist=True)


class RandomStateCheckpoint(pl.Callback):
    """Save the training process's random state (torch, CUDA, NumPy, Python) in every checkpoint
    and restore it on resume, so that drop path and the other random draws of training continue
    as in an uninterrupted run. (Data augmentation is seeded per sample by the data streams.)
    The state is kept as tensors and plain tuples, so checkpoints stay loadable weights-only."""

    def state_dict(self) -> dict:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state = {
            "torch": torch.get_rng_state(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
            "python": random.getstate(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        torch.set_rng_state(state_dict["torch"])
        kind, keys, pos, has_gauss, gauss = state_dict["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        version, internal, gauss_next = state_dict["python"]
        random.setstate((version, tuple(internal), gauss_next))
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


class NewestCheckpoint(ModelCheckpoint):
    """The one owner of ``last.ckpt``: a ``ModelCheckpoint`` that saves every
    ``every_n_train_steps`` optimiser steps (keeping ``save_top_k`` of those files) and writes
    ``last.ckpt`` at each of those steps, at the end of every training epoch (after its
    validation when the run validates every epoch; at each validation when validation runs on
    its own schedule) and at the end of training, so ``last.ckpt`` holds the newest saved state.
    File names are never versioned (no ``last-v1.ckpt``): a fresh run in a folder that holds
    checkpoints is refused by ``beit-lightning`` (see :func:`~beit_lightning.cli.train`).

    Why: two ``ModelCheckpoint`` callbacks with ``save_last=True`` in one folder write
    ``last.ckpt`` and ``last-v1.ckpt``, and Lightning's own ``save_last`` writes only at the steps
    its callback saves, so neither file is always the newest. Give every other checkpoint
    callback ``save_last: false``. Saving goes through Lightning (a temporary file renamed into
    place), so a killed process never leaves a truncated ``last.ckpt``.
    """

    def __init__(self, *args, save_last: bool = True, enable_version_counter: bool = False, **kwargs) -> None:
        if save_last is not True:
            raise ValueError(f"NewestCheckpoint exists to write last.ckpt as a file: save_last must be true, got {save_last!r}")
        super().__init__(*args, save_last=True, enable_version_counter=enable_version_counter, **kwargs)

    def _save_last_if_behind(self, trainer: pl.Trainer) -> None:
        # _should_skip_saving_checkpoint is true when this callback already saved at this step
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_behind(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_behind(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._save_last_if_behind(trainer)



class ValidationImages(pl.Callback):
    """Pictures of what the task learns, every ``every_n_epochs`` validations, from the first
    ``num_images`` validation images (the same images every time): to TensorBoard and as PNG files
    under ``<log dir>/images/`` (:func:`~beit_lightning.visualise.log_image`).

    * masked image modeling (``val/tokens``): per image, the image with its masked patches greyed
      out, the tokenizer's token map of the targets (a fixed colour per code), the model's
      predictions at the masked positions (visible positions white), where they are right or
      wrong (green/red) with the image's count of right tokens, and, when the tokenizer can decode
      (our dVAE; the DALL-E tokenizer with OpenAI's ``decoder.pkl``, ``tokenizer.decoder_path``),
      the images decoded from the target and from the predicted tokens; and the attention of the
      CLS token in the last block, per head and averaged (``val/attention``), as in the BEiT
      paper's attention figure;
    * classification: the confusion matrix of up to ``max_confusion_images`` validation images,
      rows normalised (``val/confusion``);
    * segmentation: the image, the ground truth and the predicted masks (``val/masks``), predicted
      by the task's sliding-window inference, so they show what the metrics measure.
    (Tokenizer training logs its reconstructions and codebook usage itself.)
    Every picture has column titles and a legend, and small images are enlarged to at least 160 px
    (:func:`~beit_lightning.visualise.titled_grid`), so it reads without the code.

    It runs only in validation epochs, only on rank zero, and never during the sanity check; the
    extra forward passes are on a handful of images (the confusion matrix re-runs the classifier
    on its images).
    """

    def __init__(self, every_n_epochs: int = 1, num_images: int = 4, attention: bool = True,
                 max_confusion_images: int = 2048) -> None:
        self.every_n_epochs, self.num_images = max(1, every_n_epochs), num_images
        self.attention, self.max_confusion_images = attention, max_confusion_images
        self._batch: dict[str, torch.Tensor] | None = None
        self._confusion: torch.Tensor | None = None
        self._confusion_seen = 0

    def _active(self, trainer: pl.Trainer) -> bool:
        return (trainer.is_global_zero and not trainer.sanity_checking
                and trainer.current_epoch % self.every_n_epochs == 0)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._batch, self._confusion, self._confusion_seen = None, None, 0

    @torch.no_grad()
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not self._active(trainer) or not isinstance(batch, dict) or "image" not in batch:
            return  # (tokenizer training has only the tokenizer view; it logs its own pictures)
        if self._batch is None or len(self._batch["image"]) < self.num_images:
            take = {k: v[: self.num_images].detach() for k, v in batch.items() if torch.is_tensor(v)}
            if self._batch is None:
                self._batch = take
            elif all(take[k].shape[1:] == self._batch[k].shape[1:] for k in take):  # images of one size
                self._batch = {k: torch.cat([self._batch[k], take[k]])[: self.num_images] for k in take}
        from .tasks.classification import ImageClassification

        if isinstance(pl_module, ImageClassification) and self._confusion_seen < self.max_confusion_images:
            preds = pl_module(batch["image"]).argmax(-1).cpu()
            labels = batch["label"].cpu()
            n = pl_module.hparams.num_classes
            if self._confusion is None:
                self._confusion = torch.zeros(n, n, dtype=torch.long)
            keep = (labels >= 0) & (labels < n)
            self._confusion += torch.bincount(labels[keep] * n + preds[keep], minlength=n * n).view(n, n)
            self._confusion_seen += len(labels)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active(trainer):
            return
        from . import visualise
        from .tasks.pretraining import MaskedImageModeling
        from .tasks.segmentation import SemanticSegmentation

        if self._confusion is not None:
            visualise.log_image(trainer, "val/confusion", visualise.confusion_image(self._confusion))
        if self._batch is None:
            return
        with torch.no_grad():
            if isinstance(pl_module, MaskedImageModeling) and pl_module.tokenizer is not None:  # (pixel targets: none)
                self._pretraining(trainer, pl_module, self._batch)
            elif isinstance(pl_module, SemanticSegmentation):
                self._segmentation(trainer, pl_module, self._batch)

    @staticmethod
    def _normalisation(trainer: pl.Trainer) -> tuple[tuple, tuple]:
        data = getattr(trainer, "datamodule", None)
        return tuple(getattr(data, "mean", (0.5, 0.5, 0.5))), tuple(getattr(data, "std", (0.5, 0.5, 0.5)))

    def _pretraining(self, trainer: pl.Trainer, task, batch: dict[str, torch.Tensor]) -> None:
        from . import visualise

        mean, std = self._normalisation(trainer)
        images, mask = batch["image"], batch["mask"].bool()
        targets = task.tokenizer.encode(batch["tokenizer_image"])  # B x h x w
        was_training = task.model.training
        task.model.eval()
        try:
            predicted = task.model(images, mask).argmax(-1)
        finally:
            task.model.train(was_training)
        vocab = task.tokenizer.vocab_size
        colours = torch.cat([visualise.token_colours(vocab), torch.full((1, 3), 255, dtype=torch.uint8)])
        decode = getattr(task.tokenizer, "decode", None) if getattr(task.tokenizer, "can_decode", True) else None
        rows, row_titles, offset = [], [], 0
        for i in range(len(images)):
            picture = visualise.to_uint8(images[i], mean, std)
            size = tuple(picture.shape[:2])
            n = int(mask[i].sum())
            pred_map = torch.full_like(targets[i], vocab)  # visible positions: white
            pred_map[mask[i]] = predicted[offset : offset + n].to(pred_map.dtype)
            right = int((predicted[offset : offset + n] == targets[i][mask[i]]).sum())
            offset += n
            row = [visualise.masked_image(picture, mask[i]), visualise.colour_map(targets[i], colours, size),
                   visualise.colour_map(pred_map, colours, size),
                   visualise.right_wrong_map(pred_map, targets[i], mask[i], size)]
            if callable(decode):
                full_pred = torch.where(mask[i], pred_map, targets[i])
                decoded = decode(torch.stack([targets[i], full_pred]))
                row += [visualise.to_uint8(F.interpolate(d[None].float(), size=size, mode="bilinear",
                                                         align_corners=False)[0]) for d in decoded]
            rows.append(row)
            row_titles.append(f"image {i + 1}: {right} of {n} masked tokens right"
                              + (f" ({right / n:.0%})" if n else ""))
        titles = ["masked input", "target tokens", "predicted tokens", "right / wrong"]
        legend = ("grey = masked patch (the model sees it as [MASK]); colour = token id (one fixed colour per code "
                  f"of the tokenizer's {vocab}); white = visible patch (not predicted); right / wrong: green = "
                  "predicted token equals the target, red = it differs.")
        if callable(decode):
            titles += ["decoded targets", "decoded prediction"]
            legend += (" Decoded: the tokenizer's decoder on the target tokens, and on the predicted tokens at the "
                       "masked patches with the target tokens elsewhere.")
        visualise.log_image(trainer, "val/tokens", visualise.titled_grid(rows, titles, legend, row_titles))
        if self.attention:
            self._attention(trainer, task, images, mean, std)

    @staticmethod
    def _attention(trainer: pl.Trainer, task, images: torch.Tensor, mean: tuple, std: tuple) -> None:
        from . import visualise

        try:
            maps = visualise.attention_maps(task.model.backbone, images)  # B x heads x h x w
        except TypeError:  # a backbone without token attention (XCiT): no attention picture
            return
        rows = []
        for i in range(len(images)):
            picture = visualise.to_uint8(images[i], mean, std)
            size = tuple(picture.shape[:2])
            rows.append([picture, visualise.heatmap(maps[i].mean(0), size),
                         *(visualise.heatmap(m, size) for m in maps[i])])
        heads = maps.shape[1]
        titles = ["input", f"mean of {heads} heads", *(f"head {h + 1}" for h in range(heads))]
        depth = len(task.model.backbone.blocks)
        legend = (f"Attention of the CLS token to each patch in block {depth} of {depth} (the last), per head and "
                  "averaged over the heads; each map is scaled to its own range:")
        grid = visualise.titled_grid(rows, titles, legend)
        key = visualise.colour_scale(min(grid.shape[1], 360), low="least attention", high="most attention")
        visualise.log_image(trainer, "val/attention", visualise.vstack([grid, key], gap=4))

    def _segmentation(self, trainer: pl.Trainer, task, batch: dict[str, torch.Tensor]) -> None:
        from . import visualise

        mean, std = self._normalisation(trainer)
        num_classes, ignore = int(task.hparams.num_classes), int(task.hparams.get("ignore_index", 255))
        palette = visualise.class_palette(num_classes)
        rows, row_titles = [], []
        for i, (image, label) in enumerate(zip(batch["image"], batch["label"], strict=True)):
            label = label.cpu().long()
            pred = task.predict_logits(image[None], size=label.shape[-2:]).argmax(1)[0].cpu()
            rgb = F.interpolate(image[None].float().cpu(), size=label.shape[-2:], mode="bilinear", align_corners=False)[0]
            labelled = label != ignore
            accuracy = float((pred[labelled] == label[labelled]).float().mean()) if labelled.any() else float("nan")
            label = torch.where(labelled, label, num_classes)
            rows.append([visualise.to_uint8(rgb, mean, std), visualise.colour_map(label, palette),
                         visualise.colour_map(pred, palette)])
            row_titles.append(f"image {i + 1}: {accuracy:.0%} of the labelled pixels right")
        legend = (f"colour = class (one colour per class of {num_classes}, the same in both maps); black = not "
                  "labelled (ignored by the metrics). Prediction: the sliding-window evaluation the metrics use.")
        grid = visualise.titled_grid(rows, ["image", "ground truth", "prediction"], legend, row_titles)
        visualise.log_image(trainer, "val/masks", grid)


def flops_per_image(task: pl.LightningModule, datamodule: Any) -> dict[str, int]:
    """Forward FLOPs of one image through each network of ``task`` (``{"model": ..., "tokenizer":
    ...}``, by torch's ``FlopCounterMode`` on a batch of one at the data's sizes): the network being
    trained and the frozen one that makes its targets. Modules it cannot size are left out."""
    from torch.utils.flop_counter import FlopCounterMode

    size = getattr(datamodule, "input_size", None) or getattr(datamodule, "crop_size", None)
    runs: dict[str, Any] = {}
    model = getattr(task, "model", None)
    if isinstance(model, torch.nn.Module) and size:
        image = torch.zeros(1, 3, size, size)
        if hasattr(model, "patch_grid") and hasattr(task, "tokenizer"):  # masked image modeling: ~40% masked
            generator = getattr(datamodule, "mask_generator", None)
            mask = torch.as_tensor(generator(), dtype=torch.bool)[None] if generator else torch.zeros(1, *model.patch_grid, dtype=torch.bool)
            runs["model"] = (model, (image, mask))
        else:
            runs["model"] = (model, (image,))
    tokenizer = getattr(task, "tokenizer", None)
    tok_size = getattr(datamodule, "tokenizer_size", None) or getattr(tokenizer, "image_size", None)
    if isinstance(tokenizer, torch.nn.Module) and hasattr(tokenizer, "encode_logits") and tok_size:
        runs["tokenizer"] = (tokenizer.encode_logits, (torch.rand(1, 3, tok_size, tok_size),))
    out = {}
    for name, (fn, inputs) in runs.items():
        module = fn if isinstance(fn, torch.nn.Module) else fn.__self__
        try:
            device = next(module.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                fn(*[x.to(device) for x in inputs])
            out[name] = int(counter.get_total_flops())
        except Exception:  # noqa: BLE001 - a summary must never stop a run; the column shows "-"
            pass
        finally:
            module.train(was_training)
    return out


class FlopsModelSummary(ModelSummary):
    """Lightning's model summary with a FLOPs column that means something: forward FLOPs per image
    of the trained network and of the frozen tokenizer (:func:`flops_per_image`), where Lightning
    prints 0 for models without an ``example_input_array``."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._max_depth:
            return
        from pytorch_lightning.utilities.model_summary.model_summary import get_human_readable_count

        summary = self._summary(trainer, pl_module)
        data = summary._get_summary_data()
        flops = flops_per_image(pl_module, getattr(trainer, "datamodule", None)) if trainer.is_global_zero else {}
        names = dict(data)["Name"]
        data = [
            ("FLOPs/image", [get_human_readable_count(flops[n]) if n in flops else "-" for n in names])
            if column == "FLOPs" else (column, values)
            for column, values in data
        ]
        if trainer.is_global_zero:
            self.summarize(data, summary.total_parameters, summary.trainable_parameters, summary.model_size,
                           summary.total_training_modes, total_flops=sum(flops.values()), **self._summarize_kwargs)


class CheckpointMetadata(pl.Callback):
    """Write what a checkpoint is into it (``checkpoint["beit_lightning"]``): the task class, the
    package version, the metrics logged so far and, when given, the run's resolved configuration
    (YAML text). Plain strings and floats, so ``torch.load(weights_only=True)`` reads them;
    ``beit-lightning-info`` prints them. ``beit-lightning`` adds it to every run."""

    def __init__(self, config_yaml: str | None = None) -> None:
        self.config_yaml = config_yaml

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        from . import __version__

        metrics = {}
        for key, value in trainer.callback_metrics.items():
            try:
                metrics[key] = float(value)
            except (TypeError, ValueError):
                continue
        cls = type(pl_module)
        checkpoint["beit_lightning"] = {
            "task": f"{cls.__module__}.{cls.__qualname__}", "version": __version__, "metrics": metrics,
            "config": self.config_yaml,
        }
