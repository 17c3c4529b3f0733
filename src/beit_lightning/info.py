"""``beit-lightning-info <run folder | checkpoint>``: what a checkpoint holds, without writing code.

For our Lightning checkpoints: the task, the model, the step and epoch, the tokenizer the model
was trained against (and where it was), the metrics logged at save time, and with ``--config``
the whole resolved configuration. For a run folder: the same for its newest checkpoint
(:func:`~beit_lightning.checkpoints.newest_checkpoint`, the one ``ckpt_path=last`` resumes).
Other files (the official BEiT release, timm state dicts, tokenizer files) get a short
description of what they contain; a name of the weights registry, a URL, ``hf-hub:`` or ``timm:``
name is described from the cache (downloaded first if needed). Nothing is executed from the file
(``weights_only`` loading): a pickle that holds anything else is named as such, not loaded.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch
import yaml

from .weights.openai import read_openai_weights
from .weights.registry import get_entry
from .weights.run_folder import newest_checkpoint
from .weights.safety import UnsafeWeightsError, load_weights_file
from .weights.sources import resolve_weights, source_kind

__all__ = ["describe_checkpoint", "main"]


def _select(config: dict, path: str) -> Any:
    node: Any = config
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _tensors(state: dict) -> tuple[int, int]:
    values = [v for v in state.values() if torch.is_tensor(v)]
    return len(values), sum(v.numel() for v in values)


def describe_checkpoint(path: str, show_config: bool = False) -> str:
    """A readable description of the checkpoint at ``path`` (see the module docstring)."""
    lines = [f"file: {path} ({os.path.getsize(path) / 2**20:.1f} MiB)"]
    try:
        obj = load_weights_file(path, mmap=not path.endswith(".safetensors"))
    except UnsafeWeightsError as err:
        try:  # OpenAI's pickled dVAE modules are read with exactly their classes allowed
            state, sizes, kind = read_openai_weights(path)
        except (ValueError, OSError):
            return "\n".join([*lines, f"kind: not loaded: {err}"])
        count, numel = _tensors(state)
        return "\n".join([*lines, f"kind: OpenAI DALL-E dVAE {kind} (" + ", ".join(f"{k}={v}" for k, v in sizes.items())
                          + f"): {count} tensors, {numel / 1e6:.2f} M values"])
    if not isinstance(obj, dict):
        return "\n".join([*lines, f"not a checkpoint dict: {type(obj).__name__}"])
    if "state_dict" in obj and "global_step" in obj:
        meta = obj.get("beit_lightning") or {}
        config = yaml.safe_load(meta["config"]) if meta.get("config") else {}
        count, numel = _tensors(obj["state_dict"])
        lines.append(f"kind: Lightning checkpoint of {meta.get('task', 'an unknown task (saved without beit-lightning)')}"
                     + (f", beit-lightning {meta['version']}" if meta.get("version") else ""))
        lines.append(f"progress: step {obj['global_step']}, epoch {obj.get('epoch')}; "
                     f"{'resumable (optimizer and loop state)' if 'optimizer_states' in obj and 'loops' in obj else 'weights only'}")
        lines.append(f"weights: {count} tensors, {numel / 1e6:.2f} M values")
        if config:
            model = config.get("model") or {}
            lines.append(f"model: {model.get('name')} at {model.get('img_size')}px (patch {model.get('patch_size')})")
            data = config.get("data") or {}
            source = data.get("root") or data.get("train_urls") or (f"{data.get('num_train')} generated images" if data.get("num_train") else None)
            lines.append(f"data: {str(data.get('_target_', '?')).rsplit('.', 1)[-1]}" + (f" ({source})" if source else ""))
            task_target = str(_select(config, "task._target_") or "")
            tokenizer = config.get("tokenizer") or {}
            if task_target.endswith("MaskedImageModeling") and tokenizer:
                where = tokenizer.get("path") or tokenizer.get("checkpoint")
                where = f"from {where}" if where else "built from its config (seeded weights)"
                lines.append(f"tokenizer: {str(tokenizer.get('_target_', '?')).rsplit('.', 1)[-1]}, "
                             f"{tokenizer.get('vocab_size')} codes at {tokenizer.get('image_size')}px, {where} "
                             "(not stored in this checkpoint)")
            lines.append(f"output folder: {config.get('output_dir')}")
        hyper = obj.get("hyper_parameters") or {}
        if hyper and not config:
            lines.append("task arguments: " + ", ".join(f"{k}={v}" for k, v in sorted(hyper.items()) if not isinstance(v, dict)))
        metrics = meta.get("metrics") or {}
        if metrics:
            lines.append("metrics at save time: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
        if show_config:
            lines.append("resolved configuration:\n" + (meta.get("config") or "(not stored in this checkpoint)"))
        return "\n".join(lines)
    if "class" in obj and "state_dict" in obj and "format" in obj:  # a stand-alone tokenizer (save_tokenizer)
        config = obj.get("config") or {}
        lines.append(f"kind: stand-alone tokenizer {obj['class']}: " + ", ".join(f"{k}={v}" for k, v in sorted(config.items())))
        return "\n".join(lines)
    for wrapper in ("model", "module", "model_ema"):
        if isinstance(obj.get(wrapper), dict):
            state = obj[wrapper]
            count, numel = _tensors(state)
            what = "pre-training (MIM head)" if any(k.startswith("lm_head") for k in state) else "fine-tuned or encoder"
            lines.append(f"kind: official BEiT-style release ({what}): {count} tensors, {numel / 1e6:.2f} M values")
            if "epoch" in obj:
                lines.append(f"epoch: {obj['epoch']}")
            return "\n".join(lines)
    count, numel = _tensors(obj)
    lines.append(f"kind: plain state dict (timm or our export): {count} tensors, {numel / 1e6:.2f} M values")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="beit-lightning-info", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="a run folder (its newest checkpoint is described), a checkpoint file, a URL, "
                        "hf-hub:<repo>, timm:<model> or a name of `beit-lightning-weights list`")
    parser.add_argument("--config", action="store_true", help="also print the resolved configuration")
    args = parser.parse_args(argv)
    path = args.path
    if source_kind(path) == "registry":
        entry = get_entry(path)
        print(f"registry name {entry.name}: {entry.description} ({entry.format}; {entry.url})")
    if source_kind(path) != "path":
        path = resolve_weights(path)
    if os.path.isdir(path):
        found = newest_checkpoint(path)
        if found is None:
            print(f"{path}: no checkpoint in this run folder (looked in checkpoints/ and for hpc_ckpt_*.ckpt)", file=sys.stderr)
            return 1
        path = found
    if not os.path.isfile(path):
        print(f"{path}: no such file", file=sys.stderr)
        return 1
    print(describe_checkpoint(path, show_config=args.config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
