"""Load BEiT weights from any of the formats users hold, into our models or a timm ``Beit``.

Accepted sources (a path or an already loaded object):

* our Lightning checkpoints (``{"state_dict": {"model.backbone.blocks.0...": ...}, ...}``);
  the frozen tokenizer's weights (``tokenizer.*``) are not part of the model and are skipped;
* the official BEiT release (``{"model": state_dict}``): pre-training checkpoints with
  ``mask_token``, ``lm_head.*`` and the shared ``rel_pos_bias.*``, and fine-tuned ones;
* plain timm ``Beit`` state dicts and our own ``BeitForMaskedImageModeling`` state dicts;
* Hugging Face ``transformers`` BEiT checkpoints: a ``save_pretrained`` folder (ours from
  :func:`~beit_lightning.huggingface.export_hf`, or any downloaded one), a ``.safetensors`` /
  ``.bin`` weight file or a state dict with ``beit.*`` names (transformers 5 or 4.x).

All of them are first brought to one flat naming (timm's, which is also the official one:
``blocks.N.*``, ``rel_pos_bias.*``, ``mask_token``, ``lm_head.*``) and then mapped onto the
target model. A shared relative position bias is copied into every block when the target has
per-block tables. Every problem (missing keys, unexpected keys, shape mismatches) is collected
and reported at once.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
from timm.models.beit import Beit, checkpoint_filter_fn
from torch import nn

from .models.backbones import fit_state_dict
from .models.beit import BeitForMaskedImageModeling
from .models.splitmask import SplitMaskModel

__all__ = [
    "CheckpointMismatchError",
    "LoadResult",
    "export_timm",
    "load_checkpoint",
    "newest_checkpoint",
    "read_state_dict",
    "to_flat_beit_state_dict",
]

#: keys a fine-tuning target may lack in the checkpoint: they start fresh
NEW_HEAD_PREFIXES = ("head.", "fc_norm.")

#: keys that only a masked-image-modeling model has
MIM_ONLY_PREFIXES = ("mask_token", "lm_head.")

#: pre-training models: a backbone under ``backbone.`` and a pre-training head under ``lm_head.``
#: (BEiT's linear LM head, or SplitMask's decoder)
PRETRAINING_MODELS = (BeitForMaskedImageModeling, SplitMaskModel)

#: the parts of a segmentation model around its backbone (BeitUperNet)
SEGMENTATION_PREFIXES = ("neck.", "decode_head.", "auxiliary_head.")


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the model; the message lists every offending key."""


