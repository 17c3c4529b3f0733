"""Plain ``nn.Module`` models (no Lightning): BEiT for masked image modeling (over a timm BEiT, ViT /
DeiT or XCiT), classifiers, DeiT's distillation teacher and loss, BEiT + UperNet for segmentation,
and the tokenizers."""

from .backbones import backbone_family
from .beit import MIM_BACKBONE_DEFAULTS, PRETRAIN_BACKBONE_DEFAULTS, BeitForMaskedImageModeling, beit_init_
from .classifier import create_classifier
from .distillation import create_teacher, distillation_loss
from .segmentation import BeitUperNet, create_segmenter
from .tokenizers import DallETokenizer, VisualTokenizer

__all__ = ["MIM_BACKBONE_DEFAULTS", "PRETRAIN_BACKBONE_DEFAULTS", "BeitForMaskedImageModeling", "BeitUperNet",
           "DallETokenizer", "VisualTokenizer", "backbone_family", "beit_init_", "create_classifier", "create_segmenter",
           "create_teacher", "distillation_loss"]
