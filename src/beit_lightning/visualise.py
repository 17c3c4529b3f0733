"""Pictures of what a run learns, as uint8 ``H x W x 3`` arrays (no plotting library needed):
masked images, token maps, attention maps, confusion matrices, codebook usage, and the grid and
logger plumbing that :class:`~beit_lightning.callbacks.ValidationImages` and the notebooks share.

A picture in the logs must read without the code: :func:`titled_grid` puts a title over each
column, optional titles over the rows and a legend under the grid, and enlarges small cells
(nearest neighbour) so that a 32px or 64px image is seen at ``min_size`` pixels. Text is drawn with
Pillow's built-in font (no font files).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "RIGHT_WRONG_COLOURS",
    "attention_maps",
    "bar_chart",
    "class_palette",
    "colour_map",
    "colour_scale",
    "confusion_image",
    "heatmap",
    "hstack",
    "log_image",
    "masked_image",
    "right_wrong_map",
    "text_band",
    "titled_grid",
    "token_colours",
    "to_uint8",
    "upscale",
    "vstack",
]

#: colours of :func:`right_wrong_map`: green = right, red = wrong, white = not predicted
RIGHT_WRONG_COLOURS = torch.tensor([[40, 170, 60], [215, 45, 45], [255, 255, 255]], dtype=torch.uint8)


def token_colours(num: int, seed: int = 0) -> torch.Tensor:
    """A fixed random colour per code or class (``num x 3`` uint8): the same code has the same
    colour in every picture of a run."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(32, 256, (num, 3), generator=generator, dtype=torch.uint8)


def class_palette(num_classes: int, seed: int = 0) -> torch.Tensor:
    """:func:`token_colours` plus black for ignored pixels (the last row, index ``num_classes``)."""
    return torch.cat([token_colours(num_classes, seed), torch.zeros(1, 3, dtype=torch.uint8)])


def to_uint8(image: torch.Tensor, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> torch.Tensor:
    """``3 x H x W`` float (normalised with ``mean``/``std``, or in [0, 1]) -> ``H x W x 3`` uint8."""
    image = image.detach().float().cpu()
    if mean is not None and std is not None:
        image = image * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)


