"""Data loading: the offline sources, user data (.npz and folders), and clear refusals naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dpldm import data


def test_mnist5k_fixed_split() -> None:
    a, b = data.mnist5k(), data.mnist5k()
    assert (len(a.train.labels), len(a.test.labels)) == (4000, 1000)
    assert a.train.images.shape[1:] == (28, 28, 1) and a.train.images.dtype == np.uint8
    assert np.array_equal(a.test.labels, b.test.labels) and np.array_equal(a.train.images[:5], b.train.images[:5])
    assert set(np.unique(a.test.labels)) == set(range(10))


def test_digits_public_is_mnist_layout() -> None:
    d = data.digits28()
    assert d.train.images.shape[1:] == (28, 28, 1)
    border = np.concatenate([d.train.images[:, :4].ravel(), d.train.images[:, -4:].ravel()])
    assert border.max() == 0 and d.train.images.max() > 200  # digit in the 20x20 centre, like MNIST


def test_to_model_tensor_roundtrip() -> None:
    imgs = np.random.default_rng(0).integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
    x = data.to_model_tensor(imgs, 28, 32, 1)
    assert x.shape == (3, 1, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(data.from_model_tensor(x, 28), imgs)


def test_npz_layouts(tmp_path: Path) -> None:
    p = tmp_path / "d.npz"
    np.savez(p, images=np.random.rand(10, 1, 28, 28).astype(np.float32), labels=np.arange(10) % 3)
    ds = data.user_data(p, channels=1)
    assert ds.num_classes == 3 and len(ds.train.labels) + len(ds.test.labels) == 10
    assert ds.train.images.shape[1:] == (28, 28, 1) and ds.train.images.dtype == np.uint8


def test_folder_of_class_folders(tmp_path: Path) -> None:
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(tmp_path / c / f"{i}.png")
    (tmp_path / "dog" / "notes.txt").write_text("ignored")
    split, classes = data.from_folder(tmp_path, channels=1)
    assert classes == ["cat", "dog"] and list(split.labels) == [0, 0, 0, 1, 1, 1]
    assert split.images.shape == (6, 20, 20, 1)


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"images": np.zeros((0, 28, 28)), "labels": np.zeros(0, int)}, "no images"),
        ({"images": np.zeros((4, 28, 28))}, "needs arrays 'images' and 'labels'"),
        ({"images": np.zeros((4, 28, 28)), "labels": np.zeros(3, int)}, "labels must be"),
        ({"images": np.zeros((4, 28, 28)), "labels": np.array([0.5, 1, 2, 3])}, "labels must be integers"),
        ({"images": np.zeros((4, 28)), "labels": np.zeros(4, int)}, "images must be"),
        ({"images": np.full((4, 28, 28), np.nan), "labels": np.zeros(4, int)}, "finite"),
    ],
)
def test_bad_npz_refused_naming_file(tmp_path: Path, arrays: dict, message: str) -> None:
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    with pytest.raises(data.DataError, match=message) as e:
        data.user_data(p, channels=1)
    assert str(p) in str(e.value)


def test_garbage_file_refused(tmp_path: Path) -> None:
    p = tmp_path / "junk.npz"
    p.write_bytes(b"this is not a zip file")
    with pytest.raises(data.DataError, match="not a readable .npz") as e:
        data.user_data(p, channels=1)
    assert str(p) in str(e.value)


def test_empty_folder_refused(tmp_path: Path) -> None:
    with pytest.raises(data.DataError, match="one sub-folder per class"):
        data.user_data(tmp_path, channels=1)
    (tmp_path / "a").mkdir()
    with pytest.raises(data.DataError, match="no images found"):
        data.user_data(tmp_path, channels=1)


def test_fmnist_missing_gives_install_hint(tmp_path: Path) -> None:
    with pytest.raises(data.DataError, match="apt-get install -y dataset-fashion-mnist"):
        data.fashion_mnist(tmp_path)


@pytest.mark.skipif(not (data.FMNIST_DIR / "train-images-idx3-ubyte.gz").exists(),
                    reason="dataset-fashion-mnist not installed (apt-get install -y dataset-fashion-mnist)")
def test_fmnist_from_debian_package() -> None:
    ds = data.fashion_mnist()
    assert ds.train.images.shape == (60000, 28, 28, 1) and ds.test.images.shape == (10000, 28, 28, 1)
    assert np.bincount(ds.test.labels).tolist() == [1000] * 10


def test_font_digits_deterministic_centred_and_labelled() -> None:
    from sklearn.linear_model import LogisticRegression

    from dpldm.font_digits import render

    x, y = render(40, seed=5)
    x2, _ = render(40, seed=5)
    assert x.shape == (40, 28, 28) and x.dtype == np.uint8 and np.array_equal(x, x2)
    assert not np.array_equal(x, render(40, seed=6)[0])
    assert y.tolist() == list(range(10)) * 4
    assert (x.reshape(40, -1).max(1) > 128).all()  # every digit has ink
    ys, xs = np.indices((28, 28))
    mass = x.astype(np.float64).sum((1, 2))
    centre = np.stack([(x * ys).sum((1, 2)) / mass, (x * xs).sum((1, 2)) / mass], 1)
    assert np.abs(centre - 14).max() < 3.5  # MNIST's layout: centred by mass (elastic moves it a little)
    # the label is the digit drawn: a linear model trained on one rendering reads another
    xa, ya = render(1000, seed=0)
    xb, yb = render(300, seed=1)
    clf = LogisticRegression(C=0.1, max_iter=300).fit(xa.reshape(1000, -1) / 255.0, ya)
    assert clf.score(xb.reshape(300, -1) / 255.0, yb) > 0.7  # chance: 0.1


def test_fontdigits_public_set() -> None:
    ds = data.load("fontdigits")
    assert (len(ds.train.labels), len(ds.test.labels)) == (9000, 1000) and ds.source == "fontdigits"
    assert ds.train.images.shape[1:] == (28, 28, 1) and np.bincount(ds.train.labels).min() > 850
