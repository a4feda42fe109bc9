"""The README's two commands on a fresh machine (issue 17, item 15): no Debian fonts, no Debian data sets.

The public digits of the shipped base (`fontdigits`, baseline (a) of every evaluation) ship with the package as a
hashed .npz, so a run needs no font; the fonts only rebuild that file, to the same arrays. Every input a run needs
(private data, base, public data, a writable run folder) is checked before the first training step.
"""

# ruff: noqa: F811  (pytest fixtures imported from tests.dpldm_helpers are redefined as arguments)
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dpldm import data, font_digits, train
from dpldm.files import sha256_file
from tests.dpldm_helpers import tiny_private, tiny_runs, train_args  # noqa: F401


def record(name: str = "fontdigits") -> dict:
    """<name>.json, a shipped set's record (its arrays' sha256, the fonts it was rendered from)."""
    return json.loads((data.SHIPPED_DIR / f"{name}.json").read_text())


@pytest.fixture
def no_fonts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A machine without the Debian fonts: /usr/share/fonts empty (rendering digits then fails, as it would)."""
    empty = tmp_path / "no-fonts"
    empty.mkdir()
    monkeypatch.setattr(font_digits, "FONT_ROOT", empty)
    with pytest.raises(RuntimeError, match="no handwriting font"):
        font_digits.render(1)
    return empty


@pytest.fixture
def shipped_copy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A copy of the package's shipped public data, which the loaders then read (to be tampered with)."""
    copy = tmp_path / "datasets"
    shutil.copytree(data.SHIPPED_DIR, copy)
    monkeypatch.setattr(data, "SHIPPED_DIR", copy)
    return copy


def test_fontdigits_loads_from_the_shipped_file_without_fonts(no_fonts: Path) -> None:
    ds = data.load("fontdigits")
    assert (len(ds.train.labels), len(ds.test.labels)) == (18000, 2000) and ds.source == "fontdigits"
    images, labels = data.read_npz(data.SHIPPED_DIR / data.FONTDIGITS_FILE)
    assert images.dtype == np.uint8 and images.shape == (20000, 28, 28)
    assert data.arrays_sha256(images, labels) == record()["arrays_sha256"]
    assert np.array_equal(ds.train.images[..., 0], images[ds.train.rows])  # the split is of those arrays


def test_fontletters_loads_without_fonts_and_has_no_digit_class(no_fonts: Path) -> None:
    ds = data.load("fontletters")
    assert (len(ds.train.labels), len(ds.test.labels), ds.num_classes) == (18720, 2080, 26)
    images, labels = data.read_npz(data.SHIPPED_DIR / data.FONTLETTERS_FILE)
    assert images.shape == (20800, 28, 28) and np.bincount(labels).tolist() == [800] * 26
    assert data.arrays_sha256(images, labels) == record("fontletters")["arrays_sha256"]
    assert all(c.isalpha() for chars in font_digits.SHIPPED["fontletters"][0] for c in chars)


@pytest.mark.parametrize("file", [data.FONTDIGITS_FILE, data.FONTLETTERS_FILE])
def test_shipped_file_is_small_and_listed(file: str) -> None:
    path = data.SHIPPED_DIR / file
    assert path.stat().st_size < 6 * 2**20, "keep the shipped public data small (uint8, compressed)"
    assert data.shipped_sums()[file] == sha256_file(path)


@pytest.mark.parametrize("attack", ["one byte changed", "removed",
                                    pytest.param("swapped for other digits", marks=pytest.mark.slow), "unlisted"])
