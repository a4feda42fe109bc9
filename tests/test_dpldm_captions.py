"""Private images with text (dpldm/captions.py): captions files (JSONL, CSV) and class prompts; bad input refused
by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dpldm import captions
from dpldm.data import DataError


def write_images(folder: Path, names: list[str]) -> None:
    rng = np.random.default_rng(0)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(folder / name)


TEXTS = {"a.png": "a handwritten seven", "b.png": "a handwritten one", "sub/c.png": "a handwritten seven",
         "d.png": "a photo of a coat", "e.png": "a handwritten one"}


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_a_captions_file_gives_each_image_its_captions_index(tmp_path: Path, fmt: str) -> None:
    write_images(tmp_path, list(TEXTS))
    if fmt == "jsonl":
        f = tmp_path / "metadata.jsonl"
        f.write_text("\n".join(json.dumps({"file_name": k, "text": v}) for k, v in TEXTS.items()) + "\n")
    else:
        f = tmp_path / "captions.csv"
        f.write_text("image,caption\n" + "".join(f'{k},"{v}"\n' for k, v in TEXTS.items()))
    got = captions.captioned_folder(tmp_path, f, channels=3, image_size=8, test_fraction=0.2)
    assert got.captions == sorted(set(TEXTS.values())) and not got.per_class
    ds = got.data
    assert ds.num_classes == 3 and ds.train.images.shape[1:] == (8, 8, 3)
    files = ds.files
    for split in (ds.train, ds.test):
        for row, label in zip(split.rows, split.labels, strict=True):
            assert got.captions[label] == TEXTS[files[row]]


@pytest.mark.parametrize("bad,match", [
    ('{"file_name": "a.png"}', r"needs one of the fields \['text', 'caption'\]"),
    ('{"text": "x"}', r"needs one of the fields \['file_name', 'image'\]"),
    ('not json', "not a JSON object"),
    ('{"file_name": "a.png", "text": "x"}\n{"file_name": "a.png", "text": "y"}', "a.png is listed twice"),
    ('{"file_name": "missing.png", "text": "x"}', "missing.png: not a readable image"),
    ('', "no captions"),
])
def test_bad_captions_are_refused_by_name(tmp_path: Path, bad: str, match: str) -> None:
    write_images(tmp_path, ["a.png"])
    f = tmp_path / "metadata.jsonl"
    f.write_text(bad)
    with pytest.raises(DataError, match=match):
        captions.captioned_folder(tmp_path, f, channels=3, image_size=8)


def test_class_folders_with_a_prompt_template(tmp_path: Path) -> None:
    write_images(tmp_path, ["cat/1.png", "cat/2.png", "dog/1.png", "dog/2.png", "dog/3.png"])
    got = captions.prompted_folder(tmp_path, "a photo of a {label}", channels=1, num_classes=2, image_size=8)
    assert got.captions == ["a photo of a cat", "a photo of a dog"] and got.per_class
    assert got.data.num_classes == 2 and got.data.train.images.shape[-1] == 1
    with pytest.raises(DataError, match="needs {label}"):
        captions.prompted_folder(tmp_path, "a photo", channels=1, num_classes=2, image_size=8)
