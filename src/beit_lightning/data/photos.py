"""Synthetic photographs with natural-image statistics, for benchmarks and pixel-difference tests.

Flat shapes on noise compress and resample unlike photographs; what matters for the cost of a
JPEG decode and for resampling differences is the spectrum (about 1/f in amplitude), correlated
colour channels, smooth regions and sharp occluding edges. :func:`natural_image` builds one as a
dead-leaves picture (overlapping discs and boxes of flat, correlated colours: edges and smooth
regions) shaded by a 1/f^alpha noise field (texture at all scales) with a small, smoother chroma
noise. Deterministic from its seed.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def pink_noise(height: int, width: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """A zero-mean, unit-std field with an amplitude spectrum of ``1 / f**alpha``."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0
    spectrum = (rng.standard_normal(f.shape) + 1j * rng.standard_normal(f.shape)) / f**alpha
    spectrum[0, 0] = 0.0
    field = np.fft.irfft2(spectrum, s=(height, width))
    return (field / field.std()).astype(np.float32)


def natural_image(width: int = 500, height: int = 375, seed: int = 0, leaves: int = 60) -> Image.Image:
    """An RGB photograph-like picture (see the module docstring)."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(60, 190, 3)
    img = np.empty((height, width, 3), np.float32)
    img[:] = base
    for _ in range(leaves):  # dead leaves: later leaves occlude earlier ones, sizes ~ 1/r^3
        r = min(width, height) * 0.5 * rng.uniform(0.03, 1.0) ** 2
        cy, cx = rng.uniform(-0.1, 1.1) * height, rng.uniform(-0.1, 1.1) * width
        squeeze, disc = rng.uniform(0.4, 2.5), rng.random() < 0.5
        grey, tint = rng.uniform(20, 235), rng.normal(0, 25, 3)  # correlated colours: grey plus a small tint
        half_width = r / squeeze if disc else r * squeeze
        y0, y1 = max(0, int(cy - r)), min(height, int(cy + r) + 1)
        x0, x1 = max(0, int(cx - half_width)), min(width, int(cx + half_width) + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.ogrid[y0:y1, x0:x1]
        if disc:
            inside = (yy - cy) ** 2 + ((xx - cx) * squeeze) ** 2 < r * r
        else:
            inside = (abs(yy - cy) < r) & (abs(xx - cx) < half_width)
        img[y0:y1, x0:x1][inside] = np.clip(grey + tint, 0, 255)
    shade = pink_noise(height, width, 1.0, rng)  # luminance texture at every scale
    chroma = np.stack([pink_noise(height, width, 1.6, rng) for _ in range(2)], -1)  # smoother colour noise
    img *= 1.0 + 0.18 * shade[..., None]
    img += 6.0 * (chroma @ np.array([[1.0, -0.5, -0.5], [0.0, 0.87, -0.87]], np.float32))
    return Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8))


def natural_jpeg(width: int = 500, height: int = 375, seed: int = 0, quality: int = 90) -> bytes:
    """:func:`natural_image` encoded as a JPEG (4:2:0 chroma, as most cameras and ImageNet)."""
    buf = io.BytesIO()
    natural_image(width, height, seed).save(buf, "JPEG", quality=quality)
    return buf.getvalue()
