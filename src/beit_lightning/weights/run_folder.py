"""A run folder's files: its newest checkpoint (what ``ckpt_path=last`` resumes), its resolved
configuration, and the metrics a checkpoint or the run's ``metrics.csv`` holds."""

from __future__ import annotations

import contextlib
import csv
import glob
import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["checkpoint_metrics", "find_run_config", "newest_checkpoint", "run_folder_of"]

#: the entry of our checkpoints (and of exported config.json files) that holds beit-lightning's notes
CONFIG_KEY = "beit_lightning"

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


def _metrics_from_csv(run_dir: str, global_step: int | None) -> tuple[dict[str, float], str | None]:
    files = sorted(glob.glob(os.path.join(run_dir, "**", "metrics.csv"), recursive=True))
    if not files:
        return {}, None
    latest: dict[str, float] = {}
    with open(files[0]) as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            if global_step is not None and step not in (None, "") and int(float(step)) >= global_step:
                continue  # logged after this checkpoint was written
            for key, value in row.items():
                if key in ("step", "epoch") or value in (None, ""):
                    continue
                with contextlib.suppress(ValueError):  # a text column
                    latest[key] = float(value)
    return latest, files[0]


def checkpoint_metrics(checkpoint: Mapping[str, Any], path: str | None = None) -> tuple[dict[str, float], str | None]:
    """``(metrics, where from)``: the metrics a Lightning checkpoint stored at save time
    (``checkpoint["beit_lightning"]["metrics"]``, written by ``CheckpointMetadata``), else the last
    value of each column of the run's ``metrics.csv`` logged before the checkpoint's step."""
    meta = checkpoint.get(CONFIG_KEY)
    for stored in ((meta or {}).get("metrics") if isinstance(meta, Mapping) else None,
                   checkpoint.get("metrics"), checkpoint.get("callback_metrics")):
        if isinstance(stored, Mapping) and stored:
            return {k: float(v) for k, v in stored.items()}, "the checkpoint (the metrics logged when it was saved)"
    if path is None:
        return {}, None
    run_dir = run_folder_of(path)
    if run_dir is None:
        return {}, None
    step = checkpoint.get("global_step")
    return _metrics_from_csv(run_dir, int(step) if step is not None else None)


def run_folder_of(checkpoint_path: str) -> str | None:
    """The run folder of a checkpoint (``<run>/checkpoints/x.ckpt`` or ``<run>/hpc_ckpt_1.ckpt``)."""
    folder = os.path.dirname(os.path.abspath(checkpoint_path))
    for candidate in (folder, os.path.dirname(folder)):
        if os.path.isfile(os.path.join(candidate, "config_resolved.yaml")):
            return candidate
    return None


def find_run_config(checkpoint_path: str | os.PathLike) -> str | None:
    """``config_resolved.yaml`` of the run that wrote ``checkpoint_path``, or ``None``."""
    run_dir = run_folder_of(os.fspath(checkpoint_path))
    return os.path.join(run_dir, "config_resolved.yaml") if run_dir else None

