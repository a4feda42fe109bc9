"""Public digits and letters rendered from fonts: an offline stand-in for EMNIST, DP-LDM's public set for MNIST.

Each digit is drawn in a TrueType/OpenType font, 90% of the time one of the handwriting fonts Debian
packages (HANDWRITING_PACKAGES), else a print font (PRINT_PACKAGES, DejaVu, and the Aileron font bundled
with Pillow); with a random stroke thickening, aspect ratio, rotation and shear; boxed into 20x20 and
centred by its centre of mass in 28x28 (how MNIST was made); then bent by a smooth random displacement
field so that strokes look hand-drawn. No MNIST image is used: the set is public by construction.

The mix was chosen on a public proxy, sklearn's handwritten digits (a CNN trained on 10k renderings:
old DejaVu-only set 57.8%, this one 75.6%), never on MNIST. Install the fonts with:
    apt-get install -y $(python -c "import dpldm.font_digits as f; print(' '.join(f.PACKAGES))")

Letters (LETTERS: EMNIST letters' 26 classes, each its capital or small letter) are drawn the same way: a public
set with no digit in it, for DP-LDM's protocol (pre-train on letters, fine-tune on MNIST).

Both sets ship with the package (dpldm/datasets/fontdigits.npz and fontletters.npz, their sha256 in SHA256SUMS
there), so runs need no fonts. The fonts are needed only to rebuild them:
    python -m dpldm.font_digits --check [--set fontletters]     # render from the installed fonts, compare
    python -m dpldm.font_digits --out DIR [--set fontletters]   # write DIR/<set>.npz, <set>.json, SHA256SUMS
Fonts are looked up under /usr/share/fonts, or under $DPLDM_FONTS when set.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from dpldm.files import SHA256SUMS, read_sha256sums, write_sha256sums

FONT_ROOT = Path(os.environ.get("DPLDM_FONTS") or "/usr/share/fonts")
HANDWRITING_PACKAGES = (
    "fonts-bwht", "fonts-comic-neue", "fonts-dancingscript", "fonts-kaushanscript", "fonts-breip",
    "fonts-femkeklaver", "fonts-dkg-handwriting", "fonts-humor-sans", "fonts-klee", "fonts-kristi",
    "fonts-leckerli-one", "fonts-rufscript", "fonts-sjfonts", "fonts-yusei-magic",
)
PRINT_PACKAGES = (
    "fonts-dejavu-core", "fonts-liberation", "fonts-freefont-ttf", "fonts-urw-base35", "fonts-roboto",
    "fonts-open-sans", "fonts-lato", "fonts-cantarell", "fonts-linuxlibertine", "fonts-crosextra-carlito",
    "fonts-crosextra-caladea",
)
PACKAGES = HANDWRITING_PACKAGES + PRINT_PACKAGES
# file-name prefixes of the handwriting fonts (Z003 is URW's Zapf Chancery, a script in fonts-urw-base35)
HANDWRITING = ("BecauseWe", "ComicNeue", "DancingScript", "KaushanScript", "Breip", "breipfont", "femkeklaver", "dkg",
               "Humor-Sans", "KleeOne", "Kristi", "LeckerliOne", "Rufscript", "Delphine", "SteveHand", "YuseiMagic",
               "Z003")
# no digits worth the name: symbol and dingbat fonts, and a hatched sketch face
EXCLUDED = ("D050000L", "StandardSymbolsPS", "DejaVuMathTeXGyre", "CabinSketch")
HANDWRITING_FRACTION = 0.9
GLYPH_PX = 64  # drawn large, then shrunk to MNIST's 20 px box: strokes get anti-aliased edges
CANVAS_PX = 112


def font_files() -> tuple[list[Path], list[Path]]:
    """The fonts digits are rendered from, sorted by name (so renders are stable).

    Returns:
        (handwriting, print) font files found under FONT_ROOT (/usr/share/fonts, or $DPLDM_FONTS).
    """
    found = sorted({p for p in FONT_ROOT.rglob("*") if p.suffix.lower() in (".ttf", ".otf")
                    and not p.name.startswith(EXCLUDED)}, key=lambda p: (p.name, str(p)))
    hand = [p for p in found if p.name.startswith(HANDWRITING)]
    return hand, [p for p in found if p not in hand]


def font_set_id() -> str:
    """A short hash of the font file names used: two renders with the same id and seed are identical.

    Returns:
        12 hex characters.
    """
    hand, other = font_files()
    return hashlib.sha256("\n".join(p.name for p in hand + other).encode()).hexdigest()[:12]


def _faces() -> tuple[list[ImageFont.FreeTypeFont], list[ImageFont.FreeTypeFont]]:
    hand, other = font_files()
    if not hand:
        raise RuntimeError(f"no handwriting font under {FONT_ROOT}: apt-get install -y {' '.join(PACKAGES)}")
    print_faces = [ImageFont.truetype(str(p), GLYPH_PX) for p in other]
    bundled = ImageFont.load_default(size=GLYPH_PX)
    if isinstance(bundled, ImageFont.FreeTypeFont):  # Pillow built without FreeType has only a bitmap font
        print_faces.append(bundled)
    return [ImageFont.truetype(str(p), GLYPH_PX) for p in hand], print_faces


def _glyph(char: str, font: ImageFont.FreeTypeFont, rng: np.random.Generator) -> np.ndarray | None:
    im = Image.new("L", (CANVAS_PX, CANVAS_PX), 0)
    c = CANVAS_PX // 2
    ImageDraw.Draw(im).text((c, c), char, fill=255, font=font, anchor="mm")
    thick = int(rng.integers(0, 3))  # pen width: 0, 1 or 2 px of dilation at 64 px
    if thick:
        im = im.filter(ImageFilter.MaxFilter(2 * thick + 1))
    im = im.resize((max(1, round(CANVAS_PX * float(np.exp(rng.uniform(-0.25, 0.25))))), CANVAS_PX), Image.BILINEAR)
    im = im.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR, expand=True)
    shear = float(rng.uniform(-0.35, 0.35))
    im = im.transform(im.size, Image.AFFINE, (1, shear, -shear * im.size[1] / 2, 0, 1, 0), resample=Image.BILINEAR)
    box = im.getbbox()
    if box is None:
        return None
    im = im.crop(box)
    w, h = im.size
    s = 20.0 / max(w, h)
    a = np.asarray(im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.LANCZOS), dtype=np.float32)
    return a if a.sum() > 0 else None


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


DIGITS = tuple("0123456789")
# EMNIST letters' classes: 26, each drawn as its capital or its small letter (DP-LDM's public set for MNIST)
LETTERS = tuple(a + b for a, b in zip("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz", strict=True))


def render(n: int, seed: int = 0, classes: tuple[str, ...] = DIGITS) -> tuple[np.ndarray, np.ndarray]:
    """Render characters from the installed fonts; the same seed, classes and fonts give the same set.

    Args:
        n: how many (labels 0..len(classes)-1 in turn).
        seed: the distortions' seed.
        classes: per label, the characters that may stand for it (one drawn at random when several):
            DIGITS (the default; the draws are then exactly the digit renderer's) or LETTERS.

    Returns:
        (images uint8 [n, 28, 28], labels int64 [n]).
    """
    rng = np.random.default_rng(seed)
    hand, other = _faces()
    labels = np.arange(n, dtype=np.int64) % len(classes)
    out = []
    for d in labels:
        g = None
        while g is None:  # a glyph that vanished under the transforms is drawn again
            pool = hand if rng.random() < HANDWRITING_FRACTION else other
            chars = classes[d]
            char = chars if len(chars) == 1 else chars[int(rng.integers(len(chars)))]
            g = _glyph(char, pool[rng.integers(len(pool))], rng)
        out.append(_centre(g))
    x = _elastic(torch.from_numpy(np.stack(out))[:, None], torch.Generator().manual_seed(seed))[:, 0]
    x = x / x.amax(dim=(1, 2), keepdim=True).clamp(min=1.0) * 255  # full ink range, as MNIST's
    return x.clamp(0, 255).round().to(torch.uint8).numpy(), labels


# --- the shipped sets: rebuild and check ----------------------------------------------------------------------

# name -> (classes, the label's description); the file, size and seed are dpldm.data's
SHIPPED = {"fontdigits": (DIGITS, "uint8, the digit drawn (0..9 in turn)"),
           "fontletters": (LETTERS, "uint8, the letter drawn (0 = A or a, ..., 25 = Z or z, in turn)")}


def _file_and_n(name: str) -> tuple[str, int]:
    from dpldm import data

    if name not in SHIPPED:
        raise ValueError(f"unknown shipped set {name!r}: one of {sorted(SHIPPED)}")
    return {"fontdigits": (data.FONTDIGITS_FILE, data.FONTDIGITS_N),
            "fontletters": (data.FONTLETTERS_FILE, data.FONTLETTERS_N)}[name]


def record(images: np.ndarray, labels: np.ndarray, name: str = "fontdigits") -> dict[str, Any]:
    """<name>.json: what a shipped set is and what it was rendered with (fonts, library versions).

    Args:
        images: the rendered images.
        labels: their labels.
        name: the set (a key of SHIPPED).

    Returns:
        The record.
    """
    import zlib

    import PIL
    from PIL import features

    from dpldm import data

    hand, other = font_files()
    return {"name": name, "file": _file_and_n(name)[0], "images": list(images.shape), "dtype": "uint8",
            "labels": SHIPPED[name][1], "seed": data.SPLIT_SEED,
            "split": f"dpldm.data.{name}(): fixed permutation (seed {data.SPLIT_SEED}), last 90% train, "
                     "first 10% test",
            "arrays_sha256": data.arrays_sha256(images, labels), "font_set": font_set_id(),
            "fonts": {"handwriting": len(hand), "print": len(other)}, "packages": list(PACKAGES),
            "rendered_with": {"pillow": PIL.__version__, "freetype": features.version("freetype2"),
                              "numpy": np.__version__, "torch": torch.__version__,
                              "zlib": zlib.ZLIB_RUNTIME_VERSION},  # the .npz's bytes depend on it, not the arrays
            "rebuild": f"python -m dpldm.font_digits --set {name} --out DIR (then compare, or --check)"}


def render_shipped(name: str = "fontdigits") -> tuple[np.ndarray, np.ndarray]:
    """A shipped set rendered from the installed fonts: what the shipped file holds when the fonts are the ones it
    was rendered from. Only needed to rebuild that file.

    Args:
        name: the set (a key of SHIPPED).

    Returns:
        (images uint8 [N, 28, 28], labels).
    """
    from dpldm import data

    return render(_file_and_n(name)[1], seed=data.SPLIT_SEED, classes=SHIPPED[name][0])


def build(out: Path, name: str = "fontdigits") -> dict[str, Any]:
    """Render a shipped set from the installed fonts into out/: <name>.npz (uint8, compressed), <name>.json
    (record()) and SHA256SUMS (every file it lists, these two added).

    Args:
        out: the folder to write (created if needed); dpldm/datasets is the package's.
        name: the set (a key of SHIPPED).

    Returns:
        The record.
    """
    from dpldm import data

    file = _file_and_n(name)[0]
    images, labels = render_shipped(name)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data.write_npz(out / file, images=images, labels=labels.astype(np.uint8))
    rec = record(images, labels, name)
    json_name = Path(file).with_suffix(".json").name
    (out / json_name).write_text(json.dumps(rec, indent=1) + "\n")
    names = sorted({file, json_name} | set(_listed(out)))
    write_sha256sums(out, [n for n in names if (out / n).is_file()])
    return rec


def _listed(folder: Path) -> list[str]:
    path = Path(folder) / SHA256SUMS
    return list(read_sha256sums(path, strict=False)) if path.is_file() else []


def check(name: str = "fontdigits") -> tuple[bool, str]:
    """Render a shipped set from the installed fonts and compare it with the shipped file.

    Args:
        name: the set (a key of SHIPPED).

    Returns:
        (whether the arrays are the same, a report).

    Raises:
        RuntimeError: no handwriting font is installed (nothing to rebuild from).
    """
    from dpldm import data

    file = _file_and_n(name)[0]
    images, labels = render_shipped(name)
    shipped_images, shipped_labels = data.read_npz(data.shipped_file(file))
    got, want = data.arrays_sha256(images, labels), data.arrays_sha256(shipped_images, shipped_labels)
    shipped = json.loads((data.SHIPPED_DIR / Path(file).with_suffix(".json").name).read_text())
    hand, other = font_files()
    report = (f"rendered from {len(hand)} handwriting + {len(other)} print fonts under {FONT_ROOT} (font set "
              f"{font_set_id()}): arrays sha256 {got}; shipped {file}: {want} (rendered from "
              f"{shipped['fonts']['handwriting']} + {shipped['fonts']['print']} fonts, font set {shipped['font_set']})")
    return got == want, report


def main(argv: list[str] | None = None) -> None:
    """The command line (--check or --out DIR).

    Args:
        argv: the arguments (default sys.argv[1:]).
    """
    p = argparse.ArgumentParser(prog="python -m dpldm.font_digits", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--check", action="store_true", help="render from the installed fonts and compare with the "
                                                           "shipped dpldm/datasets/<set>.npz")
    what.add_argument("--out", type=Path, help="write <set>.npz, <set>.json and SHA256SUMS there")
    p.add_argument("--set", default="fontdigits", choices=sorted(SHIPPED), help="which shipped set")
    args = p.parse_args(argv)
    try:
        if args.check:
            same, report = check(args.set)
            print(report)
            if not same:
                raise SystemExit("error: the rendered set differs from the shipped one (other fonts or library "
                                 f"versions than {args.set}.json records)")
            print("same data as the shipped file")
        else:
            rec = build(args.out, args.set)
            print(f"wrote {args.out / rec['file']}: {rec['images']} uint8, arrays sha256 {rec['arrays_sha256']}, "
                  f"font set {rec['font_set']}")
    except (RuntimeError, ValueError) as e:  # no fonts to render from, no shipped file to compare with
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
