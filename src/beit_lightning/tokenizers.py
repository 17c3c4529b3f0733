"""Public alias of :mod:`beit_lightning.models.tokenizers` (``from beit_lightning.tokenizers import ...``)."""

from .models.tokenizers import *  # noqa: F403
from .models.tokenizers import __all__  # noqa: F401