def _upscale(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``h x w (x c)`` -> ``H x W (x c)`` by nearest neighbour (cells stay sharp)."""
    x = grid.float()
    x = x[None, None] if x.ndim == 2 else x.permute(2, 0, 1)[None]
    x = F.interpolate(x, size=size, mode="nearest")[0]
    return x[0] if grid.ndim == 2 else x.permute(1, 2, 0)


def colour_map(labels: torch.Tensor, palette: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """A ``h x w`` map of codes or classes in their colours (``H x W x 3`` uint8); values outside
    the palette (e.g. 255 for ignored pixels) take its last colour."""
    labels = labels.detach().long().cpu()
    labels = torch.where((labels < 0) | (labels >= len(palette)), len(palette) - 1, labels)
    out = palette[labels]
    return _upscale(out, size).to(torch.uint8) if size is not None else out


def masked_image(image: torch.Tensor, mask: torch.Tensor, grey: int = 128) -> torch.Tensor:
    """The image (``H x W x 3`` uint8) with the masked patches (``mask``: ``h x w`` bool) greyed out."""
    cover = _upscale(mask.detach().cpu().float(), tuple(image.shape[:2])).bool()
    out = image.clone()
    out[cover] = grey
    return out


def heatmap(values: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """A ``h x w`` map scaled to its own range as a dark-blue -> yellow image (``H x W x 3`` uint8)."""
    v = values.detach().float().cpu()
    v = (v - v.min()) / (v.max() - v.min()).clamp(min=1e-12)
    out = torch.stack([v, v ** 0.5 * 0.9, (1 - v) * 0.6 + 0.1 * v], dim=-1)
    out = (out * 255).round().to(torch.uint8)
    return _upscale(out, size).to(torch.uint8) if size is not None else out


def _pad_to(image: torch.Tensor, height: int | None = None, width: int | None = None) -> torch.Tensor:
    h, w = image.shape[:2]
    return F.pad(image.permute(2, 0, 1), (0, (width or w) - w, 0, (height or h) - h), value=255).permute(1, 2, 0)


def _stack(images: Sequence[torch.Tensor], dim: int, gap: int) -> torch.Tensor:
    """Images along ``dim`` (1: side by side, 0: one above the other) with white gaps, each padded
    on the other axis to the largest size."""
    other = 1 - dim
    size = max(i.shape[other] for i in images)
    parts = []
    for n, image in enumerate(images):
        parts.append(_pad_to(image, **({"height": size} if other == 0 else {"width": size})))
        if gap and n < len(images) - 1:
            shape = [0, 0, 3]
            shape[dim], shape[other] = gap, size
            parts.append(torch.full(tuple(shape), 255, dtype=torch.uint8))
    return torch.cat(parts, dim=dim)


def hstack(images: Sequence[torch.Tensor], gap: int = 2) -> torch.Tensor:
    """Images side by side (white gaps; shorter ones padded at the bottom)."""
    return _stack(images, 1, gap)


def vstack(images: Sequence[torch.Tensor], gap: int = 2) -> torch.Tensor:
    """Images one above the other (white gaps; narrower ones padded on the right)."""
    return _stack(images, 0, gap)


def right_wrong_map(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                    size: tuple[int, int] | None = None) -> torch.Tensor:
    """Where a prediction is right (green) or wrong (red) at the positions of ``mask`` (``h x w``
    bool), white elsewhere (:data:`RIGHT_WRONG_COLOURS`), as an ``H x W x 3`` uint8 image."""
    status = torch.where(predicted.cpu() == target.cpu(), 0, 1)
    return colour_map(torch.where(mask.cpu().bool(), status, 2), RIGHT_WRONG_COLOURS, size)


# --- text, titles and legends ----------------------------------------------------------------
def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _wrap(text: str, font, width: int) -> list[str]:
    """Greedy word wrap of ``text`` (``\\n`` starts a new line) to lines at most ``width`` px wide
    (a single word longer than that stays on its own line)."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and font.getlength(candidate) > width:
                lines.append(line)
                candidate = word
            line = candidate
        lines.append(line)
    return lines


def text_band(text: str, width: int, size: int = 14, centre: bool = False) -> torch.Tensor:
    """``text`` in black on a white band ``width`` px wide (``H x W x 3`` uint8), wrapped to the
    width, left-aligned or centred; the band is as tall as its lines."""
    from PIL import Image, ImageDraw

    font = _font(size)
    lines = _wrap(text, font, max(1, width - 4))
    line_height = size + size // 3
    band = Image.new("RGB", (width, line_height * len(lines) + 4), "white")
    draw = ImageDraw.Draw(band)
    for n, line in enumerate(lines):
        left = max(0, (width - font.getlength(line)) / 2) if centre else 2
        draw.text((left, 2 + n * line_height), line, fill=(0, 0, 0), font=font)
    return torch.from_numpy(np.asarray(band).copy())


def colour_scale(width: int, height: int = 12, low: str = "low", high: str = "high", size: int = 14) -> torch.Tensor:
    """The :func:`heatmap` colours from lowest to highest as a bar, ``low`` and ``high`` written at
    its ends (``H x W x 3`` uint8, ``width`` px wide): the key of a heat map."""
    font = _font(size)
    ends = [text_band(t, int(font.getlength(t)) + 6, size) for t in (low, high)]
    bar_width = max(8, width - sum(e.shape[1] for e in ends) - 8)
    bar = heatmap(torch.linspace(0, 1, bar_width)[None].expand(height, bar_width))
    line = max(e.shape[0] for e in ends)
    bar = F.pad(bar.permute(2, 0, 1), (0, 0, (line - height) // 2, 0), value=255).permute(1, 2, 0)
    return hstack([ends[0], bar, ends[1]], gap=4)


def upscale(image: torch.Tensor, min_size: int = 160) -> torch.Tensor:
    """``image`` (``H x W x 3`` uint8) enlarged by the smallest whole factor that makes its short
    side at least ``min_size`` (nearest neighbour: patches stay sharp squares); unchanged if it is
    already that large."""
    return _enlarge(image, _factor(image, min_size))


def _factor(image: torch.Tensor, min_size: int) -> int:
    return max(1, -(-min_size // max(1, min(image.shape[:2]))))


def _enlarge(image: torch.Tensor, factor: int) -> torch.Tensor:
    return image if factor == 1 else image.repeat_interleave(factor, 0).repeat_interleave(factor, 1)


def titled_grid(rows: Sequence[Sequence[torch.Tensor]], titles: Sequence[str], legend: str | None = None,
                row_titles: Sequence[str] | None = None, min_size: int = 160, gap: int = 4,
                text_size: int = 14) -> torch.Tensor:
    """A grid of pictures (``rows[r][c]``: ``H x W x 3`` uint8) that reads on its own: ``titles``
    over the columns, ``row_titles`` (if given) over each row, ``legend`` (saying what the colours
    mean) under the grid. All cells are enlarged by one whole factor (:func:`upscale`) so the
    smallest is at least ``min_size`` px; cells of a column are padded to its widest."""
    if not rows or any(len(row) != len(titles) for row in rows):
        raise ValueError(f"titled_grid needs one title per column: {len(titles)} titles for rows of "
                         f"{sorted({len(r) for r in rows})} pictures")
    if row_titles is not None and len(row_titles) != len(rows):
        raise ValueError(f"titled_grid got {len(row_titles)} row titles for {len(rows)} rows")
    factor = max(_factor(c, min_size) for row in rows for c in row)  # the smallest cell sets it
    cells = [[_enlarge(c, factor) for c in row] for row in rows]
    widths = [max(row[c].shape[1] for row in cells) for c in range(len(titles))]
    header = hstack([text_band(t, w, text_size, centre=True) for t, w in zip(titles, widths, strict=True)], gap)
    parts = [header]
    for r, row in enumerate(cells):
        body = hstack([_pad_to(c, width=w) for c, w in zip(row, widths, strict=True)], gap)
        if row_titles is not None:
            parts.append(text_band(row_titles[r], body.shape[1], text_size))
        parts.append(body)
    if legend:
        parts.append(text_band(legend, header.shape[1], text_size))
    return vstack(parts, gap)


@torch.no_grad()
def attention_maps(backbone: nn.Module, images: torch.Tensor, block: int = -1, query: int = 0) -> torch.Tensor:
    """Attention of token ``query`` (0: the CLS token; ``1 + i``: patch ``i``) over the patches in
    ``block`` of a timm ViT/BEiT: ``B x heads x h x w`` (each head's map sums to at most 1).

    The block's attention is run once unfused for this call (timm's ``fused_attn`` off) and its
    probabilities are read where timm applies attention dropout, so nothing is re-implemented.
    """
    blocks = getattr(backbone, "blocks", None)
    if blocks is None:
        raise TypeError(f"{type(backbone).__name__} has no transformer blocks to read attention from")
    attn = getattr(blocks[block], "attn", None)
    grid = getattr(getattr(backbone, "patch_embed", None), "grid_size", None)
    if not hasattr(attn, "attn_drop") or not hasattr(attn, "fused_attn") or grid is None:
        # e.g. XCiT: its blocks attend across channels, not tokens; there is no patch attention map
        raise TypeError(f"{type(backbone).__name__} has no token attention of timm's kind to draw")
    seen: list[torch.Tensor] = []
    handle = attn.attn_drop.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].detach()))
    fused, attn.fused_attn = attn.fused_attn, False
    was_training = backbone.training
    try:
        backbone.eval()
        backbone.forward_features(images)
    finally:
        attn.fused_attn = fused
        handle.remove()
        backbone.train(was_training)
    probs = seen[-1][:, :, query]  # B x heads x tokens
    prefix = probs.shape[-1] - grid[0] * grid[1]
    return probs[..., prefix:].reshape(probs.shape[0], probs.shape[1], *grid).float().cpu()


def confusion_image(confusion: torch.Tensor, cell: int = 0, size: int = 256) -> torch.Tensor:
    """A confusion matrix (rows: true class, columns: prediction), each row normalised, as a
    heat map (``H x W x 3`` uint8) with a thin white diagonal tick for orientation."""
    c = confusion.detach().double().cpu()
    rows = c / c.sum(1, keepdim=True).clamp(min=1)
    n = c.shape[0]
    cell = cell or max(1, size // n)
    image = heatmap(rows.float(), (n * cell, n * cell))
    if cell >= 4:
        for i in range(n):
            image[i * cell + cell // 2, i * cell : i * cell + 1] = 255
    return image


def bar_chart(values: torch.Tensor, height: int = 96, sort: bool = True) -> torch.Tensor:
    """Bars of ``values`` (e.g. how often each code was used), tallest first when ``sort`` (a
    codebook's usage curve), one pixel per bar for long vectors (``H x W x 3`` uint8)."""
    v = values.detach().double().cpu()
    if sort:
        v = v.sort(descending=True).values
    width = max(1, min(4, 512 // max(1, len(v))))
    top = v.max().clamp(min=1e-12)
    image = torch.full((height, len(v) * width, 3), 255, dtype=torch.uint8)
    for i, value in enumerate(v.tolist()):
        h = int(round(height * value / float(top)))
        if h:
            image[height - h :, i * width : (i + 1) * width] = torch.tensor([40, 90, 170], dtype=torch.uint8)
    return image


def log_image(trainer, tag: str, image: torch.Tensor, step: int | None = None) -> str | None:
    """Send ``image`` (``H x W x 3`` uint8) to every logger that takes images (TensorBoard's
    ``add_image``) and write it as ``<log dir>/images/<tag>-step<N>.png`` beside the CSV logs;
    return the PNG's path (``None`` when the trainer has no logger)."""
    from PIL import Image

    step = trainer.global_step if step is None else step
    array = image.detach().cpu().numpy().astype(np.uint8)
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image(tag, array, step, dataformats="HWC")
    from pytorch_lightning.loggers import CSVLogger

    csv = [lg.log_dir for lg in trainer.loggers if isinstance(lg, CSVLogger)]
    folder = csv[0] if csv else (trainer.log_dir if trainer.loggers else None)
    if not folder:  # no logger: nothing is written (not into the working directory)
        return None
    folder = os.path.join(folder, "images")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{tag.replace('/', '_')}-step{step:07d}.png")
    Image.fromarray(array).save(path)
    return path
