"""What an exported folder says about its model: the image processor that reproduces the run's
evaluation transform, and the model card (recipe, metrics, preprocessing, how to load it)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

from torch import nn

from .hf_names import CONFIG_KEY, backbone_of, model_kind

__all__ = ["class_names", "config_value", "image_processor_config", "image_size_of", "model_card"]

#: PIL resampling codes, as transformers' image processors store them
RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3}

BEIT_MEAN = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def config_value(cfg: Mapping[str, Any] | None, dotted: str, default: Any = None) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node or node[part] is None:
            return default
        node = node[part]
    return node


def image_size_of(model: nn.Module) -> int:
    return int(backbone_of(model).patch_embed.img_size[0])


def image_processor_config(model: nn.Module, run_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``BeitImageProcessor`` arguments reproducing the evaluation transform of the run (its resolved
    config: ``data.*``), or of our defaults when there is none.

    * classification: timm's evaluation transform: resize the shorter side to
      ``floor(input_size / crop_pct)`` (bicubic), centre crop ``input_size``, mean/std;
    * masked image modeling: our validation view is a centre square crop resized to ``input_size``;
      the processor resizes the shorter side to ``input_size`` and centre-crops it (the same region);
    * segmentation: mmseg's evaluation resize: fit ``img_scale`` = (long, short) keeping the aspect
      ratio (bilinear), no crop, mean/std, ``do_reduce_labels`` as the recipe's ``reduce_zero_label``.
    """
    kind = model_kind(model)
    data = config_value(run_config, "data", {}) or {}
    img = int(data.get("input_size") or data.get("crop_size") or image_size_of(model))
    pretrained_cfg = getattr(backbone_of(model), "pretrained_cfg", {}) or {}
    if kind == "segmentation":
        mean, std = data.get("mean", IMAGENET_MEAN), data.get("std", IMAGENET_STD)
        scale = data.get("img_scale") or (4 * img, img)
        processor = dict(
            do_resize=True, size={"shortest_edge": int(min(scale)), "longest_edge": int(max(scale))},
            resample=RESAMPLE["bilinear"], do_center_crop=False,
            do_reduce_labels=bool(data.get("reduce_zero_label", True)),
        )
    else:
        default_mean, default_std = (pretrained_cfg.get("mean", BEIT_MEAN), pretrained_cfg.get("std", BEIT_MEAN))
        mean, std = data.get("mean", default_mean), data.get("std", default_std)
        if kind == "classification":
            crop_pct = float(data.get("crop_pct", pretrained_cfg.get("crop_pct", 0.9)))
            short = math.floor(img / crop_pct)
        else:
            short = img
        processor = dict(
            do_resize=True, size={"shortest_edge": short}, resample=RESAMPLE["bicubic"],
            do_center_crop=True, crop_size={"height": img, "width": img}, do_reduce_labels=False,
        )
    processor.update(do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                     image_mean=[float(v) for v in mean], image_std=[float(v) for v in std])
    return processor


def class_names(run_config: Mapping[str, Any] | None, count: int) -> list[str] | None:
    names = config_value(run_config, "task.class_names") or config_value(run_config, "data.classes")
    if not names:
        target = str(config_value(run_config, "data._target_", ""))
        from ..data.class_names import ADE20K_CLASSES
        from ..data.generated import CLASS_NAMES, SEGMENTATION_CLASS_NAMES

        known = {
            "ADE20KDataModule": ADE20K_CLASSES,
            "GeneratedSegmentationDataModule": SEGMENTATION_CLASS_NAMES,
            "GeneratedDataModule": CLASS_NAMES,
        }
        names = known.get(target.rsplit(".", 1)[-1])
    names = list(names)[:count] if names else None
    return names if names and len(names) == count else None



def _yaml(obj: Any) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(obj)).rstrip()


_TASK_NAMES = {
    "mim": "BEiT masked image modeling (pre-training)",
    "classification": "image classification",
    "segmentation": "semantic segmentation (BEiT + UperNet)",
}


