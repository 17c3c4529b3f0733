"""Where a weights file comes from: one string names it, whatever the source.

* a local path (a file or a transformers ``save_pretrained`` folder), as it is;
* an ``http(s)://`` URL: downloaded once into our cache (:mod:`.download`);
* ``hf-hub:<repo>[@revision]``: a Hugging Face Hub repository through ``huggingface_hub`` (its own
  cache, ``HF_HUB_OFFLINE``): a transformers BEiT folder, or the weight file of a timm repository;
* ``timm:<model name>[.tag]``: the weights timm's pretrained config names (its Hub repository or URL);
* a name of our registry (:mod:`.registry`, ``beit-lightning-weights list``): its URL, into our cache.

:func:`resolve_weights` turns any of them into a local path; readers then take the file as they
take a local one. This module imports nothing of the package but the weights' registry and cache,
so that any module, models included, may resolve a name.
"""

from __future__ import annotations

import json
import os

from .download import WeightsUnavailableError, download_url, url_cache_path
from .registry import WeightsEntry, get_entry, is_registered

__all__ = ["WEIGHT_FILES", "cache_location", "is_remote", "registry_entry", "resolve_weights", "source_kind"]

#: the weight files of a Hub repository, in order of preference
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def source_kind(spec: str | os.PathLike) -> str:
    """``"path"``, ``"url"``, ``"hf-hub"``, ``"timm"`` or ``"registry"``: how ``spec`` is resolved.
    An existing local file or folder is a path even if its name is also a registry name."""
    text = os.fspath(spec)
    if os.path.exists(text):
        return "path"
    if text.startswith(("http://", "https://")):
        return "url"
    if text.startswith("hf-hub:"):
        return "hf-hub"
    if text.startswith("timm:"):
        return "timm"
    if is_registered(text):
        return "registry"
    return "path"


def is_remote(spec: str | os.PathLike | None) -> bool:
    """Whether ``spec`` names weights by URL, Hub repository, timm name or registry name."""
    return spec is not None and not isinstance(spec, dict) and source_kind(spec) != "path"


def registry_entry(spec: str | os.PathLike | None) -> WeightsEntry | None:
    """The registry entry ``spec`` names, or ``None`` (a path, URL, Hub or timm name)."""
    if spec is None or not isinstance(spec, (str, os.PathLike)) or source_kind(spec) != "registry":
        return None
    return get_entry(os.fspath(spec))


def resolve_weights(spec: str | os.PathLike, progress: bool = True) -> str:
    """The local path of the weights ``spec`` names (see the module docstring); downloads at most once.

    A path is returned as it is (its reader reports a missing file). Raises
    :class:`~beit_lightning.weights.download.WeightsUnavailableError` (a ``FileNotFoundError``) naming
    the URL and the cache path when the file is not cached and cannot be downloaded.
    """
    text = os.fspath(spec)
    kind = source_kind(text)
    if kind == "path":
        return text
    if kind == "url":
        return download_url(text, progress=progress)
    if kind == "registry":
        entry = get_entry(text)
        return download_url(entry.url, sha256=entry.sha256, progress=progress, name=entry.name)
    if kind == "hf-hub":
        repo, _, revision = text[len("hf-hub:"):].partition("@")
        return _hub_weights(repo, revision or None)
    return _timm_weights(text[len("timm:"):], progress)


def _hub_weights(repo: str, revision: str | None, filename: str | None = None) -> str:
    """A transformers BEiT folder (``config.json`` with ``model_type: beit``) or the repository's weight file."""
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as err:  # pragma: no cover - a dependency of the package
        raise ImportError("hf-hub: names need huggingface_hub: pip install huggingface_hub") from err
    where = f"hf-hub:{repo}" + (f"@{revision}" if revision else "")
    patterns = [filename] if filename else ["*.json", *WEIGHT_FILES, "*.safetensors.index.json", "model-*.safetensors"]
    try:
        folder = snapshot_download(repo, revision=revision, allow_patterns=patterns)
    except LocalEntryNotFoundError as err:
        raise WeightsUnavailableError(
            f"{where} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and cannot be downloaded ({str(err).splitlines()[0]}): run "
            f"`hf download {repo}` (or `beit-lightning-weights download {where}`) where you have network, with the same "
            "HF_HOME / HF_HUB_CACHE, or unset HF_HUB_OFFLINE") from None
    except HfHubHTTPError as err:
        raise WeightsUnavailableError(f"{where} cannot be fetched from the Hugging Face Hub: {err}") from None
    if filename:
        return os.path.join(folder, filename)
    config = os.path.join(folder, "config.json")
    if os.path.isfile(config):
        with open(config) as f:
            if json.load(f).get("model_type") == "beit":
                return folder
    for name in WEIGHT_FILES:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise WeightsUnavailableError(f"{where} holds neither a transformers BEiT folder nor one of {', '.join(WEIGHT_FILES)}")


def _timm_weights(name: str, progress: bool) -> str:
    """The file of timm's pretrained config for ``name`` (``arch`` or ``arch.tag``)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name, allow_unregistered=False)
    if cfg is None:
        raise KeyError(f"timm:{name}: timm has no pretrained weights of that name (timm.list_pretrained('{name}*'))")
    if cfg.file:
        return cfg.file
    if cfg.hf_hub_id:
        repo, _, revision = cfg.hf_hub_id.partition("@")
        filename = cfg.hf_hub_filename if getattr(cfg, "hf_hub_filename", None) else None
        return _hub_weights(repo, revision or None, filename)
    if cfg.url:
        return download_url(cfg.url, progress=progress)
    raise WeightsUnavailableError(f"timm:{name}: timm's config names no file, Hub repository or URL for it")


def cache_location(spec: str | os.PathLike) -> str | None:
    """Where ``spec``'s file is (or would be) in our cache; ``None`` for paths, Hub and timm names."""
    text = os.fspath(spec)
    kind = source_kind(text)
    if kind == "url":
        return url_cache_path(text)
    if kind == "registry":
        return url_cache_path(get_entry(text).url)
    return None
