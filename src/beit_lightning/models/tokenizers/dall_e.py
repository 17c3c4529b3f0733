"""OpenAI's DALL-E discrete VAE encoder, the tokenizer of BEiT.

The module layout reproduces OpenAI's ``dall_e`` package (``blocks.input``,
``blocks.group_N.block_M.{id_path,res_path.conv_K}``, ``blocks.output.conv``, each conv holding
parameters ``w`` and ``b``), so the published ``encoder.pkl`` loads with a strict state-dict
match. That file is a pickled ``dall_e.encoder.Encoder`` module. :meth:`DallETokenizer.from_openai`
reads it with PyTorch's weights-only unpickler, allowing exactly the classes such a file holds
and mapping them to inert stand-ins: no code from the file runs and the ``dall_e`` package is
not needed.
"""

from __future__ import annotations

import math
import os
import pickle
import re
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...weights.sources import resolve_weights
from .base import VisualTokenizer

LOGIT_LAPLACE_EPS = 0.1


def map_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """DALL-E's input mapping of [0, 1] pixels into [eps, 1 - eps]."""
    return (1 - 2 * eps) * x + eps


def unmap_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """Inverse of :func:`map_pixels`, clamped to [0, 1]."""
    return torch.clamp((x - eps) / (1 - 2 * eps), 0, 1)


class DallEConv2d(nn.Module):
    """A 'same'-padded convolution with parameters named ``w`` and ``b`` as in ``dall_e``."""

    def __init__(self, n_in: int, n_out: int, kw: int) -> None:
        super().__init__()
        if kw % 2 != 1:
            raise ValueError(f"kernel width must be odd; got {kw}")
        self.kw = kw
        self.w = nn.Parameter(torch.empty(n_out, n_in, kw, kw))
        self.b = nn.Parameter(torch.zeros(n_out))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.w.normal_(std=1 / math.sqrt(self.w.shape[1] * self.kw**2))
            self.b.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w, self.b, padding=(self.kw - 1) // 2)


class DallEResidualBlock(nn.Module):
    """Residual block of the DALL-E family: identity (or 1x1 conv) path plus a gain-scaled
    bottleneck of four convolutions (``relu_k``/``conv_k``, as OpenAI names them)."""

    #: kernel sizes of conv_1..conv_4
    kernel_sizes: tuple[int, int, int, int] = (3, 3, 3, 1)

    def __init__(self, n_in: int, n_out: int, n_layers: int) -> None:
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1 / (n_layers**2)
        self.id_path = DallEConv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = [n_in, n_hid, n_hid, n_hid, n_out]
        layers: list[tuple[str, nn.Module]] = []
        for k, kw in enumerate(self.kernel_sizes, start=1):
            layers += [(f"relu_{k}", nn.ReLU()), (f"conv_{k}", DallEConv2d(widths[k - 1], widths[k], kw))]
        self.res_path = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DallEEncoderBlock(DallEResidualBlock):
    """Encoder block: three 3x3 convolutions then a 1x1."""

    kernel_sizes = (3, 3, 3, 1)


class DallEDecoderBlock(DallEResidualBlock):
    """Decoder block: a 1x1 convolution then three 3x3."""

    kernel_sizes = (1, 3, 3, 3)


def _residual_groups(
    block: type[DallEResidualBlock],
    widths: list[int],
    n_blk_per_group: int,
    n_layers: int,
    resample_name: str,
    resample: Callable[[], nn.Module],
) -> list[tuple[str, nn.Module]]:
    """``group_1``..``group_N`` of the encoder or decoder: group g goes from ``widths[g-1]`` to
    ``widths[g]`` channels, and every group but the last ends with a resampling layer. The module
    names are OpenAI's, so that the published state dict loads unchanged."""
    groups: list[tuple[str, nn.Module]] = []
    for g in range(1, len(widths)):
        group: list[tuple[str, nn.Module]] = [
            (f"block_{i + 1}", block(widths[g - 1] if i == 0 else widths[g], widths[g], n_layers)) for i in range(n_blk_per_group)
        ]
        if g < len(widths) - 1:
            group.append((resample_name, resample()))
        groups.append((f"group_{g}", nn.Sequential(OrderedDict(group))))
    return groups


