"""Hydra entry point: ``beit-lightning`` and ``python -m beit_lightning``.

``train(cfg)`` is a plain function (tests compose a config and call it); ``main`` is the thin
``@hydra.main`` wrapper. ``validate_config`` runs first and reports every problem it can find in
the configuration (missing values, unknown arguments, sizes that do not fit together, files that
do not exist) before any data is read or any model is built.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
from collections.abc import Iterator
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pytorch_lightning.callbacks import ProgressBar

from .callbacks import CheckpointMetadata
from .checkpoints import load_checkpoint, newest_checkpoint
from .console import quiet_console
from .strategies import end_distributed
from .weights.sources import registry_entry, resolve_weights, source_kind

log = logging.getLogger(__name__)

_HYDRA_KEYS = {"_target_", "_recursive_", "_convert_", "_partial_", "_args_"}


class ConfigError(ValueError):
    """The configuration cannot work; the message lists every problem and how to fix it."""


def _target_nodes(node: Any, path: str = "") -> Iterator[tuple[str, DictConfig]]:
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield path, node
        for key in node:
            child = node._get_node(key)
            if child is not None and not child._is_interpolation():
                yield from _target_nodes(node[key], f"{path}.{key}" if path else str(key))


def _check_arguments(path: str, node: DictConfig) -> list[str]:
    target = node["_target_"]
    try:
        obj = get_object(target)
    except Exception as err:  # noqa: BLE001 - report any import problem as a config problem
        return [f"{path}._target_={target!r} cannot be imported ({err})"]
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    accepted = {name for name, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL}
    unknown = [k for k in node if k not in _HYDRA_KEYS and k not in accepted]
    return [
        f"{path}.{k} is not an argument of {target}; valid ones: {', '.join(sorted(accepted - {'self'}))}"
        for k in unknown
    ]


def _check_sizes(cfg: DictConfig) -> list[str]:
    """Cross-checks between the model, the tokenizer, the masks and the data views."""
    problems = []
    model, data, tok = cfg.get("model"), cfg.get("data"), cfg.get("tokenizer")
    if model is None or data is None:
        return problems
    img, patch = model.get("img_size"), model.get("patch_size")
    if img is not None and patch is not None:
        if img % patch:
            problems.append(f"model.img_size={img} is not a multiple of model.patch_size={patch}")
        grid = img // patch
        if data.get("input_size") not in (None, img):
            problems.append(f"data.input_size={data.input_size} differs from model.img_size={img}: set them equal")
        count = data.get("num_masking_patches") if data.get("mode", "pretrain") == "pretrain" else None
        if count is not None and count > grid * grid:
            problems.append(
                f"data.num_masking_patches={count} exceeds the {grid}x{grid} patch grid: use at most {grid * grid} "
                f"(BEiT masks about 40%, i.e. {round(0.4 * grid * grid)})"
            )
        task_target = str(cfg.get("task", {}).get("_target_", ""))
        if tok is not None and _is_pretraining(task_target):
            tok_size = tok.get("image_size")
            down = _tokenizer_downsample(tok)
            if tok_size is not None and down and tok_size // down != grid:
                problems.append(
                    f"the tokenizer makes a {tok_size // down}x{tok_size // down} grid at image_size={tok_size} but the "
                    f"model has a {grid}x{grid} patch grid: set tokenizer.image_size and data.tokenizer_size to {grid * down}"
                )
            if data.get("tokenizer_size") not in (None, tok_size):
                problems.append(
                    f"data.tokenizer_size={data.tokenizer_size} differs from tokenizer.image_size={tok_size}: set them equal"
                )
    return problems


#: what each kind of data holds, for the error that names the data groups a task can take
DATA_KIND_WORDS = {"images": "images (with class labels, or none)", "segmentation": "segmentation label maps",
                   "retrieval": "images of classes split into disjoint train and test classes (retrieval)"}


def data_kind(obj: Any) -> str:
    """The kind of data a task needs or a DataModule serves: its ``data_kind`` class attribute
    (``"images"``, ``"segmentation"``, ``"retrieval"``); classes without one serve or take images."""
    return getattr(obj, "data_kind", "images")


def data_groups_of_kind(kind: str) -> list[str]:
    """The shipped ``data=`` groups whose DataModule serves ``kind`` (read from the config package)."""
    from importlib.resources import files

    groups = []
    for entry in sorted(files("beit_lightning.conf").joinpath("data").iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".yaml"):
            continue
        target = re.search(r"^_target_:\s*(\S+)", entry.read_text(), flags=re.M)
        try:
            if target and data_kind(get_object(target.group(1))) == kind:
                groups.append(entry.name[: -len(".yaml")])
        except Exception:  # noqa: BLE001 - a group that cannot be imported is not offered
            continue
    return groups


def _check_task_data(cfg: DictConfig) -> list[str]:
    """Every task says which kind of data it needs (``data_kind``: images, segmentation label maps,
    retrieval's disjoint class splits) and every DataModule which kind it serves; they must agree.
    A BEiT + UperNet also needs four feature blocks."""
    task, data = cfg.get("task"), cfg.get("data")
    if task is None or data is None or "_target_" not in task or "_target_" not in data:
        return []
    try:
        needed, served = data_kind(get_object(task._target_)), data_kind(get_object(data._target_))
    except Exception:  # noqa: BLE001 - a wrong _target_ is reported by _check_arguments
        return []
    task_name, data_name = str(task._target_).rsplit(".", 1)[-1], str(data._target_).rsplit(".", 1)[-1]
    if needed != served:
        groups = ", ".join(f"data={g}" for g in data_groups_of_kind(needed))
        return [f"{task_name} needs {DATA_KIND_WORDS.get(needed, needed)}, but the data group's {data_name} serves "
                f"{DATA_KIND_WORDS.get(served, served)}: use one of {groups} (and its path, if it reads files), "
                "or a task for this data"]
    if needed == "segmentation" and cfg.get("model") is not None and cfg.model.get("seg_out_indices") is None:
        return ["model.seg_out_indices is unset: segmentation takes the outputs of 4 blocks (base: [3, 5, 7, 11]); "
                "set it (and model.arch.depth for the micro model: experiment=smoke_segmentation does)"]
    return []


def _is_pretraining(target: str) -> bool:
    """Whether a task ``_target_`` is masked image modeling against a tokenizer (BEiT, SplitMask, subclasses)."""
    from .tasks.pretraining import MaskedImageModeling

    try:
        obj = get_object(target)
    except Exception:  # noqa: BLE001 - a wrong _target_ is reported by _check_arguments
        return target.endswith("MaskedImageModeling")
    return isinstance(obj, type) and issubclass(obj, MaskedImageModeling)


def _check_task_model(cfg: DictConfig) -> list[str]:
    """A ViTGAN model group (a ``generator`` and a ``discriminator``) serves ``task=gan`` only, and
    ``task=gan`` trains only such a group: say so before an interpolation fails somewhere deeper."""
    task, model = cfg.get("task"), cfg.get("model")
    if task is None or model is None or "_target_" not in task:
        return []
    gan_task = str(task._target_).endswith("GANTraining")
    gan_model = "generator" in model and "discriminator" in model
    if gan_task and not gan_model:
        return [f"task=gan trains a ViTGAN generator and discriminator, but model={model.get('name')} has neither: "
                "use model=vitgan_micro or model=vitgan_cifar10"]
    if gan_model and not gan_task:
        return [f"model={model.get('name')} is a ViTGAN (a generator and a discriminator): it serves task=gan only; "
                "pick a BEiT / ViT / DeiT / XCiT model for this task"]
    return []


def _tokenizer_downsample(tok: DictConfig) -> int | None:
    """Pixels per code of the configured tokenizer class (``None`` if it cannot be told)."""
    try:
        obj = get_object(tok["_target_"])
    except Exception:  # noqa: BLE001 - reported by _check_arguments
        return None
    cls = obj if isinstance(obj, type) else getattr(obj, "__self__", None)
    return getattr(cls, "downsample", None)


#: the configuration keys that name weights (a path, a URL, hf-hub:, timm: or a registry name)
WEIGHT_KEYS = ("tokenizer.path", "tokenizer.decoder_path", "tokenizer.checkpoint", "init_checkpoint",
               "task.teacher.checkpoint", "task.inception_weights")


#: keys whose local files are checked when their object is built (the teacher: its error names the
#: command that trains it, and an experiment may name the file of a run still to come)
CHECKED_AT_BUILD = ("task.teacher.checkpoint",)


def _check_weights(key: str, value: Any) -> str | None:
    """A problem with the weights a configuration key names, or ``None``: a missing local file, or
    a URL / Hub / timm / registry name whose file is not cached and cannot be downloaded now (the
    message names the URL and the cache path to put it at). A name is downloaded here, once."""
    if not isinstance(value, str) or not value:
        return None
    if source_kind(value) == "path":
        if key == "init_checkpoint" and os.path.isdir(value):
            return None  # a transformers save_pretrained folder
        return None if os.path.isfile(value) or key in CHECKED_AT_BUILD else f"{key}={value!r} does not exist"
    try:
        resolve_weights(value)
    except (OSError, KeyError, ValueError) as err:
        return f"{key}={value!r}: {str(err).strip(chr(34))}"
    return None


def _check_registry_model(cfg: DictConfig) -> list[str]:
    """``init_checkpoint=<registry name>`` must fit ``model=``: the entry says which network it holds."""
    entry = registry_entry(cfg.get("init_checkpoint"))
    model = cfg.get("model")
    if entry is None or entry.model is None or model is None or not model.get("name"):
        return []
    size = entry.model.split("_", 1)[1]  # "base", "large"
    name = str(model.name)
    if not name.startswith(("beit_", "beitv2_")) or f"_{size}_" not in f"_{name.split('_', 1)[1]}":
        return [f"init_checkpoint={entry.name} holds a BEiT-{size} ({entry.description}), but the configured model is "
                f"{name}: add model={entry.model}"]
    return []


def _check_files(cfg: DictConfig) -> list[str]:
    problems = []
    for key in WEIGHT_KEYS:
        value = OmegaConf.select(cfg, key, default=None)
        problem = _check_weights(key, value)
        if problem:
            problems.append(problem)
    problems += _check_registry_model(cfg)
    ckpt = cfg.get("ckpt_path")
    if ckpt and ckpt not in ("last", "hpc", "best") and not os.path.isfile(ckpt):
        problems.append(f"ckpt_path={ckpt!r} does not exist (use 'last' to resume this run's newest checkpoint)")
    return problems


def validate_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` listing every problem of ``cfg``; do nothing when it is sound."""
    # first: other groups' interpolations fail on the wrong kind of data or model
    mismatch = _check_task_data(cfg) + _check_task_model(cfg)
    if mismatch:
        raise ConfigError("the configuration has problems:\n  - " + "\n  - ".join(mismatch))
    missing = sorted(k for k in OmegaConf.missing_keys(cfg) if not k.startswith("hydra"))
    if missing:
        raise ConfigError(
            "the configuration leaves required values unset: "
            + ", ".join(missing)
            + ". Set them on the command line, e.g. "
            + " ".join(f"{k}=..." for k in missing)
        )
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"the configuration cannot be resolved: {err}") from None
    problems = []
    for path, node in _target_nodes(cfg):
        if not path.startswith("hydra"):
            problems += _check_arguments(path, node)
    problems += _check_sizes(cfg)
    problems += _check_files(cfg)
    if problems:
        raise ConfigError("the configuration has problems:\n  - " + "\n  - ".join(problems))


