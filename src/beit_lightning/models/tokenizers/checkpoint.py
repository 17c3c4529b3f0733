"""Stand-alone tokenizer checkpoints: the class, its constructor arguments and its weights, a few
MB instead of a whole Lightning state. Written atomically; read with the weights-only unpickler."""

from __future__ import annotations

import os

import torch

from .base import VisualTokenizer
from .dvae import DiscreteVAE
from .vqkd import VQKD

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
) -> VisualTokenizer:
    """Rebuild a tokenizer saved by :func:`save_tokenizer`; ``vocab_size`` and ``image_size``,
    when given, are checked against the file (they are what the pre-training config assumes)."""
    path = os.fspath(checkpoint)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer checkpoint not found: {path!r} (train one with task=tokenizer)")
    obj = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(
            f"{path!r} is not a beit-lightning tokenizer checkpoint (format {FORMAT}); for OpenAI's encoder.pkl "
            "use tokenizer=dall_e, for a Lightning checkpoint of task=tokenizer use the tokenizer.pt it exported"
        )
    cls = TOKENIZER_CLASSES.get(obj["class"])
    if cls is None:
        raise ValueError(f"{path!r} holds an unknown tokenizer class {obj['class']!r}")
    tokenizer = cls(**obj["config"])
    tokenizer.load_state_dict(obj["state_dict"], strict=True)
    for name, wanted in (("vocab_size", vocab_size), ("image_size", image_size)):
        if wanted is not None and getattr(tokenizer, name) != wanted:
            raise ValueError(
                f"{path!r} has {name}={getattr(tokenizer, name)} but the configuration expects {wanted}: "
                f"set tokenizer.{name}={getattr(tokenizer, name)}"
            )
    return tokenizer.eval()