def _recipe_lines(run_config: Mapping[str, Any] | None, hparams: Mapping[str, Any] | None) -> list[str]:
    lines = []
    if run_config:
        trainer = config_value(run_config, "trainer", {}) or {}
        data = config_value(run_config, "data", {}) or {}
        task = {k: v for k, v in (config_value(run_config, "task", {}) or {}).items() if k not in ("model", "tokenizer", "_convert_")}
        lines += [
            f"- task: `{task.pop('_target_', '?')}`",
            f"- model: `{config_value(run_config, 'model.name', '?')}` at {config_value(run_config, 'model.img_size', '?')}px, "
            f"drop path {config_value(run_config, 'model.drop_path_rate', '?')}",
            f"- data: `{data.get('_target_', '?')}`, batch {data.get('batch_size', '?')} per device x "
            f"{trainer.get('devices', '?')} device(s) x {trainer.get('num_nodes', 1)} node(s), "
            f"accumulation {trainer.get('accumulate_grad_batches', 1)}",
            f"- trainer: max_epochs {trainer.get('max_epochs', '?')}, max_steps {trainer.get('max_steps', '?')}, "
            f"precision {trainer.get('precision', '?')}, gradient clip {trainer.get('gradient_clip_val', None)}",
            "- optimisation: " + ", ".join(f"{k} {v}" for k, v in task.items() if not isinstance(v, Mapping)),
        ]
        if config_value(run_config, "init_checkpoint"):
            lines.append(f"- initialised from `{config_value(run_config, 'init_checkpoint')}`")
        if config_value(run_config, "tokenizer._target_") and str(config_value(run_config, "task._target_", "")).endswith("MaskedImageModeling"):
            lines.append(f"- visual tokenizer: `{config_value(run_config, 'tokenizer._target_')}` (vocabulary {config_value(run_config, 'tokenizer.vocab_size', '?')})")
    elif hparams:
        lines.append("- task hyper-parameters (no run configuration was found beside the checkpoint): "
                     + ", ".join(f"{k} {v}" for k, v in hparams.items() if not isinstance(v, Mapping)))
    else:
        lines.append("- no recipe is known: the weights did not come from one of our run folders")
    return lines