def _resume_path(ckpt_path: str | None, output_dir: str) -> str | None:
    """``ckpt_path=last``: the newest state of this run folder, whichever callback or signal
    wrote it (see :func:`~beit_lightning.checkpoints.newest_checkpoint`); a fresh start when the
    folder holds none. Any other value goes to Lightning as it is."""
    if ckpt_path != "last":
        return ckpt_path
    path = newest_checkpoint(output_dir)
    if path is None:
        log.warning("ckpt_path=last: no checkpoint in %s yet, starting from scratch", output_dir)
    else:
        log.info("ckpt_path=last resumes %s", path)
    return path


def _refuse_a_used_folder(output_dir: str, ckpt_path: str | None) -> None:
    """A fresh run (no ``ckpt_path``) must not write into a folder that holds another run's
    checkpoints: its files would mix with theirs, and ``ckpt_path=last`` could later resume the
    other run's newer step."""
    folder = os.path.join(output_dir, "checkpoints")
    used = sorted(n for n in os.listdir(folder) if n.endswith(".ckpt")) if os.path.isdir(folder) else []
    if ckpt_path is None and used:
        raise ConfigError(
            f"{folder} already holds checkpoints ({', '.join(used[:3])}{', ...' if len(used) > 3 else ''}) of an earlier "
            "run: resume it with ckpt_path=last, or start this run in a new folder (hydra.run.dir=...)"
        )


