"""Visual tokenizers: a common interface, OpenAI's DALL-E encoder, a trainable dVAE, VQ-KD."""

from .base import VisualTokenizer
from .checkpoint import load_tokenizer, save_tokenizer
from .dall_e import DallEDecoder, DallEEncoder, DallETokenizer, map_pixels, read_openai_encoder, unmap_pixels
from .dvae import DiscreteVAE
from .vqkd import VQKD, CosineVectorQuantizer

__all__ = [
    "VQKD",
    "CosineVectorQuantizer",
    "DallEDecoder",
    "DallEEncoder",
    "DallETokenizer",
    "DiscreteVAE",
    "VisualTokenizer",
    "load_tokenizer",
    "map_pixels",
    "read_openai_encoder",
    "save_tokenizer",
    "unmap_pixels",
]