def test_a_changed_or_missing_shipped_file_is_refused(no_fonts: Path, shipped_copy: Path, attack: str) -> None:
    path = shipped_copy / data.FONTDIGITS_FILE
    if attack == "one byte changed":
        blob = bytearray(path.read_bytes())
        blob[len(blob) // 2] ^= 0x01
        path.write_bytes(bytes(blob))
        message = r"has sha256 [0-9a-f]{64}, but SHA256SUMS says"
    elif attack == "removed":
        path.unlink()
        message = "is missing"
    elif attack == "swapped for other digits":  # a valid .npz, other arrays
        images, labels = data.read_npz(path)
        data.write_npz(path, images=images[::-1], labels=labels[::-1])
        message = "modified or corrupted"
    else:
        (shipped_copy / data.SHA256SUMS).write_text("")
        message = "not listed"
    with pytest.raises(data.DataError, match=message):
        data.load("fontdigits")


@pytest.mark.skipif(not font_digits.font_files()[0], reason=f"no handwriting font under {font_digits.FONT_ROOT} "
                    "(rebuilding needs them: apt-get install the packages of dpldm.font_digits.PACKAGES, or set "
                    "DPLDM_FONTS to a folder holding them)")
def test_the_fonts_render_the_shipped_fontdigits() -> None:
    # the first 2,000 of the shipped set's 20,000 draws; the whole set is rendered and compared by
    # `python -m dpldm.font_digits --check`, a step of .ci/run (22 s: kept out of the test suite's 15 minutes)
    rec = record()
    hand, other = font_digits.font_files()
    assert (len(hand), len(other), font_digits.font_set_id()) == (
        rec["fonts"]["handwriting"], rec["fonts"]["print"], rec["font_set"]), "other fonts than the shipped set's"
    images, labels = font_digits.render(2000, seed=data.SPLIT_SEED)
    shipped_images, shipped_labels = data.read_npz(data.SHIPPED_DIR / data.FONTDIGITS_FILE)
    assert np.array_equal(images, shipped_images[:2000]) and np.array_equal(labels, shipped_labels[:2000])


@pytest.mark.skipif(not font_digits.font_files()[0], reason=f"no handwriting font under {font_digits.FONT_ROOT}")
def test_fontletters_renders_from_the_fonts_as_shipped() -> None:
    # the first 520 draws of the shipped set's renderer (its full rebuild takes 25 s: --check does it)
    rec = record("fontletters")
    assert font_digits.font_set_id() == rec["font_set"], "other fonts than the shipped set's"
    images, labels = font_digits.render(520, seed=rec["seed"], classes=font_digits.LETTERS)
    shipped_images, shipped_labels = data.read_npz(data.SHIPPED_DIR / data.FONTLETTERS_FILE)
    assert np.array_equal(images, shipped_images[:520]) and np.array_equal(labels, shipped_labels[:520])


def steps_logged(out: Path) -> list[int]:
    log = out / "log.jsonl"
    return [r["step"] for r in map(json.loads, log.read_text().splitlines()) if "step" in r] if log.is_file() else []


def full_run_args(runs: Path, private: Path, out: Path, *extra: str) -> list[str]:
    """train_args, sampling and evaluating: the inputs every stage of the run needs."""
    return [a for a in train_args(runs, private, out, *extra) if a != "--no-sample"] + ["--per-class", "1"]


@pytest.mark.slow
@pytest.mark.parametrize("missing", ["a public .npz that is not there", "the shipped fontdigits.npz"])
def test_missing_public_data_is_refused_before_the_first_step(tiny_runs: Path, tiny_private: Path, tmp_path: Path,
                                                              request: pytest.FixtureRequest, missing: str) -> None:
    if missing == "the shipped fontdigits.npz":
        (request.getfixturevalue("shipped_copy") / data.FONTDIGITS_FILE).unlink()
        public, message = "fontdigits", "fontdigits.npz is missing"
    else:
        public = str(tmp_path / "nowhere.npz")
        message = "nowhere.npz: no such file"
    pub = tiny_runs / "tiny" / "public"  # the models are there: only the evaluation needs the public data
    out = tmp_path / "run"
    argv = full_run_args(tiny_runs, tiny_private, out, "--set", f"data.public={public}", "--pretrained",
                         str(pub / "ldm"), "--autoencoder", str(pub / "autoencoder"))
    with pytest.raises(SystemExit, match=f"the evaluation needs the public data.*{message}"):
        train.main(argv)
    assert steps_logged(out) == [] and not (out / "checkpoint").exists()


def test_an_unwritable_run_folder_is_refused_before_anything(tiny_runs: Path, tiny_private: Path,
                                                             tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit, match="cannot be created.*a-file is not a folder"):
        train.main(full_run_args(tiny_runs, tiny_private, blocker / "run"))
    assert blocker.read_text() == "not a folder"


@pytest.mark.slow
def test_the_default_job_runs_to_its_evaluation_without_fonts(no_fonts: Path, tiny_private: Path,
                                                              tmp_path: Path) -> None:
    """`python -m dpldm.train` (the shipped base, public fontdigits, evaluation with baseline (a)), shrunk to a few
    steps on a small private set, on a machine without the fonts."""
    out = tmp_path / "run"
    res = train.main(["--runs", str(tmp_path / "runs"), "--data", str(tiny_private), "--out", str(out),
                      "--batch-size", "16", "--max-physical-batch-size", "16", "--epochs", "1", "--per-class", "2",
                      "--set", "sample.ddim_steps=2", "--set", "evaluate.cnn_steps=2",
                      "--set", "evaluate.dp_baseline.epochs=1", "--set", "evaluate.dp_baseline.batch_size=16",
                      "--set", "evaluate.dp_baseline.max_physical_batch_size=16"])
    assert res["steps"] == 4 and "baseline_public_cnn_test_acc" in res and "frechet_distance_public_cnn" in res
    assert (out / "grid.png").is_file() and (out / "result.json").is_file()
    assert '"base": ' in (out / "log.jsonl").read_text()  # started from the shipped base, no pre-training