def describe_run(cfg: DictConfig, task: Any, datamodule: Any) -> str:
    """One line: what is trained, on what data, with which tokenizer, for how long, and where the
    outputs go (printed at the start of every run)."""
    model = cfg.get("model") or {}
    parts = [f"{type(task).__name__}"]
    if "name" in model:
        size = (cfg.data.get("input_size") or cfg.data.get("crop_size") or model.get("img_size"))
        parts.append(f"of {model.name} at {size}px")
    data, where = cfg.data, None
    for key in ("root", "train_urls"):
        if data.get(key):
            where = data[key]
    if where is None and data.get("num_train"):
        where = f"{data.num_train} generated images"
    parts.append(f"on {type(datamodule).__name__}" + (f" ({where})" if where else ""))
    tokenizer = getattr(task, "tokenizer", None)
    if tokenizer is not None and _is_pretraining(str(cfg.task._target_)):
        tok = cfg.get("tokenizer") or {}
        source = tok.get("path") or tok.get("checkpoint") or ("seeded random weights" if "seed" in tok else "as configured")
        parts.append(f"with tokenizer {type(tokenizer).__name__} ({tokenizer.vocab_size} codes, {source})")
    trainer = cfg.trainer
    length = f"{trainer.max_steps} steps" if trainer.get("max_steps", -1) not in (-1, None) else f"{trainer.get('max_epochs')} epochs"
    devices = f"{trainer.get('devices', 1)} x {trainer.get('accelerator', 'auto')}"
    return f"training {' '.join(parts)} for {length} on {devices}, {trainer.get('precision', '32-true')}; outputs in {cfg.output_dir}"


