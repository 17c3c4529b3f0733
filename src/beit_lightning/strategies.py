"""Distributed strategies configured for BEiT models."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
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


def end_distributed() -> bool:
    """Destroy the default process group, if this process has one; return whether it had.

    Call it once communication is over (after ``fit``/``test`` and any last ``all_gather``), on
    every rank. Why: Lightning leaves the group up, and a gloo group whose worker threads still
    hold work when the interpreter shuts down aborts the process with ``terminate called without
    an active exception`` (exit -6) after a successful run (pytorch/pytorch#190489). PyTorch asks
    every process to call ``destroy_process_group`` before it exits; ``beit-lightning`` does.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        return True
    return False
