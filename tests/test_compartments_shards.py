"""Shard keys of dpldm.compartments: class, random, manifest (image paths or rows; JSON or CSV) and folders; every
key gives disjoint shards of the training split, and the held-out test split is never in a shard."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dpldm.compartments.shards import ShardError, load_sharded, read_shard_manifest
from dpldm.config import load_config

CFG = load_config("tiny")


def write_images(root: Path, per_class: int = 4, classes: int = 10, tag: int = 0) -> None:
    for c in range(classes):
        (root / str(c)).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            # each image's value encodes (tag, class, i), so a test can tell which file a row came from
            Image.fromarray(np.full((28, 28), 10 * tag + c * per_class + i, np.uint8)).save(root / str(c) / f"{i}.png")


def pixel(images: np.ndarray) -> np.ndarray:
    return images[:, 0, 0, 0].astype(int)


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    write_images(tmp_path / "data")
    return tmp_path / "data"


def test_manifest_of_files_picks_those_images_and_leaves_out_the_test_split(folder: Path, tmp_path: Path) -> None:
    spec = {"a": [f"{c}/0.png" for c in range(10)] + [f"{c}/1.png" for c in range(10)],
            "b": [f"{c}/{i}.png" for c in range(10) for i in (2, 3)]}
    path = tmp_path / "m.json"
    path.write_text(json.dumps(spec))
    private, shards, held = load_sharded("manifest", str(folder), CFG, manifest=path)
    assert [s.name for s in shards] == ["a", "b"]
    for s in shards:
        want = {c * 4 + i for c in range(10) for i in ((0, 1) if s.name == "a" else (2, 3))}
        got = set(pixel(private.train.images[s.index]))
        assert got <= want and len(got) + held[s.name] == len(want)
    test_values = set(pixel(private.test.images))
    assert not test_values & {int(v) for s in shards for v in pixel(private.train.images[s.index])}
    assert sum(held.values()) == len(test_values)  # every test image was listed by one shard, and left out


def test_csv_manifest_with_rows(tmp_path: Path, folder: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text("row,shard\n" + "\n".join(f"{r},{'x' if r % 2 else 'y'}" for r in range(40)))
    assert read_shard_manifest(path) == {"y": list(range(0, 40, 2)), "x": list(range(1, 40, 2))}
    private, shards, _ = load_sharded("manifest", str(folder), CFG, manifest=path)
    rows = {s.name: set(private.train.rows[s.index] % 2) for s in shards}
    assert rows == {"y": {0}, "x": {1}}


@pytest.mark.parametrize("spec, match", [
    ({"a": ["0/0.png", "0/1.png"], "b": ["0/1.png"]}, "in shards 'a' and 'b'"),
    ({"a": ["0/9.png"]}, "not an image"),
    ({"a": [400]}, "outside the 40 examples"),
    ({"a": [1.5]}, "neither a row nor a file path"),
    ({"../x": [1]}, "shard name"),
    ({}, "no shards"),
])
def test_bad_manifests_are_refused(spec: dict, match: str, folder: Path, tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(ShardError, match=match):
        load_sharded("manifest", str(folder), CFG, manifest=path)


def test_folders_key(tmp_path: Path) -> None:
    root = tmp_path / "root"
    write_images(root / "north", per_class=3, tag=0)
    write_images(root / "south", per_class=2, classes=5, tag=20)  # a shard may hold some classes only
    private, shards, held = load_sharded("folders", str(root), CFG)
    assert [s.name for s in shards] == ["north", "south"]
    assert sum(len(s.index) for s in shards) == len(private.train.labels)  # every training image, once
    assert len(set(np.concatenate([s.index for s in shards]))) == len(private.train.labels)
    assert sum(held.values()) == len(private.test.labels)
    south = private.train.images[shards[1].index]
    assert (pixel(south) >= 200).all() and set(private.train.labels[shards[1].index]) <= set(range(5))


@pytest.mark.parametrize("key, n", [("class", 2), ("class", 10), ("random", 3)])
def test_keys_give_disjoint_shards_covering_the_training_split(key: str, n: int, folder: Path) -> None:
    private, shards, _ = load_sharded(key, str(folder), CFG, n)
    index = np.concatenate([s.index for s in shards])
    assert len(shards) == n and sorted(index) == list(range(len(private.train.labels)))
    if key == "class":
        for s in shards:
            assert set(private.train.labels[s.index]) <= set(s.classes)


def test_random_key_needs_a_count_and_class_key_a_valid_one(folder: Path) -> None:
    with pytest.raises(ShardError, match="needs --num-shards"):
        load_sharded("random", str(folder), CFG)
    with pytest.raises(ShardError, match="1..10 shards"):
        load_sharded("class", str(folder), CFG, 11)


@pytest.mark.parametrize("shards", [{"a": {"trained": True}, "b": {"trained": True}}, {"a": {"trained": True}}])
def test_evaluation_data_holds_the_shards_own_examples_only(folder: Path, tmp_path: Path, shards: dict) -> None:
    """Issue 17, item 9: evaluating samples of shard a trains the baselines on a's training examples and tests
    on the held-out split less the test rows shard b listed: they are b's data, whether b is in the run or was
    forgotten (second case). Test rows no shard listed belong to nobody and stay."""
    from dpldm.compartments.evaluate import evaluation_data

    listed_a = [f"{c}/{i}.png" for c in range(10) for i in (0, 1)]
    listed_b = [f"{c}/2.png" for c in range(10)]  # x/3.png: listed by no shard
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"a": listed_a, "b": listed_b}))
    reg = {"key": "manifest", "data": str(folder), "num_shards": None, "shard_seed": 0, "manifest": str(path),
           "shards": shards}
    ds = evaluation_data(reg, CFG, ["a"])
    value = {f"{c}/{i}.png": c * 4 + i for c in range(10) for i in range(4)}  # write_images' pixel code
    private, _, _ = load_sharded("manifest", str(folder), CFG, manifest=path)
    test_values = set(pixel(private.test.images))
    assert set(pixel(ds.train.images)) == {value[f] for f in listed_a} - test_values
    assert set(pixel(ds.test.images)) == test_values - {value[f] for f in listed_b}
    assert set(pixel(ds.test.images)) & {value[f] for f in listed_a}  # a's own held-out rows are used
