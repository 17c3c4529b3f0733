"""Our BEiT models (or any checkpoint the loader reads) as timm's own BEiT architecture."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import timm
import torch
from timm.models.beit import Beit
from torch import nn

from .loader import PRETRAINING_MODELS, load_checkpoint, read_state_dict
from .official import to_flat_beit_state_dict

__all__ = ["export_timm"]


def export_timm(
    model: nn.Module | str | os.PathLike | Mapping[str, Any],
    path: str | os.PathLike,
    model_name: str | None = None,
    num_classes: int | None = None,
    img_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """Write ``model`` as a state dict of timm's own BEiT architecture (per-block relative
    position tables, mean pooling with ``fc_norm``), loadable with
    ``timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=dict(file=path))``.

    ``model`` is a :class:`BeitForMaskedImageModeling` or a :class:`SplitMaskModel` with a BEiT
    encoder (a pre-trained encoder: its final norm becomes ``fc_norm``, no head; create the timm model with ``num_classes=0`` or your own),
    a timm ``Beit`` classifier, or any checkpoint :func:`load_checkpoint` reads. ``.safetensors``
    paths are written with safetensors, others with ``torch.save``. Returns the state dict.
    """
    if not isinstance(model, nn.Module):
        source = read_state_dict(model)[0]
        flat = to_flat_beit_state_dict(source)
        if model_name is None:
            raise ValueError("exporting a checkpoint file needs model_name (e.g. beit_base_patch16_224)")
        if num_classes is None:
            num_classes = int(flat["head.weight"].shape[0]) if "head.weight" in flat else 0
    else:
        source = model.state_dict()
        backbone = model.backbone if isinstance(model, PRETRAINING_MODELS) else model
        if not isinstance(backbone, Beit):
            raise TypeError(f"export_timm expects a BEiT model; got {type(model).__name__}")
        model_name = model_name or backbone.pretrained_cfg.get("architecture")
        num_classes = backbone.num_classes if num_classes is None else num_classes
        img_size = img_size or backbone.patch_embed.img_size[0]
    kwargs = {"num_classes": num_classes}
    if img_size:
        kwargs["img_size"] = img_size
    target = timm.create_model(model_name, pretrained=False, **kwargs)
    load_checkpoint(target, source, strict=True, norm_to_fc_norm=True)
    state = {k: v.detach().cpu().contiguous() for k, v in target.state_dict().items()}
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, tmp)
    else:
        torch.save(state, tmp)
    os.replace(tmp, path)
    return state

