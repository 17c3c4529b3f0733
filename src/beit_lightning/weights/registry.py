"""Our registry of the published BEiT-family artefacts: one name per file, whichever format it is in.

Every URL is copied from the publisher's README (``microsoft/unilm`` ``beit/README.md`` and
``beit2/README.md`` / ``beit2/TOKENIZER.md``, ``openai/DALL-E``, ``toshas/torch-fidelity``'s
``feature_extractor_inceptionv3.py``). No publisher states a sha256 for these files, so ``sha256`` is
``None`` (the download is then not checked; set one with :func:`register` when you have verified a copy).

This module imports nothing of the package: any module may look a name up.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["ALIASES", "FORMATS", "REGISTRY", "WeightsEntry", "get_entry", "is_registered", "list_entries", "register"]

#: what the file holds (the reader that takes it):
#: ``official``: ``{"model": state_dict}`` of microsoft/unilm (pre-training: shared rel-pos bias,
#: ``mask_token``, ``lm_head``; BEiT v2 also ``cls_pt_layers``; fine-tuned: per-block tables, ``head``);
#: ``official_segmentation``: an mmseg checkpoint (``state_dict`` with ``backbone.*``, ``backbone.fpnN.*``,
#: ``decode_head.*``, ``auxiliary_head.*``); ``openai_encoder`` / ``openai_decoder``: OpenAI's pickled
#: dVAE modules; ``official_vqkd``: BEiT v2's VQ-KD tokenizer; ``inception``: torch-fidelity's FID
#: Inception-v3 state dict.
FORMATS = ("official", "official_segmentation", "openai_encoder", "openai_decoder", "official_vqkd", "inception")

_UNILM = "https://unilm.blob.core.windows.net/beit/"
_BEIT2 = "https://conversationhub.blob.core.windows.net/beit-share-public/beitv2/"
_VQKD = "https://github.com/addf400/files/releases/download/BEiT-v2/"
_MIT_UNILM = "MIT (microsoft/unilm)"


@dataclass(frozen=True)
class WeightsEntry:
    """One published file.

    Attributes:
        name: the registry name (what ``init_checkpoint=`` / ``tokenizer.path=`` take).
        url: where the publisher serves it.
        format: one of :data:`FORMATS`.
        description: what it is, in the publisher's words where possible.
        model: our ``model=`` config group whose network it fits (``None``: not a backbone).
        architecture: timm's architecture name of that network (``None``: not a timm model).
        resolution: the input side it was trained at.
        num_classes: classifier / segmentation classes (0: a pre-trained encoder without head).
        licence: the licence it is published under.
        sha256: the file's sha256 if the publisher states it, else ``None`` (not checked).
        source: the page the URL was copied from.
    """

    name: str
    url: str
    format: str
    description: str
    licence: str
    source: str
    model: str | None = None
    architecture: str | None = None
    resolution: int | None = None
    num_classes: int | None = None
    sha256: str | None = None

    @property
    def filename(self) -> str:
        """The file's name in the cache (the URL's last part)."""
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "filename": self.filename}


REGISTRY: dict[str, WeightsEntry] = {}

#: other names of entries: ``dall_e`` is BEiT v1's tokenizer under the name ``tokenizer=dall_e`` uses
ALIASES: dict[str, str] = {"dall_e": "dall_e_encoder"}


def register(entry: WeightsEntry, replace: bool = False) -> WeightsEntry:
    """Add ``entry`` (e.g. your own lab's checkpoint, or a verified sha256) to the registry."""
    if entry.format not in FORMATS:
        raise ValueError(f"{entry.name}: format must be one of {FORMATS}; got {entry.format!r}")
    if entry.name in REGISTRY and not replace:
        raise ValueError(f"{entry.name!r} is registered already; pass replace=True to change it")
    REGISTRY[entry.name] = entry
    return entry


def is_registered(name: str) -> bool:
    """Whether ``name`` is a registry name or alias."""
    return ALIASES.get(name, name) in REGISTRY


def get_entry(name: str) -> WeightsEntry:
    """The entry called ``name``; a ``KeyError`` that lists the close names when there is none."""
    try:
        return REGISTRY[ALIASES.get(name, name)]
    except KeyError:
        close = [n for n in REGISTRY if name.split("_")[0] in n][:8]
        raise KeyError(f"no weights called {name!r} in the registry (beit-lightning-weights list); "
                       f"close names: {', '.join(close) or 'none'}") from None


def list_entries(pattern: str = "") -> list[WeightsEntry]:
    """The entries whose name contains ``pattern``, sorted by name."""
    return [REGISTRY[n] for n in sorted(REGISTRY) if pattern in n]


#: the BEiT input sizes timm has an architecture name for (a segmentation model's encoder is the 224 one)
_TIMM_SIDES = {("base", 224), ("base", 384), ("large", 224), ("large", 384), ("large", 512)}


#: our ``model=`` groups of BEiT v2 (v2's ImageNet mean/std; the same network as v1's): a size without one
#: takes v1's group of that size
_V2_GROUPS = {"base": "beit_v2_base"}


def _beit(name: str, url: str, description: str, source: str, num_classes: int, fmt: str = "official",
          resolution: int | None = None) -> None:
    size = "large" if "_large_" in name else "base"
    side = resolution or int(name.split("_patch16_")[1].split("_")[0])
    side_name = side if fmt == "official" else 0
    family = "beitv2" if name.startswith("beitv2") else "beit"
    register(WeightsEntry(
        name=name, url=url, format=fmt, description=description, licence=_MIT_UNILM, source=source,
        model=_V2_GROUPS.get(size, f"beit_{size}") if family == "beitv2" else f"beit_{size}",
        architecture=f"{family}_{size}_patch16_{side if (size, side_name) in _TIMM_SIDES else 224}",
        resolution=side, num_classes=num_classes,
    ))


_V1 = "https://github.com/microsoft/unilm/blob/master/beit/README.md"
_V2 = "https://github.com/microsoft/unilm/blob/master/beit2/README.md"
for _size in ("base", "large"):
    _beit(f"beit_{_size}_patch16_224_pt22k", f"{_UNILM}beit_{_size}_patch16_224_pt22k.pth",
          f"BEiT-{_size} self-supervised pre-trained on ImageNet-22k (encoder, mask token, LM head)", _V1, 0)
    _beit(f"beit_{_size}_patch16_224_pt22k_ft22k", f"{_UNILM}beit_{_size}_patch16_224_pt22k_ft22k.pth",
          f"BEiT-{_size} pre-trained, then intermediate fine-tuned on ImageNet-22k", _V1, 21841)
    _beit(f"beit_{_size}_patch16_224_pt22k_ft1k", f"{_UNILM}beit_{_size}_patch16_224_pt22k_ft1k.pth",
          f"BEiT-{_size} pre-trained on ImageNet-22k, fine-tuned on ImageNet-1k at 224", _V1, 1000)
    _beit(f"beit_{_size}_patch16_224_pt22k_ft22kto1k", f"{_UNILM}beit_{_size}_patch16_224_pt22k_ft22kto1k.pth",
          f"BEiT-{_size} pre-trained and fine-tuned on ImageNet-22k, then on ImageNet-1k at 224", _V1, 1000)
    _beit(f"beit_{_size}_patch16_384_pt22k_ft22kto1k", f"{_UNILM}beit_{_size}_patch16_384_pt22k_ft22kto1k.pth",
          f"BEiT-{_size} pre-trained and fine-tuned on ImageNet-22k, then on ImageNet-1k at 384", _V1, 1000)
    _beit(f"beit_{_size}_patch16_640_pt22k_ft22ktoade20k", f"{_UNILM}beit_{_size}_patch16_640_pt22k_ft22ktoade20k.pth",
          f"BEiT-{_size} + UperNet on ADE20K (640px crops, 160k iterations) from the 22k fine-tuned encoder", _V1, 150,
          "official_segmentation")
    _beit(f"beitv2_{_size}_patch16_224_pt1k", f"{_BEIT2}beitv2_{_size}_patch16_224_pt1k.pth",
          f"BEiT v2-{_size} pre-trained on ImageNet-1k with VQ-KD targets (encoder, LM head, CLS pre-training layers)",
          _V2, 0)
    _beit(f"beitv2_{_size}_patch16_224_pt1k_ft21k", f"{_BEIT2}beitv2_{_size}_patch16_224_pt1k_ft21k.pth",
          f"BEiT v2-{_size} pre-trained on ImageNet-1k, intermediate fine-tuned on ImageNet-21k", _V2, 21841)
    _beit(f"beitv2_{_size}_patch16_224_pt1k_ft1k", f"{_BEIT2}beitv2_{_size}_patch16_224_pt1k_ft1k.pth",
          f"BEiT v2-{_size} pre-trained and fine-tuned on ImageNet-1k", _V2, 1000)
    _beit(f"beitv2_{_size}_patch16_224_pt1k_ft21kto1k", f"{_BEIT2}beitv2_{_size}_patch16_224_pt1k_ft21kto1k.pth",
          f"BEiT v2-{_size} pre-trained on ImageNet-1k, fine-tuned on ImageNet-21k then ImageNet-1k", _V2, 1000)
    _beit(f"beitv2_{_size}_patch16_224_pt1k_ftade20k", f"{_BEIT2}beitv2_{_size}_patch16_224_pt1k_ftade20k.pth",
          f"BEiT v2-{_size} + UperNet on ADE20K (512px crops, 160k iterations)", _V2, 150, "official_segmentation",
          512)
    _beit(f"beitv2_{_size}_patch16_224_pt1k_ft21ktoade20k",
          f"{_BEIT2}beitv2_{_size}_patch16_224_pt1k_ft21ktoade20k.pth",
          f"BEiT v2-{_size} + UperNet on ADE20K (512px crops) from the 21k fine-tuned encoder", _V2, 150,
          "official_segmentation", 512)
_beit("beit_large_patch16_512_pt22k_ft22kto1k", f"{_UNILM}beit_large_patch16_512_pt22k_ft22kto1k.pth",
      "BEiT-large pre-trained and fine-tuned on ImageNet-22k, then on ImageNet-1k at 512", _V1, 1000)

_TOK = "https://github.com/microsoft/unilm/blob/master/beit2/TOKENIZER.md"
for _file, _teacher in (("vqkd_encoder_base_decoder_1x768x12_clip-d93179da.pth", "CLIP ViT-B/16"),
                        ("vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth", "CLIP ViT-B/16"),
                        ("vqkd_encoder_base_decoder_1x768x12_dino-663c55d7.pth", "DINO ViT-B/16")):
    register(WeightsEntry(
        name=_file.split("-")[0], url=_VQKD + _file, format="official_vqkd", licence=_MIT_UNILM, source=_TOK,
        description=f"BEiT v2's VQ-KD tokenizer (8192 codes, 224px -> 14x14) distilled from {_teacher}",
        resolution=224,
    ))

_DALL_E = "https://github.com/openai/DALL-E (README, notebooks/usage.ipynb)"
register(WeightsEntry(
    name="dall_e_encoder", url="https://cdn.openai.com/dall-e/encoder.pkl", format="openai_encoder",
    description="OpenAI's DALL-E dVAE encoder (8192 codes, 112px -> 14x14): BEiT v1's tokenizer",
    licence="Modified MIT (openai/DALL-E)", source=_DALL_E, resolution=112,
))
register(WeightsEntry(
    name="dall_e_decoder", url="https://cdn.openai.com/dall-e/decoder.pkl", format="openai_decoder",
    description="OpenAI's DALL-E dVAE decoder (tokens -> images; for pictures of target and predicted tokens)",
    licence="Modified MIT (openai/DALL-E)", source=_DALL_E, resolution=112,
))
register(WeightsEntry(
    name="inception_v3_fid",
    url="https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
    format="inception", licence="Apache-2.0 (torch-fidelity; TensorFlow's Inception-v3 of 2015-12-05)",
    source="https://github.com/toshas/torch-fidelity (torch_fidelity/feature_extractor_inceptionv3.py)",
    description="the FID / IS Inception-v3 of torch-fidelity (torchmetrics' FrechetInceptionDistance)",
    resolution=299, num_classes=1008,
))
