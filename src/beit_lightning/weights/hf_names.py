"""transformers' BEiT names and ours: the tables that reading (:mod:`.hf_format`) and writing
(:mod:`.hf_export`) share, and which transformers class a model of ours maps to."""

from __future__ import annotations

import re
from collections.abc import Sequence

from timm.models.beit import Beit
from torch import nn

from ..models.beit import BeitForMaskedImageModeling
from ..models.segmentation import BeitUperNet
from .run_folder import CONFIG_KEY

__all__ = ["CONFIG_KEY", "HF_CLASSES", "HFExportError", "backbone_of", "model_kind", "sub_all"]

#: our model kind -> the transformers class that computes the same function
HF_CLASSES = {
    "mim": "BeitForMaskedImageModeling",
    "classification": "BeitForImageClassification",
    "segmentation": "BeitForSemanticSegmentation",
}

#: ``CONFIG_KEY`` (``"beit_lightning"``): the entry of config.json where we note what transformers' config
#: cannot say (padded layers); the same key holds our notes in a Lightning checkpoint (:mod:`.run_folder`)


class HFExportError(ValueError):
    """The model has no exact transformers counterpart; the message says which part and what to do."""


# --- names ------------------------------------------------------------------------------------------

#: timm block parameter -> transformers layer parameter (``blocks.N.<k>`` -> ``beit.layers.N.<v>``)
BLOCK_TO_HF = {
    "norm1.weight": "layernorm_before.weight",
    "norm1.bias": "layernorm_before.bias",
    "norm2.weight": "layernorm_after.weight",
    "norm2.bias": "layernorm_after.bias",
    "gamma_1": "lambda_1",
    "gamma_2": "lambda_2",
    "attn.q_bias": "attention.q_proj.bias",
    "attn.v_bias": "attention.v_proj.bias",
    "attn.proj.weight": "attention.o_proj.weight",
    "attn.proj.bias": "attention.o_proj.bias",
    "attn.relative_position_bias_table": "relative_position_bias.relative_position_bias_table",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
}
BLOCK_FROM_HF = {v: k for k, v in BLOCK_TO_HF.items()}

#: flat (timm / official) names outside the blocks -> transformers names
TOP_TO_HF = {
    "cls_token": "beit.embeddings.cls_token",
    "mask_token": "beit.embeddings.mask_token",
    "pos_embed": "beit.embeddings.position_embeddings",
    "patch_embed.proj.weight": "beit.embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "beit.embeddings.patch_embeddings.projection.bias",
    "rel_pos_bias.relative_position_bias_table": "beit.shared_position_bias.relative_position_bias_table",
    "fc_norm.weight": "beit.pooler.layernorm.weight",
    "fc_norm.bias": "beit.pooler.layernorm.bias",
    "head.weight": "classifier.weight",
    "head.bias": "classifier.bias",
    "lm_head.weight": "lm_head.weight",
    "lm_head.bias": "lm_head.bias",
}
TOP_FROM_HF = {v: k for k, v in TOP_TO_HF.items()}

#: our segmentation neck/head names -> transformers 5 (applied in order)
HEADS_TO_HF = [
    (r"^neck\.fpn1\.0\.", "fpn.fpn1.conv_transpose1."),
    (r"^neck\.fpn1\.1\.", "fpn.fpn1.normalization."),
    (r"^neck\.fpn1\.3\.", "fpn.fpn1.conv_transpose2."),
    (r"^neck\.fpn2\.0\.", "fpn.fpn2."),
    (r"^decode_head\.psp_modules\.(\d+)\.1\.conv\.", r"decode_head.psp_modules.blocks.\1.conv.convolution."),
    (r"^decode_head\.psp_modules\.(\d+)\.1\.bn\.", r"decode_head.psp_modules.blocks.\1.conv.normalization."),
    (r"^decode_head\.bottleneck\.", "decode_head.psp_bottleneck."),
    (r"\.conv_seg\.", ".classifier."),
    (r"\.conv\.weight$", ".convolution.weight"),
    (r"\.bn\.", ".normalization."),
]

#: transformers 5 and 4.x segmentation names -> ours (applied in order)
HEADS_FROM_HF = [
    (r"^fpn\.fpn1\.conv_transpose1\.", "neck.fpn1.0."),
    (r"^fpn\.fpn1\.normalization\.", "neck.fpn1.1."),
    (r"^fpn\.fpn1\.conv_transpose2\.", "neck.fpn1.3."),
    (r"^fpn\.fpn2\.", "neck.fpn2.0."),
    (r"^fpn([12])\.(\d)\.", r"neck.fpn\1.\2."),  # transformers 4.x: the official names
    (r"^decode_head\.psp_modules\.blocks\.(\d+)\.conv\.convolution\.", r"decode_head.psp_modules.\1.1.conv."),
    (r"^decode_head\.psp_modules\.blocks\.(\d+)\.conv\.normalization\.", r"decode_head.psp_modules.\1.1.bn."),
    (r"^decode_head\.psp_bottleneck\.", "decode_head.bottleneck."),
    (r"\.classifier\.", ".conv_seg."),
    (r"\.convolution\.", ".conv."),
    (r"\.normalization\.", ".bn."),
]

#: transformers 4.x encoder names -> transformers 5 (as transformers' own conversion mapping)
LEGACY_ENCODER = [
    (r"^beit\.encoder\.layer\.(\d+)\.", r"beit.layers.\1."),
    (r"^beit\.encoder\.relative_position_bias\.", "beit.shared_position_bias."),
    (r"\.attention\.attention\.relative_position_bias\.", ".relative_position_bias."),
    (r"\.attention\.attention\.query\.", ".attention.q_proj."),
    (r"\.attention\.attention\.key\.", ".attention.k_proj."),
    (r"\.attention\.attention\.value\.", ".attention.v_proj."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"^(beit\.layers\.\d+)\.output\.dense\.", r"\1.mlp.fc2."),
]

SEG_PREFIXES = ("neck.", "decode_head.", "auxiliary_head.")

def sub_all(key: str, rules: Sequence[tuple[str, str]]) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def model_kind(model: nn.Module) -> str:
    """``"mim"``, ``"classification"`` or ``"segmentation"``: which transformers class ``model`` maps to."""
    if isinstance(model, BeitForMaskedImageModeling):
        if not isinstance(model.backbone, Beit):
            raise HFExportError(f"transformers' BeitForMaskedImageModeling is BEiT's; this model's backbone is a timm "
                                f"{type(model.backbone).__name__}")
        return "mim"
    if isinstance(model, BeitUperNet):
        return "segmentation"
    if isinstance(model, Beit):
        return "classification"
    raise HFExportError(
        f"export_hf takes a BeitForMaskedImageModeling, a timm Beit classifier or a BeitUperNet; got {type(model).__name__} "
        "(a linear probe's heads are per block: export the pre-trained encoder instead)"
    )


def backbone_of(model: nn.Module) -> Beit:
    return model if isinstance(model, Beit) else model.backbone