class DallEEncoder(nn.Module):
    """The dVAE encoder: 7x7 stem, four groups of residual blocks (three 2x max-pools), 1x1 logits.

    Widths are ``n_hid`` x (1, 2, 4, 8); the grid is the input side / 8.
    """

    group_count = 4

    def __init__(self, n_hid: int = 256, n_blk_per_group: int = 2, vocab_size: int = 8192, input_channels: int = 3):
        super().__init__()
        if n_hid < 4 or n_hid % 4:
            raise ValueError(f"n_hid must be a positive multiple of 4; got {n_hid}")
        self.n_hid, self.n_blk_per_group = n_hid, n_blk_per_group
        self.vocab_size, self.input_channels = vocab_size, input_channels
        n_layers = self.group_count * n_blk_per_group
        widths = [n_hid, n_hid, 2 * n_hid, 4 * n_hid, 8 * n_hid]
        layers: list[tuple[str, nn.Module]] = [("input", DallEConv2d(input_channels, n_hid, 7))]
        layers += _residual_groups(DallEEncoderBlock, widths, n_blk_per_group, n_layers, "pool", lambda: nn.MaxPool2d(kernel_size=2))
        layers.append(("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", DallEConv2d(8 * n_hid, vocab_size, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.input_channels:
            raise ValueError(f"expected B x {self.input_channels} x H x W input; got {tuple(x.shape)}")
        return self.blocks(x)


class DallEDecoder(nn.Module):
    """The dVAE decoder: 1x1 stem from (relaxed) one-hot codes, four groups of residual blocks
    with three 2x nearest upsamplings, and a 1x1 head giving 2 values per channel (the location
    and log-scale of DALL-E's logit-Laplace pixel distribution). Widths n_hid x (8, 4, 2, 1)."""

    group_count = 4

    def __init__(
        self, n_init: int = 128, n_hid: int = 256, n_blk_per_group: int = 2, vocab_size: int = 8192, output_channels: int = 3
    ) -> None:
        super().__init__()
        n_layers = self.group_count * n_blk_per_group
        widths = [n_init, 8 * n_hid, 4 * n_hid, 2 * n_hid, n_hid]
        layers: list[tuple[str, nn.Module]] = [("input", DallEConv2d(vocab_size, n_init, 1))]
        layers += _residual_groups(
            DallEDecoderBlock, widths, n_blk_per_group, n_layers, "upsample", lambda: nn.Upsample(scale_factor=2, mode="nearest")
        )
        layers.append(("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", DallEConv2d(n_hid, 2 * output_channels, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(layers))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.blocks(z)


class DallETokenizer(VisualTokenizer):
    """DALL-E dVAE encoder as a BEiT tokenizer: ``encode`` maps pixels, runs the encoder, takes argmax.

    Args:
        n_hid, n_blk_per_group, vocab_size, input_channels: encoder size (OpenAI: 256, 2, 8192, 3).
        image_size: side of the tokenizer view (BEiT: 112 for a 14x14 grid).
        seed: seed of the initial weights, so that an untrained encoder is reproducible.
        precision, channels_last, compile: how ``encode`` runs (:meth:`configure_inference`).
    """

    downsample = 8

    def __init__(
        self,
        n_hid: int = 256,
        n_blk_per_group: int = 2,
        vocab_size: int = 8192,
        input_channels: int = 3,
        image_size: int = 112,
        seed: int | None = None,
        precision: str = "fp32",
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if image_size % self.downsample:
            raise ValueError(f"image_size must be a multiple of {self.downsample}; got {image_size}")
        self.vocab_size = vocab_size
        self.image_size = image_size
        # OpenAI's decoder (decoder.pkl), when loaded by from_openai: then decode() turns tokens into images
        self.decoder: DallEDecoder | None = None
        if seed is None:
            self.encoder = DallEEncoder(n_hid, n_blk_per_group, vocab_size, input_channels)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.encoder = DallEEncoder(n_hid, n_blk_per_group, vocab_size, input_channels)
        self.configure_inference(precision, channels_last, compile)

    def encode_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(map_pixels(images))

    @property
    def can_decode(self) -> bool:
        return self.decoder is not None

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (``B x 3 x H x W``) from tokens ``B x h x w``, as OpenAI's usage: the
        decoder on one-hot codes, the sigmoid of the location channels, ``unmap_pixels``. Needs the
        decoder (``from_openai(..., decoder_path=...)``)."""
        if self.decoder is None:
            raise RuntimeError("this DallETokenizer has no decoder: load OpenAI's decoder.pkl with "
                               "DallETokenizer.from_openai(encoder_path, decoder_path=...)")
        one_hot = F.one_hot(tokens.long(), self.vocab_size).permute(0, 3, 1, 2).float()
        stats = self.decoder(one_hot).float()
        return unmap_pixels(torch.sigmoid(stats[:, :3]))

    @classmethod
    def from_openai(
        cls,
        path: str | os.PathLike,
        image_size: int = 112,
        vocab_size: int | None = None,
        map_location: Any = "cpu",
        decoder_path: str | os.PathLike | None = None,
        precision: str = "fp32",
        channels_last: bool = False,
        compile: bool = False,
    ) -> DallETokenizer:
        """Load OpenAI's published ``encoder.pkl`` (and optionally ``decoder.pkl``, for pictures
        decoded from tokens) without the ``dall_e`` package and without running any code from the
        files. ``vocab_size``, when given, is checked against the file.

        ``path`` and ``decoder_path`` are local files, ``http(s)`` URLs or registry names
        (``dall_e_encoder``, ``dall_e_decoder``; :mod:`beit_lightning.weights`): a name or URL is
        downloaded once into the cache, or named with the place to put it when there is no network."""
        path = resolve_weights(path)
        decoder_path = resolve_weights(decoder_path) if decoder_path is not None else None
        state, sizes = read_openai_encoder(path, map_location=map_location)
        if vocab_size is not None and vocab_size != sizes["vocab_size"]:
            raise ValueError(f"{os.fspath(path)!r} has {sizes['vocab_size']} codes, not vocab_size={vocab_size}")
        tokenizer = cls(image_size=image_size, precision=precision, channels_last=channels_last, compile=compile, **sizes)
        tokenizer.encoder.load_state_dict(state, strict=True)
        if decoder_path is not None:
            dec_state, dec_sizes = read_openai_decoder(decoder_path, map_location=map_location)
            if dec_sizes["vocab_size"] != sizes["vocab_size"]:
                raise ValueError(f"the decoder {os.fspath(decoder_path)!r} has {dec_sizes['vocab_size']} codes but the "
                                 f"encoder has {sizes['vocab_size']}: use the decoder.pkl published with encoder.pkl")
            tokenizer.decoder = DallEDecoder(**dec_sizes).requires_grad_(False)
            tokenizer.decoder.load_state_dict(dec_state, strict=True)
        return tokenizer


# --- reading OpenAI's pickled encoder --------------------------------------------------------

class _PickledModule:
    """Inert holder of the attributes of one pickled module; no method of the original runs."""

    pickled_name = ""

    def __setstate__(self, state: dict) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"unexpected state of type {type(state).__name__} for {self.pickled_name}")
        self.__dict__.update(state)


#: the classes that OpenAI's decoder.pkl holds
OPENAI_DECODER_CLASSES = (
    "dall_e.decoder.Decoder",
    "dall_e.decoder.DecoderBlock",
    "dall_e.utils.Conv2d",
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.upsampling.Upsample",
    "torch.nn.modules.linear.Identity",
)

#: the classes that OpenAI's encoder.pkl holds (besides tensors, OrderedDict and torch.device)
OPENAI_ENCODER_CLASSES = (
    "dall_e.encoder.Encoder",
    "dall_e.encoder.EncoderBlock",
    "dall_e.utils.Conv2d",
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.pooling.MaxPool2d",
    "torch.nn.modules.linear.Identity",
)
_STAND_INS = {
    name: type(f"Pickled_{name.rsplit('.', 1)[-1]}", (_PickledModule,), {"pickled_name": name})
    for name in dict.fromkeys(OPENAI_ENCODER_CLASSES + OPENAI_DECODER_CLASSES)
}


def _flatten_parameters(node: _PickledModule, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, param in (getattr(node, "_parameters", None) or {}).items():
        if param is not None:
            out[prefix + name] = param.detach()
    for name, child in (getattr(node, "_modules", None) or {}).items():
        if child is not None:
            out.update(_flatten_parameters(child, f"{prefix}{name}."))
    return out


def read_openai_encoder(path: str | os.PathLike, map_location: Any = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Return ``(state_dict, sizes)`` of OpenAI's pickled dVAE encoder at ``path``.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the offending
    global for any file that holds something other than an OpenAI encoder.
    """
    path = os.fspath(path)
    root = _read_openai_pickle(path, "encoder", OPENAI_ENCODER_CLASSES, map_location)
    state = {f"blocks.{k}" if not k.startswith("blocks.") else k: v for k, v in _flatten_parameters(root).items()}
    try:
        n_hid, input_channels = state["blocks.input.w"].shape[:2]
        vocab_size = state["blocks.output.conv.w"].shape[0]
    except KeyError as err:
        raise ValueError(f"{path!r} lacks the encoder parameter {err.args[0]}; is it a DALL-E encoder?") from None
    n_blk_per_group = sum(1 for k in state if k.startswith("blocks.group_1.") and k.endswith("res_path.conv_1.w"))
    sizes = dict(n_hid=int(n_hid), n_blk_per_group=n_blk_per_group, vocab_size=int(vocab_size), input_channels=int(input_channels))
    return {k: v.float() for k, v in state.items()}, sizes


def _read_openai_pickle(path: str, kind: str, classes: tuple[str, ...], map_location: Any) -> _PickledModule:
    """The root module of OpenAI's pickled ``{kind}.pkl``, read with only ``classes`` allowed."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"DALL-E {kind} file not found: {path!r} (OpenAI publishes it as {kind}.pkl)")
    allowed = [(_STAND_INS[name], name) for name in classes]
    try:
        with torch.serialization.safe_globals(allowed):
            root = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if "GLOBAL" in ln or "Unsupported" in ln]
        reason = re.sub(r"\. Please use .*", "", lines[0]) if lines else str(err).splitlines()[0]
        raise ValueError(
            f"refusing to load {path!r}: it is not an OpenAI DALL-E {kind}.pkl or it holds objects such a file "
            f"never holds ({reason}). Only these classes are accepted: {', '.join(classes)}."
        ) from None
    expected = f"dall_e.{kind}.{kind.capitalize()}"
    if getattr(root, "pickled_name", None) != expected:
        raise ValueError(f"{path!r} does not hold a {expected} (found {getattr(root, 'pickled_name', type(root).__name__)})")
    return root


def read_openai_decoder(path: str | os.PathLike, map_location: Any = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Return ``(state_dict, sizes)`` of OpenAI's pickled dVAE decoder (``decoder.pkl``) for
    :class:`DallEDecoder`; the same safety as :func:`read_openai_encoder`."""
    path = os.fspath(path)
    root = _read_openai_pickle(path, "decoder", OPENAI_DECODER_CLASSES, map_location)
    state = {f"blocks.{k}" if not k.startswith("blocks.") else k: v for k, v in _flatten_parameters(root).items()}
    try:
        n_init, vocab_size = state["blocks.input.w"].shape[:2]
        out2, n_hid = state["blocks.output.conv.w"].shape[:2]
    except KeyError as err:
        raise ValueError(f"{path!r} lacks the decoder parameter {err.args[0]}; is it a DALL-E decoder?") from None
    n_blk_per_group = sum(1 for k in state if k.startswith("blocks.group_1.") and k.endswith("res_path.conv_1.w"))
    sizes = dict(n_init=int(n_init), n_hid=int(n_hid), n_blk_per_group=n_blk_per_group, vocab_size=int(vocab_size),
                 output_channels=int(out2) // 2)
    return {k: v.float() for k, v in state.items()}, sizes
