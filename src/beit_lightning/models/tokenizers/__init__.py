"""Visual tokenizers: a common interface and OpenAI's DALL-E dVAE encoder."""

from .base import VisualTokenizer
from .dall_e import DallEEncoder, DallETokenizer, map_pixels, read_openai_encoder, unmap_pixels

__all__ = ["DallEEncoder", "DallETokenizer", "VisualTokenizer", "map_pixels", "read_openai_encoder", "unmap_pixels"]
