"""BEiT v2's released files: the name users and the README know, served by :func:`load_checkpoint`.

BEiT v2 files (microsoft/unilm ``beit2``) are v1 files plus, in the pre-training ones, the keys of
the patch-aggregation head: ``cls_pt_layers.N.*`` (and ``cls_pt_norm.*`` / ``cls_pt_lm_head.*``
when it was trained with ``--shared_lm_head False``). Fine-tuned v2 files have exactly v1's
layout. The one loader, :func:`~beit_lightning.weights.loader.load_checkpoint`, places those keys
key for key into a :class:`~beit_lightning.models.beitv2.BeitV2ForMaskedImageModeling` (names and
shapes checked; a file without them, e.g. a v1 one, leaves them ``missing``) and reports them as
``dropped`` for any target without the head (a classifier, a segmenter, a v1 pre-training model).
:func:`load_beitv2_checkpoint` is that function under the name this module has always exported.
"""

from __future__ import annotations

from .weights.loader import load_checkpoint as load_beitv2_checkpoint

__all__ = ["load_beitv2_checkpoint"]
