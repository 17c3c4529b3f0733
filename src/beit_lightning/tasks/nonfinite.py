"""Stop a run on a non-finite loss or gradient without a host synchronisation every step.

Reading a device value on the host (``bool(torch.isfinite(loss))``) makes Python wait until the
device has finished the step, and the device then idles while Python queues the next one. A fused
AdamW can instead skip an update on the device: its ``step`` reads the optimiser attribute
``found_inf`` (a float tensor, 1.0 = skip), the mechanism :class:`torch.amp.GradScaler` uses, and
then neither the weights, the moments nor the step counts change. :class:`NonFiniteGuard` keeps a
sticky device flag (a non-finite loss or gradient norm at this step or any earlier one), hands it
to the optimiser as ``found_inf`` before every step, so that the bad update and every later one
are skipped, and reads it on the host only every ``every_n_steps`` steps (and whenever asked: at
epoch end, before a checkpoint is written), raising :class:`NonFiniteLossError` with the step it
happened at. Under DDP the gradients are already all-reduced when the flag is set, so every rank
skips alike; the host check reduces the flag over ranks. The weights are those of before the bad
step; a run resumed from a checkpoint written before the check never sees the skipped steps.
"""

from __future__ import annotations

import torch

__all__ = ["NonFiniteGuard", "NonFiniteLossError", "optimizer_skips_on_device"]


class NonFiniteLossError(FloatingPointError):
    """Raised when the loss (or a gradient) is NaN or infinite; no update from it has been applied."""


ADVICE = (
    "Lower the learning rate or raise the warmup, check the input data, keep gradient clipping on "
    "(trainer.gradient_clip_val=3.0), or use bf16 instead of fp16, then resume from the last checkpoint."
)


def optimizer_skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` honours a ``found_inf`` attribute (torch's fused Adam / AdamW / SGD)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and all(
        group.get("fused") for group in optimizer.param_groups
    )


class NonFiniteGuard:
    """The device flag, its hand-over to the optimiser and the periodic host check (see module doc)."""

    def __init__(self, every_n_steps: int) -> None:
        if every_n_steps < 1:
            raise ValueError(f"check_finite_every_n_steps must be >= 1; got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.flag: torch.Tensor | None = None  # bool: a non-finite value at some step so far
        self.first_step: torch.Tensor | None = None  # int64: the first such step, -1 if none
        self.checked_through = -1  # the host has read the flag after this many optimiser steps

    def reset(self, step: int) -> None:
        self.flag = self.first_step = None
        self.checked_through = step

    def note(self, bad: torch.Tensor, step: int) -> None:
        """Record ``bad`` (a device bool) for optimiser step ``step``, without reading it."""
        if self.flag is None:
            self.flag = torch.zeros((), dtype=torch.bool, device=bad.device)
            self.first_step = torch.full((), -1, dtype=torch.long, device=bad.device)
        self.first_step = torch.where(bad & ~self.flag, step, self.first_step)
        self.flag = self.flag | bad

    def before_step(self, optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor, step: int) -> None:
        """Note a non-finite gradient norm and make the fused optimiser skip if anything was ever bad."""
        self.note(~torch.isfinite(grad_norm), step)
        optimizer.found_inf = self.flag.float()

    def check(self, trainer, step: int, force: bool = False) -> None:
        """The host check (one sync, and one collective under DDP): every ``every_n_steps`` steps,
        or now with ``force``; raises :class:`NonFiniteLossError` if any step so far was bad."""
        if step <= self.checked_through or (not force and step < self.checked_through + self.every_n_steps):
            return
        self.checked_through = step
        bad = self.flag is not None and bool(self.flag)
        if trainer is not None and trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            first = int(self.first_step) if self.flag is not None and bool(self.flag) else None
            where = f"at step {first}" if first is not None else "on another rank"
            raise NonFiniteLossError(
                f"the loss or the gradients became non-finite {where} (found at the check after step {step}); "
                f"that update and every later one were skipped on the device, so the weights are those of before "
                f"it and saved checkpoints hold finite weights. {ADVICE}"
            )