def model_card(
    model: nn.Module,
    class_name: str,
    config: Mapping[str, Any],
    processor: Mapping[str, Any],
    run_config: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    metrics_source: str | None = None,
    source: str | None = None,
    hparams: Mapping[str, Any] | None = None,
    step: Mapping[str, Any] | None = None,
) -> str:
    """The README.md of an exported folder: what the model is, its recipe, its metrics, how to load it."""
    kind = model_kind(model)
    backbone = backbone_of(model)
    depth, dim, heads = len(backbone.blocks), backbone.embed_dim, backbone.blocks[0].attn.num_heads
    patch, img = int(backbone.patch_embed.patch_size[0]), image_size_of(model)
    timm_name = config_value(run_config, "model.name") or (getattr(backbone, "pretrained_cfg", {}) or {}).get("architecture") or "beit_base_patch16_224"
    pipeline = {"classification": "image-classification", "segmentation": "image-segmentation"}.get(kind)
    classes = len(config["id2label"]) if kind == "classification" else 0  # timm keeps a head of the file's size only
    lines = ["---", "library_name: transformers", "tags:", "- beit", "- beit-lightning", "- vision"]
    if pipeline:
        lines.append(f"pipeline_tag: {pipeline}")
    lines += ["---", "", f"# BEiT {dim}-d, {depth} blocks: {_TASK_NAMES[kind]}", ""]
    what = (f"A BEiT encoder ({dim}-d, {depth} blocks, {heads} heads, {patch}px patches, {img}px input) trained with "
            f"beit-lightning and exported as transformers' `{class_name}`.")
    lines += [what, ""]
    if kind == "mim":
        lines += [f"It predicts the visual tokens (vocabulary {config['vocab_size']}) of masked patches; the relative "
                  "position bias is shared by all blocks, as in BEiT pre-training. Fine-tune it for your task, or use it "
                  "as a feature extractor.", ""]
    elif kind == "classification":
        pooling = "mean of the patch tokens + LayerNorm" if config.get("use_mean_pooling") else "the CLS token after the final LayerNorm"
        lines += [f"A classifier over {len(config['id2label'])} classes; pooling: {pooling}.", ""]
    else:
        ours = list(model.out_indices)
        lines += [f"UperNet + FCN auxiliary head over {len(config['id2label'])} classes, on the outputs of blocks {ours} "
                  f"(0-based; transformers' `out_indices` {config['out_indices']} select `hidden_states[i - 1]`).", ""]
        if CONFIG_KEY in config:
            lines += [f"transformers cannot select the last block ({depth - 1}), so the export appends one identity layer "
                      f"(index {config[CONFIG_KEY]['identity_layers']}: zero attention and MLP weights, output = input): "
                      f"`num_hidden_layers` is {config['num_hidden_layers']}, the logits are unchanged, and beit-lightning "
                      "drops the layer when it loads this folder.", ""]
    if source:
        where = f"Exported from `{os.path.basename(source)}`"
        if step:
            where += f" (epoch {step.get('epoch')}, global step {step.get('global_step')})"
        lines += [where + ".", ""]
    lines += ["## Recipe", ""] + _recipe_lines(run_config, hparams) + [""]
    if run_config:
        lines += ["<details><summary>resolved configuration</summary>", "", "```yaml", _yaml(run_config), "```", "",
                  "</details>", ""]
    lines += ["## Metrics at save time", ""]
    if metrics:
        lines += [f"From {metrics_source}.", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.6g} |" for k, v in sorted(metrics.items())]
    else:
        lines.append("No metrics were stored with the checkpoint or logged in its run folder.")
    lines += ["", "## Preprocessing", "", "`preprocessor_config.json` (`BeitImageProcessor`):", "", "```json",
              json.dumps(dict(processor), indent=1), "```", ""]
    if kind == "segmentation":
        lines += [
            "It reproduces our evaluation resize (fit (long, short) = "
            f"({processor['size']['longest_edge']}, {processor['size']['shortest_edge']}), keep the aspect ratio, "
            "bilinear, no antialiasing) and normalisation exactly with transformers' default torchvision backend "
            "when the image is enlarged or kept, with two differences: transformers truncates the longer side where "
            "mmseg rounds it (one pixel at most: 400x300 becomes 682x512, not 683x512), and it antialiases when it "
            "shrinks an image (mmseg does not). Our reported mIoU comes from sliding windows "
            f"({img}px, stride {config_value(run_config, 'task.stride', '?')}) over that image, labels at their original size; "
            "transformers runs the model on the whole image with interpolated position tables, which is not the same "
            "computation. Resize the logits to the label size before the argmax.", ""]
    elif kind == "classification":
        lines += [
            "It reproduces our evaluation transform (timm's: shorter side resized bicubic by Pillow, centre crop, "
            "normalisation) exactly with `backend=\"pil\"`, but for one case: when the crop's margin is odd, "
            "torchvision's `CenterCrop` rounds its offset half to even (11.5 -> 12) where transformers truncates (11), "
            "a one-pixel shift. transformers' default torchvision backend resizes with another bicubic "
            "implementation: up to 2 grey levels apart.", ""]
    else:
        lines += [
            "Our validation view for masked image modeling is the centre square of the image resized to "
            f"{img}px (crop, then resize); the processor resizes the shorter side to {img}px and crops the centre "
            "(the same region, resampled in the other order: close, not identical). It makes no mask: pass "
            "`bool_masked_pos` (batch x patches) yourself.", ""]
    lines += ["## Loading", "", "transformers:", "", "```python",
              f"from transformers import AutoImageProcessor, {class_name}",
              f'model = {class_name}.from_pretrained("<this folder>")',
              'processor = AutoImageProcessor.from_pretrained("<this folder>"'
              + (")  # the torchvision backend: mmseg's resize" if kind == "segmentation" else ', backend="pil")'),
              "```", "", "beit-lightning (our classes; `load_checkpoint` also reads this folder into a model you built):",
              "", "```python", "from beit_lightning.huggingface import create_model_from_hf",
              'model = create_model_from_hf("<this folder>")', "```", "", "timm (the encoder"
              + (" and classifier" if kind == "classification" else "") + "):", "", "```bash",
              f"beit-lightning-export <this folder> beit.safetensors --model {timm_name} --img-size {img}"
              + ("" if kind == "classification" else " --num-classes 0"), "```", "", "```python", "import timm",
              f'model = timm.create_model("{timm_name}", pretrained=True, img_size={img}, num_classes={classes},',
              f'                          pretrained_cfg_overlay=dict(file="beit.safetensors", num_classes={classes}))',
              "```", ""]
    if timm_name.startswith("beit_lightning_"):
        lines += [f"`{timm_name}` is registered with timm by `import beit_lightning.models`.", ""]
    return "\n".join(lines)
