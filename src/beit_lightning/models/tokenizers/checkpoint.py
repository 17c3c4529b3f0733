"""Stand-alone tokenizer checkpoints: the class, its constructor arguments and its weights, a few
MB instead of a whole Lightning state. Written atomically; read with the weights-only unpickler
(a file that holds anything but weights is refused with one clear error, never run)."""

from __future__ import annotations

import os

import torch

from ...weights.registry import get_entry
from ...weights.safety import load_weights_file
from ...weights.sources import resolve_weights, source_kind
from .base import VisualTokenizer
from .dvae import DiscreteVAE
from .vqkd import VQKD, official_vqkd_state

__all__ = ["FORMAT", "load_tokenizer", "save_tokenizer"]

FORMAT = "beit_lightning.tokenizer/1"
TOKENIZER_CLASSES: dict[str, type[VisualTokenizer]] = {"DiscreteVAE": DiscreteVAE, "VQKD": VQKD}


def save_tokenizer(tokenizer: VisualTokenizer, path: str | os.PathLike) -> None:
    """Write ``tokenizer`` to ``path`` (temporary file + rename: a kill never leaves half a file)."""
    name = type(tokenizer).__name__
    if name not in TOKENIZER_CLASSES:
        raise TypeError(f"cannot save a {name}; savable tokenizers: {sorted(TOKENIZER_CLASSES)}")
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    state = {k: v.detach().cpu() for k, v in tokenizer.state_dict().items()}
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save({"format": FORMAT, "class": name, "config": dict(tokenizer.config), "state_dict": state}, tmp)
    os.replace(tmp, path)


def load_tokenizer(
    checkpoint: str | os.PathLike,
    vocab_size: int | None = None,
    image_size: int | None = None,
    map_location: str | torch.device = "cpu",
    precision: str = "fp32",
    channels_last: bool = False,
    compile: bool = False,
) -> VisualTokenizer:
    """Rebuild a tokenizer saved by :func:`save_tokenizer`; ``vocab_size`` and ``image_size``,
    when given, are checked against the file (they are what the pre-training config assumes).
    ``checkpoint`` is a path, an ``http(s)`` URL or ``hf-hub:`` file (:mod:`beit_lightning.weights`)."""
    kind = source_kind(checkpoint)
    if kind == "registry" and get_entry(os.fspath(checkpoint)).format != "official_vqkd":
        entry = get_entry(os.fspath(checkpoint))
        raise ValueError(f"{entry.name!r} is {entry.description} ({entry.format}), not a tokenizer checkpoint"
                         + ("; use tokenizer=dall_e" if entry.format.startswith("openai") else ""))
    path = resolve_weights(checkpoint)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer checkpoint not found: {path!r} (train one with task=tokenizer)")
    obj = load_weights_file(path, map_location=map_location)
    official = official_vqkd_state(obj)  # BEiT v2's released tokenizer (vqkd_encoder_base_decoder_*.pth)
    if official is None and (not isinstance(obj, dict) or obj.get("format") != FORMAT):
        raise ValueError(
            f"{path!r} is not a beit-lightning tokenizer checkpoint (format {FORMAT}); for OpenAI's encoder.pkl "
            "use tokenizer=dall_e, for a Lightning checkpoint of task=tokenizer use the tokenizer.pt it exported"
        )
    cls = VQKD if official is not None else TOKENIZER_CLASSES.get(obj["class"])
    if cls is None:
        raise ValueError(f"{path!r} holds an unknown tokenizer class {obj['class']!r}")
    if official is not None:
        tokenizer = VQKD.from_official(official)
    else:
        tokenizer = cls(**obj["config"])
        tokenizer.load_state_dict(obj["state_dict"], strict=True)
    for name, wanted in (("vocab_size", vocab_size), ("image_size", image_size)):
        if wanted is not None and getattr(tokenizer, name) != wanted:
            raise ValueError(
                f"{path!r} has {name}={getattr(tokenizer, name)} but the configuration expects {wanted}: "
                f"set tokenizer.{name}={getattr(tokenizer, name)}"
            )
    # how encode runs (VisualTokenizer.configure_inference): tokenizer.precision / channels_last / compile
    return tokenizer.configure_inference(precision, channels_last, compile).eval()
