"""Public digits rendered from fonts: an offline stand-in for EMNIST, DP-LDM's public set for MNIST.

Each digit is drawn in a TrueType font (DejaVu, from Debian's fonts-dejavu-core, when installed, and the
Aileron font bundled with Pillow), with a random stroke width, rotation and shear, boxed into 20x20 and
centred by its centre of mass in 28x28 (how MNIST was made), then bent by a smooth random displacement
field so that strokes look hand-drawn. No MNIST image is used: the set is public by construction.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
GLYPH_PX = 64  # drawn large, then shrunk to MNIST's 20 px box: strokes get anti-aliased edges
CANVAS_PX = 96


def fonts() -> list[ImageFont.FreeTypeFont]:
    found = [ImageFont.truetype(str(p), GLYPH_PX) for p in sorted(FONT_DIR.glob("*.ttf"))]
    bundled = ImageFont.load_default(size=GLYPH_PX)
    if isinstance(bundled, ImageFont.FreeTypeFont):  # Pillow built without FreeType has only a bitmap font
        found.append(bundled)
    if not found:
        raise RuntimeError(f"no TrueType font: install fonts-dejavu-core ({FONT_DIR}) or Pillow with FreeType")
    return found


def _glyph(digit: int, font: ImageFont.FreeTypeFont, rng: np.random.Generator) -> np.ndarray:
    im = Image.new("L", (CANVAS_PX, CANVAS_PX), 0)
    c = CANVAS_PX // 2
    ImageDraw.Draw(im).text((c, c), str(digit), fill=255, font=font, anchor="mm",
                            stroke_width=int(rng.integers(0, 3)), stroke_fill=255)
    im = im.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR)
    shear = float(rng.uniform(-0.3, 0.3))
    im = im.transform(im.size, Image.AFFINE, (1, shear, -shear * c, 0, 1, 0), resample=Image.BILINEAR)
    im = im.crop(im.getbbox())
    w, h = im.size
    s = 20.0 / max(w, h)
    return np.asarray(im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.LANCZOS), dtype=np.float32)


def _centre(a: np.ndarray) -> np.ndarray:
    """Paste into 28x28 with the centre of mass at the middle (clamped inside)."""
    ys, xs = np.indices(a.shape)
    cy, cx = (ys * a).sum() / a.sum(), (xs * a).sum() / a.sum()
    oy = min(max(round(14 - cy), 0), 28 - a.shape[0])
    ox = min(max(round(14 - cx), 0), 28 - a.shape[1])
    out = np.zeros((28, 28), np.float32)
    out[oy : oy + a.shape[0], ox : ox + a.shape[1]] = a
    return out


def _elastic(x: torch.Tensor, gen: torch.Generator, pixels: float = 1.5) -> torch.Tensor:
    """Smooth random displacement (a 4x4 grid of Gaussian offsets, bicubic-upsampled), ~`pixels` px each."""
    n, _, h, w = x.shape
    d = torch.randn(n, 2, 4, 4, generator=gen) * (2 * pixels / h)
    d = F.interpolate(d, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    grid = torch.stack([xs, ys], -1)[None] + d
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def render(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n digits (labels 0..9 in turn): uint8 [n, 28, 28] and int64 [n]; the same seed and fonts give the same set."""
    rng = np.random.default_rng(seed)
    faces = fonts()
    labels = np.arange(n, dtype=np.int64) % 10
    x = np.stack([_centre(_glyph(int(d), faces[rng.integers(len(faces))], rng)) for d in labels])
    x = _elastic(torch.from_numpy(x)[:, None], torch.Generator().manual_seed(seed))[:, 0]
    return x.clamp(0, 255).round().to(torch.uint8).numpy(), labels
