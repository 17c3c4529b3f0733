"""A quiet console: drop library messages a user cannot act on (applied when the package is
imported, so scripts and notebooks get it as well as the ``beit-lightning`` command):

* Lightning's tip advertising a hosted logger, printed at the start of every run;
* Lightning's notice that our model summary replaces its own;
* Lightning's own deprecation notice about torch's pytree API (raised inside Lightning 2.6 with
  torch >= 2.10, nothing a user of Lightning can change).

Every other warning, including Lightning's warning about modules in eval mode for the user's own
modules, is left alone (see :mod:`beit_lightning.tasks.frozen` for the frozen ones).
"""

from __future__ import annotations

import logging
import warnings

__all__ = ["quiet_console"]

_NOISE = ("\U0001f4a1 Tip:", "Trainer already configured with model summary callbacks")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_NOISE)


_FILTER = _DropNoise()


def quiet_console() -> None:
    """Install the filters (idempotent)."""
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
