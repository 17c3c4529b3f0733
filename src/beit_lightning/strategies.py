"""Distributed strategies configured for BEiT models."""

from __future__ import annotations

from typing import Any

from pytorch_lightning.strategies import FSDPStrategy
from timm.models import beit, vision_transformer

#: the transformer blocks that form one FSDP unit each
TRANSFORMER_BLOCKS = {beit.Block, vision_transformer.Block}


def block_fsdp_strategy(
    sharding_strategy: str = "FULL_SHARD", activation_checkpointing: bool = True, **kwargs: Any
) -> FSDPStrategy:
    """FSDP with one unit per transformer block (see ``conf/trainer/fsdp.yaml`` for why), and
    optionally activation checkpointing of every block."""
    return FSDPStrategy(
        auto_wrap_policy=set(TRANSFORMER_BLOCKS),
        activation_checkpointing_policy=set(TRANSFORMER_BLOCKS) if activation_checkpointing else None,
        sharding_strategy=sharding_strategy,
        **kwargs,
    )
