"""beit-lightning: BEiT pre-training and fine-tuning as Lightning tasks over timm models."""

from .checkpoints import load_checkpoint
from .data import BlockwiseMaskGenerator, GeneratedDataModule
from .models import BeitForMaskedImageModeling
from .tasks import MaskedImageModeling
from .tokenizers import DallETokenizer, VisualTokenizer

__version__ = "0.1.0"

__all__ = [
    "BeitForMaskedImageModeling",
    "BlockwiseMaskGenerator",
    "DallETokenizer",
    "GeneratedDataModule",
    "MaskedImageModeling",
    "VisualTokenizer",
    "__version__",
    "load_checkpoint",
]
