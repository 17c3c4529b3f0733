"""BEiT for semantic segmentation: block features -> four-scale neck -> UperNet + FCN auxiliary head.

This is the network of the official ``beit/semantic_segmentation`` release (mmseg's ``UPerHead``
and ``FCNHead`` on the official ``BEiT`` backbone), rebuilt in plain PyTorch so that no mmcv or
mmseg is needed. The backbone is a timm ``Beit``; the outputs of four blocks (0-based
``out_indices``, before any final norm, patch tokens only) become maps at strides 4, 8, 16 and 32.

Submodule and parameter names follow the official checkpoints where they can, so a converter
only renames prefixes: official ``backbone.fpn{1,2}.*`` is our ``neck.fpn{1,2}.*``, and
``decode_head.*`` / ``auxiliary_head.*`` keep their names (ConvModules hold ``conv`` and ``bn``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.models.beit import Beit
from torch import nn

__all__ = ["BeitUperNet", "create_segmenter"]


def _upsample_like(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize with ``align_corners=False`` (mmseg's ``resize`` as UperNet uses it)."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ConvModule(nn.Module):
    """mmcv's ``ConvModule`` as mmseg heads use it: bias-free conv, BatchNorm, ReLU, "same" padding.

    mmcv initialises it on construction: Kaiming normal (fan_out, ReLU gain) for the conv and
    (1, 0) for the BatchNorm; :meth:`reset_parameters` does the same.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_normal_(self.conv.weight, a=0, mode="fan_out", nonlinearity="relu")
        self.bn.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


class FeaturePyramidNeck(nn.Module):
    """Turns four same-resolution ViT maps into strides 4, 8, 16, 32 (the official backbone's ``fpn1-4``).

    Patch 16: deconv-BN-GELU-deconv (x4), deconv (x2), identity, max-pool (/2). Patch 8 (as the
    official code): deconv (x2), identity, max-pool /2, max-pool /4. The BatchNorm is plain here
    (official: SyncBatchNorm); ``Trainer(sync_batchnorm=True)`` converts it under DDP.
    """

    def __init__(self, dim: int, patch_size: int) -> None:
        super().__init__()
        if patch_size == 16:
            self.fpn1 = nn.Sequential(
                nn.ConvTranspose2d(dim, dim, 2, stride=2), nn.BatchNorm2d(dim), nn.GELU(),
                nn.ConvTranspose2d(dim, dim, 2, stride=2),
            )
            self.fpn2 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, stride=2))
            self.fpn3 = nn.Identity()
            self.fpn4 = nn.MaxPool2d(2, stride=2)
        elif patch_size == 8:
            self.fpn1 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, stride=2))
            self.fpn2 = nn.Identity()
            self.fpn3 = nn.Sequential(nn.MaxPool2d(2, stride=2))
            self.fpn4 = nn.Sequential(nn.MaxPool2d(4, stride=4))
        else:
            raise ValueError(f"the segmentation neck needs patch size 16 or 8 (strides 4-32); got {patch_size}")

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [op(x) for op, x in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), features, strict=True)]


class UPerHead(nn.Module):
    """UperNet decoder (mmseg ``UPerHead``): PPM on the coarsest map, FPN top-down path, fusion.

    Returns logits at the resolution of the first (finest) map.
    """

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1) -> None:
        super().__init__()
        top = in_channels[-1]
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvModule(top, channels, 1)) for scale in pool_scales
        )
        self.bottleneck = ConvModule(top + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def psp_forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = [_upsample_like(branch(x), x.shape[2:]) for branch in self.psp_modules]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, features, strict=False)]
        laterals.append(self.psp_forward(features[-1]))
        for i in range(len(laterals) - 1, 0, -1):  # top-down: coarse maps refine the finer ones
            laterals[i - 1] = laterals[i - 1] + _upsample_like(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals, strict=False)] + [laterals[-1]]
        size = outs[0].shape[2:]
        fused = self.fpn_bottleneck(torch.cat([outs[0]] + [_upsample_like(x, size) for x in outs[1:]], dim=1))
        return self.conv_seg(self.dropout(fused))


