"""Plain ``nn.Module`` models (no Lightning): BEiT for masked image modeling (over a timm BEiT, ViT /
DeiT or XCiT), classifiers, DeiT's distillation loss, BEiT + UperNet for segmentation,
and the tokenizers."""

from .backbones import backbone_family
from .beit import MIM_BACKBONE_DEFAULTS, PRETRAIN_BACKBONE_DEFAULTS, BeitForMaskedImageModeling, beit_init_
from .classifier import create_classifier
from .diffaugment import DiffAugment
from .distillation import distillation_loss
from .retrieval import CrossBatchMemory, contrastive_loss, create_retrieval_model, koleo_loss, recall_at_k
from .segmentation import BeitUperNet, create_segmenter
from .splitmask import SplitMaskModel
from .tokenizers import DallETokenizer, VisualTokenizer
from .vitgan import RandomFeatureNet, ViTGANDiscriminator, ViTGANGenerator

__all__ = ["DiffAugment", "RandomFeatureNet", "ViTGANDiscriminator", "ViTGANGenerator", "CrossBatchMemory", "contrastive_loss", "create_retrieval_model", "koleo_loss", "recall_at_k",
           "MIM_BACKBONE_DEFAULTS", "PRETRAIN_BACKBONE_DEFAULTS", "BeitForMaskedImageModeling", "BeitUperNet",
           "DallETokenizer", "SplitMaskModel", "VisualTokenizer", "backbone_family", "beit_init_", "create_classifier", "create_segmenter",
           "distillation_loss"]