def _instantiate_all(group: DictConfig | None) -> list[Any]:
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node is not None and "_target_" in node]


def train(cfg: DictConfig) -> float | None:
    """Run the configured task; return the value of ``cfg.metric`` at the end (for sweepers)."""
    validate_config(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    output_dir = cfg.output_dir
    os.makedirs(output_dir, exist_ok=True)
    _refuse_a_used_folder(output_dir, cfg.get("ckpt_path"))

    datamodule = instantiate(cfg.data)
    task = instantiate(cfg.task)
    if cfg.get("init_checkpoint"):
        if not hasattr(task, "model"):
            raise ConfigError(f"init_checkpoint is set but task {type(task).__name__} has no model to load it into")
        result = load_checkpoint(task.model, cfg.init_checkpoint)
        log.info("initialised from %s\n%s", cfg.init_checkpoint, result.report())
    loggers = _instantiate_all(cfg.get("logger"))
    callbacks = _instantiate_all(cfg.get("callbacks"))
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a bar callback with the bar off
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    callbacks.append(CheckpointMetadata(OmegaConf.to_yaml(cfg, resolve=True)))
    trainer: pl.Trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)
    if trainer.is_global_zero:
        OmegaConf.save(cfg, os.path.join(output_dir, "config_resolved.yaml"), resolve=True)
        log.info(describe_run(cfg, task, datamodule))

    trainer.fit(task, datamodule=datamodule, ckpt_path=_resume_path(cfg.get("ckpt_path"), output_dir))
    value = trainer.callback_metrics.get(cfg.metric) if cfg.get("metric") else None
    end_distributed()  # every rank, after the last collective: no gloo abort at interpreter exit
    return float(value) if value is not None else None


@hydra.main(version_base="1.3", config_path="pkg://beit_lightning.conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    quiet_console()
    return train(cfg)


if __name__ == "__main__":
    main()
