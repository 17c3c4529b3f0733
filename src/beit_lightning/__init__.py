"""beit-lightning: BEiT pre-training, fine-tuning and segmentation as Lightning tasks over timm models."""

from . import resolvers  # noqa: F401 - the bl.* resolvers of the shipped configs
from .checkpoints import export_timm, load_checkpoint
from .console import quiet_console
from .data import BlockwiseMaskGenerator, GeneratedDataModule
from .huggingface import export_hf
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

quiet_console()

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
    "export_hf",
    "export_timm",
    "load_checkpoint",
    "load_tokenizer",
    "save_tokenizer",
]
