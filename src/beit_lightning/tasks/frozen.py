"""Frozen modules inside a task (a tokenizer, a teacher, a probed backbone) stay in eval mode on
purpose; Lightning warns about every module in eval mode when training starts. This keeps that
warning for the user's own modules and drops it when the frozen ones are all there is."""

from __future__ import annotations

import warnings
from collections.abc import Iterable

from lightning_fabric.utilities.warnings import PossibleUserWarning
from torch import nn

__all__ = ["expect_frozen_in_eval_mode"]


def expect_frozen_in_eval_mode(frozen: Iterable[nn.Module | None]) -> None:
    """Silence Lightning's "Found N module(s) in eval mode" for exactly ``N`` = the number of
    modules inside ``frozen``: if any other module is in eval mode too, the count differs and the
    warning is shown as usual. Call it from ``on_fit_start`` (the check runs just after)."""
    count = sum(1 for module in frozen if module is not None for _ in module.modules())
    if count:
        warnings.filterwarnings(
            "ignore", message=rf"Found {count} module\(s\) in eval mode at the start of training",
            category=PossibleUserWarning,
        )
