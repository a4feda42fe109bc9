"""Private images with text (issue 20): a folder of images with a captions file, or class sub-folders with a prompt
template. Each example's label is the index of its caption in a list of captions (CaptionContexts' rows).

    --data FOLDER --captions FILE     JSONL ({"file_name": ..., "text": ...} per line, diffusers' metadata.jsonl
                                      names; "image" / "caption" are read too) or CSV with a header naming the
                                      same columns; paths relative to FOLDER
    --data FOLDER --prompt TEMPLATE   one sub-folder per class; caption of class c: TEMPLATE.format(label=c)

Captions are private data too: like the images, they are read per example and only the DP step uses them; the
caption list lives in memory (a non-persistent buffer) and is never written. Sampling uses the user's public
prompts (--prompts FILE), or with a prompt template the class prompts, never the private captions.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dpldm import data as data_mod
from dpldm.data import DataError

IMAGE_KEYS = ("file_name", "image")
TEXT_KEYS = ("text", "caption")


@dataclass
class Captioned:
    """Private images with captions: labels index `captions`."""

    data: data_mod.DataSet
    captions: list[str]
    per_class: bool  # True: captions are the class prompts of a template (public); False: private captions


def _pick(row: dict[str, str], keys: tuple[str, ...], where: str) -> str:
    for k in keys:
        if k in row and isinstance(row[k], str):
            return row[k]
    raise DataError(f"{where}: needs one of the fields {list(keys)} (a string), found {sorted(row)}")


def read_captions(path: Path) -> list[tuple[str, str]]:
    """(image path, caption) pairs of a JSONL or CSV captions file, in file order.

    Args:
        path: the file (.jsonl, .json lines, or .csv).

    Returns:
        The pairs.

    Raises:
        DataError: unreadable, a row without an image path or caption, or an image listed twice.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such captions file")
    rows: list[dict[str, str]] = []
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    else:
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{i}: not a JSON object ({e})") from e
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{i}: not a JSON object")
                rows.append(row)
    pairs = [(_pick(r, IMAGE_KEYS, f"{path} row {i}"), _pick(r, TEXT_KEYS, f"{path} row {i}"))
             for i, r in enumerate(rows, 1)]
    if not pairs:
        raise DataError(f"{path}: no captions")
    seen: set[str] = set()
    for image, _ in pairs:
        if image in seen:
            raise DataError(f"{path}: {image} is listed twice")
        seen.add(image)
    return pairs


def captioned_folder(folder: Path, captions_file: Path, channels: int, image_size: int,
                     test_fraction: float = 0.2) -> Captioned:
    """`--data FOLDER --captions FILE`: every listed image, its caption's index as its label.

    Args:
        folder: the images' root.
        captions_file: the captions file.
        channels: 1 or 3.
        image_size: every image is resized to it.
        test_fraction: the held-out share (a fixed split).

    Returns:
        The data and the caption list (one entry per distinct caption).

    Raises:
        DataError: a listed image that is missing or unreadable.
    """
    from PIL import Image

    pairs = read_captions(captions_file)
    captions = sorted({c for _, c in pairs})
    index = {c: i for i, c in enumerate(captions)}
    images = []
    for rel, _ in pairs:
        p = Path(folder) / rel
        try:
            img = Image.open(p).convert("L" if channels == 1 else "RGB")
        except Exception as e:
            raise DataError(f"{p}: not a readable image ({e}), listed in {captions_file}") from e
        images.append(np.asarray(img.resize((image_size, image_size))))
    labels = np.asarray([index[c] for _, c in pairs])
    full = data_mod.Split(np.stack(images).reshape(len(images), image_size, image_size, channels), labels)
    ds = data_mod.held_out(full, str(folder), len(captions), [rel for rel, _ in pairs], test_fraction)
    return Captioned(ds, captions, per_class=False)


def prompted_folder(folder: Path, template: str, channels: int, num_classes: int, image_size: int,
                    test_fraction: float = 0.2) -> Captioned:
    """`--data FOLDER --prompt TEMPLATE`: class sub-folders; class c's caption is TEMPLATE.format(label=c).

    Args:
        folder: one sub-folder per class.
        template: e.g. "a photo of a {label}".
        channels: 1 or 3.
        num_classes: the config's label count.
        image_size: every image is resized to it.
        test_fraction: the held-out share (a fixed split).

    Returns:
        The data (labels are classes) and one prompt per class.

    Raises:
        DataError: a template without {label}.
    """
    if "{label}" not in template:
        raise DataError(f"--prompt {template!r}: needs {{label}} where the class name goes")
    full, classes = data_mod.from_folder(Path(folder), channels, num_classes, image_size)
    files = [rel for rel, _ in data_mod.folder_listing(Path(folder), num_classes)[1]]
    ds = data_mod.held_out(full, str(folder), num_classes, files, test_fraction)
    return Captioned(ds, [template.format(label=c) for c in classes], per_class=True)
