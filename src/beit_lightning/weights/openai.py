"""OpenAI's DALL-E dVAE files (``encoder.pkl``, ``decoder.pkl``): pickled modules, read with an
unpickler that allows exactly their classes (no code from the file runs); the readers live beside the
tokenizer they fill (:mod:`beit_lightning.models.tokenizers.dall_e`), this module names them by source."""

from __future__ import annotations

import os
from typing import Any

import torch

from ..models.tokenizers.dall_e import read_openai_decoder, read_openai_encoder
from .sources import registry_entry, resolve_weights

__all__ = ["read_openai_weights"]


def read_openai_weights(spec: str | os.PathLike, kind: str | None = None,
                        map_location: Any = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, int], str]:
    """``(state_dict, sizes, kind)`` of OpenAI's ``encoder.pkl`` or ``decoder.pkl`` named by a path,
    URL or registry name (``dall_e_encoder``, ``dall_e_decoder``). ``kind`` (``"encoder"`` /
    ``"decoder"``) defaults to the registry entry's, else to the file name's."""
    entry = registry_entry(spec)
    if kind is None:
        kind = entry.format.split("_")[-1] if entry else ("decoder" if "decoder" in os.path.basename(os.fspath(spec)) else "encoder")
    if kind not in ("encoder", "decoder"):
        raise ValueError(f"kind must be 'encoder' or 'decoder'; got {kind!r}")
    path = resolve_weights(spec)
    reader = read_openai_encoder if kind == "encoder" else read_openai_decoder
    state, sizes = reader(path, map_location=map_location)
    return state, sizes, kind