class FCNHead(nn.Module):
    """mmseg ``FCNHead`` as BEiT's auxiliary head: one 3x3 ConvModule, no input concat, dropout, 1x1."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout: float = 0.1,
                 in_index: int = 2) -> None:
        super().__init__()
        self.in_index = in_index
        self.convs = nn.Sequential(ConvModule(in_channels, channels, 3))
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.conv_seg(self.dropout(self.convs(features[self.in_index])))


class BeitUperNet(nn.Module):
    """BEiT + UperNet for semantic segmentation, as the official ADE20K recipe.

    Args:
        backbone: a timm BEiT name; built with ``num_classes=0`` and random weights.
        num_classes: classes of both heads (ADE20K: 150).
        img_size: the input side. timm's ``Beit`` has a fixed input size (its patch embedding
            asserts it and the relative position tables are built for one grid), as the
            official backbone in effect: feed crops of exactly ``img_size`` (sliding-window
            evaluation does), or call ``backbone.set_input_size`` to resize the tables.
        out_indices: the four 0-based blocks whose outputs feed the neck (base: 3, 5, 7, 11;
            large: 7, 11, 15, 23), increasing.
        channels: UperNet width (official: the embedding width, 768 / 1024).
        pool_scales: PPM pooling sizes.
        aux_channels: width of the FCN auxiliary head on the stride-16 map.
        dropout: ``Dropout2d`` before both classifiers.
        aux_head: build the auxiliary head (training only; it has no part in inference).
        **backbone_kwargs: timm ``Beit`` arguments; the official recipe uses
            ``use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1, drop_path_rate=0.1``.

    The backbone's final norm, ``fc_norm`` and head are replaced by identities: the official
    segmentation backbone has none, and parameters without gradients break DDP. Blocks after
    ``out_indices[-1]`` are kept (checkpoints load unchanged) but skipped, so they get no gradient:
    with out_indices not ending at the last block, DDP needs ``find_unused_parameters``.

    Initialisation follows the official code: the backbone keeps timm's init (the one the official
    backbone uses: truncated normal 0.02 for Linear, depth rescaling of proj/fc2), the neck keeps
    PyTorch's defaults, head ConvModules get Kaiming normal (fan_out) with BN (1, 0), and both
    ``conv_seg`` get N(0, 0.01) with zero bias (mmseg ``BaseDecodeHead``).

    ``forward`` returns decode-head logits at 1/4 of the input; ``forward_with_aux`` also returns
    auxiliary logits at 1/16. Resizing to the label size (and the loss) is the task's job.
    """

    def __init__(
        self,
        backbone: str = "beit_base_patch16_224",
        num_classes: int = 150,
        img_size: int = 512,
        out_indices: Sequence[int] = (3, 5, 7, 11),
        channels: int = 768,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        aux_channels: int = 256,
        dropout: float = 0.1,
        aux_head: bool = True,
        **backbone_kwargs: Any,
    ) -> None:
        super().__init__()
        backbone_kwargs.pop("pretrained", None)
        self.backbone: Beit = timm.create_model(backbone, pretrained=False, num_classes=0, img_size=img_size,
                                                **backbone_kwargs)
        if not isinstance(self.backbone, Beit):
            raise TypeError(f"{backbone!r} did not build a timm Beit but {type(self.backbone).__name__}")
        depth = len(self.backbone.blocks)
        self.out_indices = [int(i) for i in out_indices]
        if (len(self.out_indices) != 4 or sorted(set(self.out_indices)) != self.out_indices
                or not 0 <= self.out_indices[0] <= self.out_indices[-1] < depth):
            raise ValueError(f"out_indices must be 4 increasing 0-based block indices below depth {depth} "
                             f"(base: 3, 5, 7, 11); got {list(out_indices)}")
        self.backbone.norm = nn.Identity()
        self.backbone.fc_norm = nn.Identity()
        dim = self.backbone.embed_dim
        self.neck = FeaturePyramidNeck(dim, int(self.backbone.patch_embed.patch_size[0]))
        self.decode_head = UPerHead([dim] * 4, channels, num_classes, pool_scales, dropout)
        self.auxiliary_head = FCNHead(dim, aux_channels, num_classes, dropout) if aux_head else None
        for head in (self.decode_head, self.auxiliary_head):
            if head is not None:
                nn.init.normal_(head.conv_seg.weight, mean=0.0, std=0.01)
                nn.init.zeros_(head.conv_seg.bias)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four neck outputs (strides 4, 8, 16, 32, ``embed_dim`` channels each)."""
        maps = self.backbone.forward_intermediates(
            x, indices=self.out_indices, norm=False, stop_early=True, output_fmt="NCHW", intermediates_only=True
        )
        return self.neck(maps)

    def forward_with_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(decode logits at 1/4, auxiliary logits at 1/16 or None)``, unresized."""
        features = self.forward_features(x)
        aux = self.auxiliary_head(features) if self.auxiliary_head is not None else None
        return self.decode_head(features), aux

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode_head(self.forward_features(x))


def create_segmenter(
    model_name: str,
    num_classes: int,
    img_size: int,
    out_indices: Sequence[int],
    channels: int,
    drop_path_rate: float = 0.0,
    arch: Mapping[str, Any] | None = None,
    aux_channels: int = 256,
    aux_head: bool = True,
) -> BeitUperNet:
    """:class:`BeitUperNet` from a model config (``conf/model/*.yaml``): the timm name, and the
    family's architecture arguments (``model.arch``) passed on to the backbone, as
    :func:`~beit_lightning.models.create_classifier` does for classifiers."""
    return BeitUperNet(
        model_name, num_classes=num_classes, img_size=img_size, out_indices=out_indices, channels=channels,
        aux_channels=aux_channels, aux_head=aux_head, drop_path_rate=drop_path_rate, **dict(arch or {}),
    )
