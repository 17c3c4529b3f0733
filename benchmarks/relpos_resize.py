"""The relative position table resize: timm's linear interpolation (what our checkpoint loading
uses) against the official BEiT segmentation code's cubic one, both on BEiT's geometric grid.

BEiT's ``mmcv_custom/checkpoint.py`` places the source table's ``2s-1`` offsets on a geometric
progression that spans the target's ``2d-1`` offsets and interpolates each head with SciPy's
``interp2d(kind='cubic')``. ``interp2d`` is gone from SciPy (1.14); on gridded data it was a
FITPACK interpolating spline (``regrid`` with ``s=0``), which is exactly
``RectBivariateSpline(y, x, z, kx=3, ky=3, s=0)``, evaluated here on the same grid (points past the
outermost source offset are clamped to it, as both evaluate). Checked with SciPy 1.13.1, the last
with ``interp2d``: on these tables the two agree to 3e-15. timm's ``resize_rel_pos_bias_table``
(``timm.layers.pos_embed_rel``) uses the same grid with its torch ``RegularGridInterpolator``:
linear, unless ``TIMM_USE_SCIPY_INTERP=1``, which calls the removed ``interp2d``.

The table is a trained-looking synthetic one (no checkpoint is needed): per head a peak or a dip
at offset 0, a directional slope, smooth low-frequency structure and a little fine noise, of the
size of a BEiT-B table (a few units). Give ``--checkpoint`` an official ``.pth`` (or any state dict
with a ``relative_position_bias_table``) to use its tables instead. Printed: the differences
between the two resizes relative to the table's standard deviation and range, and what they do to
the attention of a 40x40 window (the softmax of the bias alone, per query: total variation).

    python benchmarks/relpos_resize.py            # 14x14 -> 40x40 (27x27 -> 79x79 per head), 12 heads
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import torch
from timm.layers.pos_embed_rel import resize_rel_pos_bias_table
from timm.models.beit import gen_relative_position_index

try:
    from scipy.interpolate import RectBivariateSpline
except ImportError:  # pragma: no cover - the dev extra has it
    raise SystemExit("benchmarks/relpos_resize.py needs SciPy for the official cubic resize: pip install scipy "
                     "(or the project's dev extra)") from None

EXTRA = 3  # BEiT's cls-to-token, token-to-cls and cls-to-cls entries at the end of the table


def geometric_ratio(src: int, dst: int) -> float:
    """BEiT's ratio ``q``: ``src // 2`` steps 1, q, q^2, ... reach ``dst // 2`` (bisection to 1e-6)."""
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2
        if (1 - q ** (src // 2)) / (1 - q) > dst // 2:
            right = q
        else:
            left = q
    return q


def geometric_offsets(src: int, dst: int) -> np.ndarray:
    """BEiT's positions of the source table's offsets: 0 and cumulative steps 1, q, q^2, ... each side."""
    q = geometric_ratio(src, dst)
    steps = np.cumsum([q ** i for i in range(src // 2)])  # 1, 1 + q, 1 + q + q^2, ...
    return np.concatenate([-steps[::-1], [0.0], steps])


def synthetic_table(window: int, heads: int, seed: int) -> torch.Tensor:
    """A ``(2w-1)^2 + 3 x heads`` table shaped like a trained one (see the module docstring)."""
    rng = np.random.default_rng(seed)
    side = 2 * window - 1
    y, x = np.meshgrid(np.arange(side) - window + 1, np.arange(side) - window + 1, indexing="ij")
    cols = []
    for _ in range(heads):
        width = rng.uniform(1.0, 4.0)
        bump = rng.choice([-1, 1]) * rng.uniform(1.0, 4.0) * np.exp(-(x ** 2 + y ** 2) / (2 * width ** 2))
        angle = rng.uniform(0, 2 * np.pi)
        slope = rng.uniform(0.0, 1.5) * (np.cos(angle) * x + np.sin(angle) * y) / window
        freq = np.fft.fftfreq(side)
        spectrum = np.fft.fft2(rng.standard_normal((side, side)))
        spectrum *= np.exp(-(freq[:, None] ** 2 + freq[None] ** 2) / (2 * 0.06 ** 2))  # low frequencies only
        smooth = np.fft.ifft2(spectrum).real
        smooth *= rng.uniform(0.3, 1.0) / smooth.std()
        cols.append(bump + slope + smooth + 0.05 * rng.standard_normal((side, side)))
    table = torch.tensor(np.stack(cols, -1).reshape(side * side, heads), dtype=torch.float32)
    return torch.cat([table, torch.randn(EXTRA, heads)])


def checkpoint_table(path: str) -> torch.Tensor:
    """The first ``relative_position_bias_table`` of a checkpoint (the shared one of a pre-trained BEiT)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "module"):
        state = state.get(key, state) if isinstance(state, dict) else state
    names = sorted(k for k in state if k.endswith("relative_position_bias_table"))
    if not names:
        raise SystemExit(f"{path} holds no relative_position_bias_table: give a BEiT checkpoint")
    print(f"table: {names[0]} of {path}")
    return state[names[0]].float()


def cubic_resize(table: torch.Tensor, src_window: int, dst_window: int) -> torch.Tensor:
    """The official resize with ``RectBivariateSpline`` in place of ``interp2d(kind='cubic')``."""
    src, dst = 2 * src_window - 1, 2 * dst_window - 1
    offsets = geometric_offsets(src, dst)
    targets = np.arange(-(dst // 2), dst // 2 + 0.1, 1.0)
    heads = []
    for h in range(table.shape[1]):
        z = table[:-EXTRA, h].reshape(src, src).double().numpy()  # rows: y offsets, columns: x offsets
        heads.append(RectBivariateSpline(offsets, offsets, z, kx=3, ky=3, s=0)(targets, targets).reshape(-1))
    resized = torch.tensor(np.stack(heads, -1), dtype=torch.float32)
    return torch.cat([resized, table[-EXTRA:]])


def bias_attention(table: torch.Tensor, window: int) -> torch.Tensor:
    """Attention (``heads x queries x keys``) of a ``window x window`` grid plus the cls token when
    the logits are the relative position bias alone."""
    index = gen_relative_position_index((window, window))
    return table[index.view(-1)].view(*index.shape, -1).permute(2, 0, 1).softmax(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=int, default=14, help="source window (224px / 16px patches: 14)")
    parser.add_argument("--dst", type=int, default=40, help="target window (640px crops: 40; 512px: 32)")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--checkpoint", help="use the table of this BEiT checkpoint instead of synthetic ones")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning, module="timm.layers.interpolate")
    side = 2 * args.dst - 1
    tables = [checkpoint_table(args.checkpoint)] if args.checkpoint else [
        synthetic_table(args.src, args.heads, s) for s in args.seeds]
    print(f"{args.src}x{args.src} -> {args.dst}x{args.dst} window ({2 * args.src - 1}^2 -> {side}^2 table per head, "
          f"{tables[0].shape[1]} heads); geometric ratio q = {geometric_ratio(2 * args.src - 1, side):.5f}, outermost "
          f"source offset {geometric_offsets(2 * args.src - 1, side)[-1]:.4f} (target {args.dst - 1})")
    for n, table in enumerate(tables):
        linear = resize_rel_pos_bias_table(table, (args.dst, args.dst), (side * side + EXTRA, table.shape[1]))
        cubic = cubic_resize(table, args.src, args.dst)
        core, diff = table[:-EXTRA], (linear - cubic)[:-EXTRA].abs()
        scale, span = core.std().item(), (core.max() - core.min()).item()
        centre = (side * side) // 2
        assert torch.allclose(linear[centre], cubic[centre], atol=1e-5), "offset 0 is a node of both: it must stay"
        where = divmod(int(diff.max(-1).values.argmax()), side)
        tv = 0.5 * (bias_attention(linear, args.dst) - bias_attention(cubic, args.dst)).abs().sum(-1)
        print(f"table {n}: std {scale:.3f}, range {span:.3f} | |linear - cubic|: max {diff.max():.4f} "
              f"({diff.max() / scale:.1%} of std, {diff.max() / span:.1%} of range), mean {diff.mean():.4f} "
              f"({diff.mean() / scale:.2%} of std); largest at offset (dy, dx) = "
              f"({where[0] - side // 2}, {where[1] - side // 2}) | attention total variation: mean {tv.mean():.4f}, max {tv.max():.4f}")


if __name__ == "__main__":
    main()
