"""Read a weights file without running any code from it.

Every reader of the package loads through :func:`load_weights_file`: ``torch.load`` with
``weights_only=True`` (tensors and plain containers only, and the ``argparse.Namespace`` that the
official scripts save beside the weights), or safetensors. A pickle that holds
anything else (a class, a function: something that would run code when unpickled) is refused with one
:class:`UnsafeWeightsError` that names the file and the first object it holds besides weights.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
from typing import Any

import torch

__all__ = ["SAFE_GLOBALS", "UnsafeWeightsError", "load_weights_file", "refusal_reason"]

#: objects besides tensors and containers that weights files hold and that run no code when read: the
#: official training scripts save their ``argparse.Namespace`` beside the weights (``utils.save_model``)
SAFE_GLOBALS = [argparse.Namespace]


class UnsafeWeightsError(ValueError):
    """The file holds objects other than weights (a pickle that would run code); it was not loaded."""


def refusal_reason(err: BaseException) -> str:
    """The object a weights-only unpickling refused, from torch's message (e.g. ``GLOBAL x.y``)."""
    lines = [ln.strip() for ln in str(err).splitlines() if "GLOBAL" in ln or "Unsupported" in ln]
    if lines:
        return re.sub(r"\. Please use .*|\s*was not an allowed global.*", "", lines[0])
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def load_weights_file(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """The contents of a ``.safetensors`` file or of a ``torch.save`` file of tensors and plain containers.

    Raises :class:`UnsafeWeightsError` (a ``ValueError``) for a pickle that holds anything else, naming
    the file and what it holds; ``FileNotFoundError`` for a missing file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path!r}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device=str(map_location) if isinstance(map_location, (str, torch.device)) else "cpu")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise UnsafeWeightsError(
            f"refusing to load {path!r}: it holds objects other than weights ({refusal_reason(err)}), a pickle that "
            "would run code when loaded. Only tensors and plain containers are read; if you trust the file's source, "
            "re-save its state dict (torch.save(obj.state_dict(), ...)) where you can load it, or pass weights_only=False "
            "where the function offers it"
        ) from None
