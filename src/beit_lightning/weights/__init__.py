"""Weights by name, URL or file, and the formats they come in.

One concern a module; arrows point down (nothing here imports a task, and the modules below the
line import nothing of the models, so any module may resolve a name)::

  cli.py          beit-lightning-weights (list / info / download), beit-lightning-export
  hf_export.py    our models -> a transformers save_pretrained folder (export_hf, export_hf_checkpoint)
  timm_export.py  our models or any checkpoint -> timm's BEiT state dict (export_timm)
  model_card.py   the exported folder's image processor and README (recipe, metrics, loading)
  hf_model.py     our model built from a transformers folder (create_model_from_hf)
  loader.py       read_state_dict / load_checkpoint: any format -> flat names -> the target model
  hf_format.py    format: transformers BEiT checkpoints (5.x and 4.x names)
  hf_names.py     transformers' names <-> ours, shared by reading and writing
  official.py     format: the official .pth ({"model": ...}) and mmseg segmentation checkpoints
  lightning.py    format: our Lightning checkpoints (the network's model.* weights)
  openai.py       format: OpenAI's DALL-E encoder.pkl / decoder.pkl
  run_folder.py   a run folder's newest checkpoint, resolved config and metrics
  ------------------------------------------------------------------------------------------
  sources.py      where a file comes from: path, URL, hf-hub:<repo>, timm:<model>, registry name
  registry.py     the published BEiT-family artefacts (URL, format, model config, licence, sha256)
  download.py     URL -> the cache ($BEIT_LIGHTNING_CACHE), atomic, hash-checked, progress bar
  safety.py       weights-only reading: a pickle that would run code is refused

This package's namespace holds the lower half only; import the upper modules by name
(``beit_lightning.weights.loader``) or through ``beit_lightning.checkpoints`` / ``beit_lightning.huggingface``.
"""

from .download import HashMismatchError, WeightsUnavailableError, cache_dir, download_url, url_cache_path
from .registry import REGISTRY, WeightsEntry, get_entry, is_registered, list_entries, register
from .safety import UnsafeWeightsError, load_weights_file
from .sources import cache_location, is_remote, registry_entry, resolve_weights, source_kind

__all__ = [
    "REGISTRY",
    "HashMismatchError",
    "UnsafeWeightsError",
    "WeightsEntry",
    "WeightsUnavailableError",
    "cache_dir",
    "cache_location",
    "download_url",
    "get_entry",
    "is_registered",
    "is_remote",
    "list_entries",
    "load_weights_file",
    "register",
    "registry_entry",
    "resolve_weights",
    "source_kind",
    "url_cache_path",
]
