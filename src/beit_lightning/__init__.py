"""beit-lightning: BEiT pre-training, fine-tuning and segmentation as Lightning tasks over timm models."""

from .checkpoints import export_timm, load_checkpoint
from .data import BlockwiseMaskGenerator, GeneratedDataModule
from .models import BeitForMaskedImageModeling, BeitUperNet
from .tasks import (
    ImageClassification,
    LinearProbe,
    MaskedImageModeling,
    SemanticSegmentation,
    TokenizerTraining,
)
from .tokenizers import VQKD, DallETokenizer, DiscreteVAE, VisualTokenizer, load_tokenizer, save_tokenizer

__version__ = "0.1.0"

__all__ = [
    "VQKD",
    "BeitForMaskedImageModeling",
    "BeitUperNet",
    "BlockwiseMaskGenerator",
    "DallETokenizer",
    "DiscreteVAE",
    "GeneratedDataModule",
    "ImageClassification",
    "LinearProbe",
    "MaskedImageModeling",
    "SemanticSegmentation",
    "TokenizerTraining",
    "VisualTokenizer",
    "__version__",
    "export_timm",
    "load_checkpoint",
    "load_tokenizer",
    "save_tokenizer",
]