@dataclass
class LoadResult:
    """What :func:`load_checkpoint` did: keys it could not fill, keys it did not use, keys dropped
    on purpose (e.g. the LM head when loading a pre-trained checkpoint into a classifier)."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    initialised: list[str] = field(default_factory=list)
    source: str = ""

    def report(self) -> str:
        lines = [f"checkpoint format: {self.source}"]
        if self.missing:
            lines.append(f"missing in checkpoint ({len(self.missing)}): {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(f"not used by the model ({len(self.unexpected)}): {', '.join(self.unexpected)}")
        if self.mismatched:
            lines.append(
                "shape mismatch (checkpoint vs model): "
                + ", ".join(f"{k} {tuple(a)} vs {tuple(b)}" for k, a, b in self.mismatched)
            )
        if self.dropped:
            lines.append(f"dropped on purpose ({len(self.dropped)}): {', '.join(self.dropped)}")
        if self.initialised:
            lines.append(f"not in the checkpoint, initialised fresh ({len(self.initialised)}): {', '.join(self.initialised)}")
        return "\n".join(lines)


def newest_checkpoint(run_dir: str | os.PathLike) -> str | None:
    """The checkpoint of a run folder that holds its newest training state, or ``None``.

    Candidates are every ``*.ckpt`` under ``<run_dir>/checkpoints`` (epoch, step and
    ``last.ckpt`` files) and the ``hpc_ckpt_N.ckpt`` files that Lightning writes into the run
    folder when SLURM signals a pre-emption or time limit. The newest is the one with the highest
    ``global_step`` (read without loading the tensors), then the latest modification time: a
    requeued job resumes from the signal's checkpoint even though a periodic ``last.ckpt`` is
    older, and never from a file of an earlier step that happens to be touched later. At equal
    steps a file with optimizer and loop state beats a weights-only one. A file that cannot be read
    is passed over with a warning; if no file can be read, it raises (rather than start afresh).
    """
    folder = os.fspath(run_dir)
    found = []
    ckpt_dir = os.path.join(folder, "checkpoints")
    if os.path.isdir(ckpt_dir):
        found += [os.path.join(ckpt_dir, n) for n in os.listdir(ckpt_dir) if n.endswith(".ckpt")]
    if os.path.isdir(folder):
        found += [os.path.join(folder, n) for n in os.listdir(folder) if n.startswith("hpc_ckpt_") and n.endswith(".ckpt")]
    best, best_key, unreadable = None, None, []
    for path in found:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            resumable = "optimizer_states" in state and "loops" in state  # not a weights-only file
            key = (int(state.get("global_step", -1)), resumable, os.path.getmtime(path))
        except Exception as err:  # noqa: BLE001 - reported below; not a resume candidate
            unreadable.append(f"{path} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})")
            continue
        if best_key is None or key > best_key:
            best, best_key = path, key
    if unreadable and best is None:
        raise RuntimeError(
            "none of the run's checkpoints can be read, so it cannot resume: " + "; ".join(unreadable)
            + ". Move the broken files away (the run then starts from scratch) or pass ckpt_path=<file>"
        )
    if unreadable:
        warnings.warn(f"checkpoints that could not be read were passed over: {'; '.join(unreadable)}", stacklevel=2)
    return best


def read_state_dict(path_or_state_dict: str | os.PathLike | Mapping[str, Any], weights_only: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    """Return ``(state_dict, format)`` from a checkpoint path or a loaded checkpoint object.

    ``format`` is one of ``"lightning"``, ``"official"``, ``"state_dict"`` or ``"transformers"``.
    Lightning checkpoints have their task prefix (``model.``) removed and the tokenizer and the EMA
    copy of the weights (``model_ema.``, with ``task.ema_decay``) dropped;
    transformers BEiT checkpoints (a ``save_pretrained`` folder, a ``.safetensors`` / ``.bin`` file
    or a state dict with ``beit.*`` names) are renamed to ours (:mod:`beit_lightning.huggingface`).
    """
    from .huggingface import from_hf_state_dict, is_hf_checkpoint, is_hf_state_dict, read_hf_checkpoint

    obj = path_or_state_dict
    if isinstance(obj, (str, os.PathLike)):
        path = os.fspath(obj)
        if is_hf_checkpoint(path):
            return read_hf_checkpoint(path)[0], "transformers"
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint not found: {path!r}")
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj = load_file(path)
            if is_hf_state_dict(obj):
                return read_hf_checkpoint(path)[0], "transformers"
            return obj, "state_dict"
        try:
            obj = torch.load(path, map_location="cpu", weights_only=weights_only)
        except pickle.UnpicklingError as err:
            raise ValueError(
                f"{path!r} holds objects other than tensors and plain containers, so it was not loaded "
                f"({str(err).splitlines()[0]}). If you trust its source, pass weights_only=False."
            ) from None
    if not isinstance(obj, Mapping):
        raise ValueError(f"a checkpoint must be a dict-like state dict; got {type(obj).__name__}")
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        state = {}
        for key, value in obj["state_dict"].items():
            if key.startswith(("tokenizer.", "model_ema.")):  # the frozen tokenizer; the EMA copy (export --ema)
                continue
            state[key[len("model.") :] if key.startswith("model.") else key] = value
        return state, "lightning"
    for wrapper in ("model", "module", "model_ema"):
        if wrapper in obj and isinstance(obj[wrapper], Mapping):
            return dict(obj[wrapper]), "official"
    if is_hf_state_dict(obj):
        if isinstance(path_or_state_dict, (str, os.PathLike)):
            return read_hf_checkpoint(path_or_state_dict)[0], "transformers"  # with the config.json beside it
        return from_hf_state_dict(obj), "transformers"
    return dict(obj), "state_dict"


def to_flat_beit_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm/official naming: strip ``backbone.``/``module.`` prefixes, drop derived index buffers."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "backbone.", "encoder."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        if key.endswith("relative_position_index") or key.endswith(".k_bias"):
            continue
        out[key] = value
    return out


def _expand_shared_rel_pos_bias(flat: dict[str, torch.Tensor], target_keys: set[str], dropped: list[str]) -> None:
    """Copy a shared relative position table into every block when the target has per-block tables."""
    shared = "rel_pos_bias.relative_position_bias_table"
    if shared in flat and shared not in target_keys:
        blocks = sorted(
            {k.split(".")[1] for k in target_keys if k.startswith("blocks.") and k.endswith("attn.relative_position_bias_table")},
            key=int,
        )
        if blocks:
            table = flat.pop(shared)
            dropped.append(f"{shared} (copied into {len(blocks)} blocks)")
            for i in blocks:
                flat.setdefault(f"blocks.{i}.attn.relative_position_bias_table", table.clone())


def _adapt_to_beit(flat: dict[str, torch.Tensor], target: Beit, result: LoadResult, norm_to_fc_norm: bool) -> dict[str, torch.Tensor]:
    """Make a flat BEiT state dict fit a timm ``Beit``: shared -> per-block position tables,
    resizing (timm's filter), final norm vs ``fc_norm``, a head of another class count."""
    target_state = target.state_dict()
    _expand_shared_rel_pos_bias(flat, set(target_state), result.dropped)
    # timm's filter resizes tables the target has; keys it does not have are left for the report
    fits = {k: v for k, v in flat.items() if k in target_state}
    flat = {**{k: v for k, v in flat.items() if k not in target_state}, **checkpoint_filter_fn(fits, target)}
    if "fc_norm.weight" in target_state and "norm.weight" not in target_state and "norm.weight" in flat:
        for suffix in ("weight", "bias"):
            value = flat.pop(f"norm.{suffix}")
            if norm_to_fc_norm and "fc_norm.weight" not in flat:
                flat[f"fc_norm.{suffix}"] = value
            else:
                result.dropped.append(f"norm.{suffix} (the target pools first, then applies fc_norm)")
    for key in ("head.weight", "head.bias"):
        if key in flat and (key not in target_state or flat[key].shape != target_state[key].shape):
            result.dropped.append(f"{key} {tuple(flat.pop(key).shape)} (the target has another head)")
    return flat


def _is_segmentation_model(model: nn.Module) -> bool:
    """A network with a timm ``Beit`` as ``backbone`` and segmentation heads around it."""
    return isinstance(getattr(model, "backbone", None), Beit) and hasattr(model, "decode_head")


def load_checkpoint(
    model: nn.Module,
    path_or_state_dict: str | os.PathLike | Mapping[str, Any],
    strict: bool = True,
    weights_only: bool = True,
    norm_to_fc_norm: bool = False,
) -> LoadResult:
    """Load BEiT weights into ``model`` (a :class:`BeitForMaskedImageModeling`, a timm ``Beit``, or
    a segmentation model such as :class:`~beit_lightning.models.BeitUperNet`).

    Into a segmentation model, a pre-trained or fine-tuned BEiT fills the backbone (relative
    position tables resized to its window on BEiT's geometric grid, a shared table copied into
    every block; the LM head, mask token, final norm and classifier head dropped), and the neck
    and heads start fresh (``result.initialised``); a segmentation checkpoint fills everything.

    With ``strict=True`` any missing key, unused key or shape mismatch raises
    :class:`CheckpointMismatchError` listing all of them, and the model is left untouched.
    Keys that cannot apply to the target kind (the LM head and mask token when loading into a
    plain backbone) are dropped and reported, not errors; a classifier's ``head`` and ``fc_norm``
    missing from a pre-training checkpoint start fresh (``result.initialised``). With
    ``norm_to_fc_norm`` a pre-trained final norm initialises a mean-pooling model's ``fc_norm``
    (used by :func:`export_timm`); by default it is dropped, as the official fine-tuning does.
    """
    state, source = read_state_dict(path_or_state_dict, weights_only=weights_only)
    if source == "transformers" and isinstance(path_or_state_dict, (str, os.PathLike)):
        from .huggingface import check_segmentation_out_indices

        problem = check_segmentation_out_indices(model, path_or_state_dict)
        if problem and strict:
            raise CheckpointMismatchError(problem)
        if problem:
            warnings.warn(problem, stacklevel=2)
    # a segmentation checkpoint's neck and heads keep their names; the rest is a BEiT backbone
    heads = {k: state.pop(k) for k in list(state) if k.startswith(SEGMENTATION_PREFIXES)}
    flat = to_flat_beit_state_dict(state)
    result = LoadResult(source=source)
    segmentation = _is_segmentation_model(model)
    fresh_prefixes: tuple[str, ...] = ()  # target keys that may start fresh besides the BEiT ones
    if heads and not segmentation:
        result.dropped += sorted(heads)

    if segmentation:
        backbone = model.backbone
        for key in [k for k in flat if k.startswith(MIM_ONLY_PREFIXES + NEW_HEAD_PREFIXES)]:
            flat.pop(key)
            result.dropped.append(key)
        flat = _adapt_to_beit(flat, backbone, result, False)
        backbone_keys = set(backbone.state_dict())
        for key in [k for k in flat if k not in backbone_keys and k.startswith(("norm.", "head."))]:
            flat.pop(key)  # the final norm: the segmentation backbone takes block outputs before it
            result.dropped.append(f"{key} (unused: features are taken from inside the backbone)")
        flat = {**{f"backbone.{k}": v for k, v in flat.items()}, **heads}
    elif isinstance(model, PRETRAINING_MODELS) and isinstance(model.backbone, Beit):
        head = {k: flat.pop(k) for k in list(flat) if k.startswith(MIM_ONLY_PREFIXES)}
        flat = {**{f"backbone.{k}": v for k, v in _adapt_to_beit(flat, model.backbone, result, False).items()}, **head}
    elif isinstance(model, Beit):
        for key in [k for k in flat if k.startswith(MIM_ONLY_PREFIXES)]:
            flat.pop(key)
            result.dropped.append(key)
        flat = _adapt_to_beit(flat, model, result, norm_to_fc_norm)
    elif isinstance(model, PRETRAINING_MODELS) or hasattr(model, "pretrained_cfg"):
        # a timm ViT / DeiT / XCiT (or another timm model, e.g. a distillation teacher), or our
        # masked-image-modeling model over one: timm's filter of the family (models/backbones.py)
        flat, dropped, fresh_prefixes = fit_state_dict(flat, model)
        result.dropped += dropped
    else:
        raise TypeError(
            "load_checkpoint expects a BeitForMaskedImageModeling, a SplitMaskModel, a timm model or a segmentation model with a Beit "
            f"backbone (BeitUperNet); got {type(model).__name__}"
        )
    target_state = model.state_dict()
    if isinstance(model, PRETRAINING_MODELS):
        # a head of another pre-training method (BEiT's LM head into SplitMask's decoder, or the
        # reverse) does not carry over: the encoder does, the head starts fresh
        foreign = [k for k in flat if k.startswith(MIM_ONLY_PREFIXES) and k not in target_state]
        if foreign and not any(k.startswith(MIM_ONLY_PREFIXES) and k in target_state for k in flat):
            for key in foreign:
                flat.pop(key)
                result.dropped.append(f"{key} (the head of another pre-training method)")
            fresh_prefixes = (*fresh_prefixes, *MIM_ONLY_PREFIXES)

    to_load = {}
    for key, value in flat.items():
        if key not in target_state:
            result.unexpected.append(key)
        elif tuple(value.shape) != tuple(target_state[key].shape):
            result.mismatched.append((key, tuple(value.shape), tuple(target_state[key].shape)))
        else:
            to_load[key] = value
    for key in target_state:
        if key not in flat:
            fresh = (isinstance(model, Beit) and key.startswith(NEW_HEAD_PREFIXES)) or (
                segmentation and key.startswith(SEGMENTATION_PREFIXES)) or key.startswith(fresh_prefixes)
            (result.initialised if fresh else result.missing).append(key)

    if strict and (result.missing or result.unexpected or result.mismatched):
        raise CheckpointMismatchError(
            f"the checkpoint does not fit {type(model).__name__}:\n{result.report()}\n"
            "Check that the model configuration (size, patch size, image size, vocab size, position "
            "embedding kind) matches the checkpoint, or pass strict=False to load the matching part."
        )
    model.load_state_dict(to_load, strict=False)
    return result


def export_timm(
    model: nn.Module | str | os.PathLike | Mapping[str, Any],
    path: str | os.PathLike,
    model_name: str | None = None,
    num_classes: int | None = None,
    img_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """Write ``model`` as a state dict of timm's own BEiT architecture (per-block relative
    position tables, mean pooling with ``fc_norm``), loadable with
    ``timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=dict(file=path))``.

    ``model`` is a :class:`BeitForMaskedImageModeling` or a :class:`SplitMaskModel` with a BEiT
    encoder (a pre-trained encoder: its final norm becomes ``fc_norm``, no head; create the timm model with ``num_classes=0`` or your own),
    a timm ``Beit`` classifier, or any checkpoint :func:`load_checkpoint` reads. ``.safetensors``
    paths are written with safetensors, others with ``torch.save``. Returns the state dict.
    """
    if not isinstance(model, nn.Module):
        source = read_state_dict(model)[0]
        flat = to_flat_beit_state_dict(source)
        if model_name is None:
            raise ValueError("exporting a checkpoint file needs model_name (e.g. beit_base_patch16_224)")
        if num_classes is None:
            num_classes = int(flat["head.weight"].shape[0]) if "head.weight" in flat else 0
    else:
        source = model.state_dict()
        backbone = model.backbone if isinstance(model, PRETRAINING_MODELS) else model
        if not isinstance(backbone, Beit):
            raise TypeError(f"export_timm expects a BEiT model; got {type(model).__name__}")
        model_name = model_name or backbone.pretrained_cfg.get("architecture")
        num_classes = backbone.num_classes if num_classes is None else num_classes
        img_size = img_size or backbone.patch_embed.img_size[0]
    kwargs = {"num_classes": num_classes}
    if img_size:
        kwargs["img_size"] = img_size
    target = timm.create_model(model_name, pretrained=False, **kwargs)
    load_checkpoint(target, source, strict=True, norm_to_fc_norm=True)
    state = {k: v.detach().cpu().contiguous() for k, v in target.state_dict().items()}
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, tmp)
    else:
        torch.save(state, tmp)
    os.replace(tmp, path)
    return state


def export_main(argv: list[str] | None = None) -> int:
    """``beit-lightning-export CHECKPOINT OUT --model NAME``: any BEiT checkpoint to a timm file;
    ``beit-lightning-export --format hf CHECKPOINT FOLDER``: one of our run's checkpoints to a
    transformers ``save_pretrained`` folder with image processor and model card."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="beit-lightning-export",
        description="Turn a BEiT checkpoint (ours, the official release, timm, transformers) into a state dict that "
        "timm.create_model(MODEL, pretrained=True, pretrained_cfg_overlay=dict(file=OUT)) loads (--format timm, the "
        "default), or one of our Lightning checkpoints into a transformers save_pretrained folder (--format hf: "
        "config.json, model.safetensors, preprocessor_config.json, README.md).",
    )
    parser.add_argument("checkpoint")
    parser.add_argument("out", help="timm: output file (.safetensors or .pth); hf: output folder")
    parser.add_argument("--format", choices=("timm", "hf"), default="timm", help="default: timm")
    parser.add_argument("--model", default=None, help="timm: timm model name, e.g. beit_base_patch16_224 (required)")
    parser.add_argument("--num-classes", type=int, default=None, help="timm: default: the checkpoint's head, else 0")
    parser.add_argument("--img-size", type=int, default=None, help="timm: default: the timm model's")
    parser.add_argument("--config", default=None,
                        help="hf: the run's config_resolved.yaml (default: the one in the checkpoint's run folder)")
    parser.add_argument("--no-pad", dest="pad_last_block", action="store_false",
                        help="hf: refuse a segmentation model that uses its last block instead of appending an identity "
                        "layer (transformers' out_indices cannot select the last block)")
    parser.add_argument("--ema", action="store_true",
                        help="hf: export the EMA of the weights of a run with task.ema_decay (default: the trained weights)")
    args = parser.parse_args(argv)
    from . import models  # noqa: F401 - registers our model sizes with timm

    if args.format == "hf":
        if args.model or args.num_classes is not None or args.img_size:
            parser.error("--model, --num-classes and --img-size are timm options: with --format hf the network comes "
                         "from the run's configuration (--config)")
        from .huggingface import export_hf_checkpoint

        folder = export_hf_checkpoint(args.checkpoint, args.out, config=args.config, pad_last_block=args.pad_last_block,
                                      ema=args.ema)
        print(f"wrote a transformers folder (config.json, model.safetensors, preprocessor_config.json, README.md) to {folder}")
        return 0
    if args.model is None:
        parser.error("--model is required with --format timm (e.g. --model beit_base_patch16_224)")
    state = export_timm(args.checkpoint, args.out, args.model, args.num_classes, args.img_size)
    print(f"wrote {len(state)} tensors for timm's {args.model} to {args.out}")
    return 0
