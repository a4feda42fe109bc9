"""Splitting the private training data into disjoint shards, one compartment each.

The key is chosen by the user, never by looking at the data:
- `class`: classes in contiguous groups, shard s holds the classes c with c * n // num_classes == s;
- `random`: a seeded permutation of the training split cut into n near-equal parts;
- `manifest`: a JSON file {shard: [entries]} or a CSV file of `entry,shard` lines, an entry being an image path
  relative to the --data folder (e.g. `3/img_001.png`) or a row of the --data .npz (or of the built-in set);
- `folders`: --data ROOT holds one folder per shard, each with class sub-folders (ROOT/<shard>/<class>/<image>);
  the classes are the union of their names.
An example in two shards is refused (it would pay twice, and forgetting one shard would not forget it); so is a
shard with no training example (found before anything is trained). Entries that fall in the fixed held-out test
split (dpldm.data: the same rows every run, never trained on) are left out of training and counted; they stay the
shard's own (Shard.held_out_rows): evaluation uses them only for that shard. Which classes a class shard holds
follows from the key alone, so it is public and sets the mixture prior at sampling (lambda_{i,c} = 1 if class c is
in shard i); shard sizes enter only each compartment's sampling rate.

Examples are compared by content (example_hashes: sha256 of each image's pixels as loaded), so that new data added
to a run (`add`) is refused when it holds an image already in one of the run's shards. Only exact copies are found
(the same pixels after loading); a re-encoded or resized copy is not.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dpldm import data as data_mod
from dpldm.common import load_private, private_classes
from dpldm.data import DataSet, Split

KEYS = ("class", "random", "manifest", "folders")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ShardError(ValueError):
    """A shard specification that cannot be used (overlap, unknown shard, bad manifest)."""


@dataclass
class Shard:
    """One shard of the private training data: one compartment's data."""

    name: str
    index: np.ndarray  # rows of the private training split
    classes: list[int] | None = field(default=None)  # class key: the classes it holds (public: from the key)
    # manifest and folders keys: source rows the shard lists that are in the held-out test split (not trained on,
    # but the shard's own data: evaluation uses them only for this shard)
    held_out_rows: np.ndarray | None = field(default=None)

    def data(self, private: DataSet) -> DataSet:
        """The shard as a data set: its training rows; the test split stays the private data's (never trained on).

        Args:
            private: the private data set the shard's rows index.

        Returns:
            The shard's data set.
        """
        t = private.train
        train = Split(t.images[self.index], t.labels[self.index], None if t.rows is None else t.rows[self.index])
        return DataSet(train, private.test, private.num_classes, f"{private.source} [shard {self.name}]")


def check_name(name: str) -> str:
    """Refuse a shard name that is not a plain folder name.

    Args:
        name: the shard's name (it becomes a folder of the run).

    Returns:
        `name`.

    Raises:
        ShardError: letters, digits, '.', '_', '-' only, at most 64, not starting with '.'.
    """
    if not NAME.match(name):
        raise ShardError(f"shard name {name!r}: use letters, digits, '.', '_' or '-' (at most 64, not starting "
                         "with '.')")
    return name


def by_class(labels: np.ndarray, num_classes: int, n: int) -> list[Shard]:
    """The class key: shard s holds the classes c with c * n // num_classes == s.

    Args:
        labels: the training labels.
        num_classes: the number of classes (from the config).
        n: the number of shards.

    Returns:
        The shards, named "0" .. "n-1", each with its classes.

    Raises:
        ShardError: n outside 1..num_classes, or a shard with no training example.
    """
    if not 1 <= n <= num_classes:
        raise ShardError(f"--num-shards {n}: a class key needs 1..{num_classes} shards ({num_classes} classes)")
    group = np.arange(num_classes) * n // num_classes
    shards = [Shard(str(s), np.flatnonzero(np.isin(labels, np.flatnonzero(group == s))),
                    [int(c) for c in np.flatnonzero(group == s)]) for s in range(n)]
    empty = [s for s in shards if not len(s.index)]
    if empty:  # found now, before any shard is trained, not when its turn comes
        raise ShardError("shard(s) " + ", ".join(f"{s.name} (classes {s.classes})" for s in empty) + " hold no "
                         "training example: the data has none of those classes. Use fewer --num-shards, another "
                         "--shard-by, or data with every class")
    return shards


def at_random(n_examples: int, n: int, seed: int) -> list[Shard]:
    """The random key: a seeded permutation of the training rows cut into n near-equal parts.

    Args:
        n_examples: the number of training examples.
        n: the number of shards.
        seed: the permutation's seed.

    Returns:
        The shards, named "0" .. "n-1".

    Raises:
        ShardError: n outside 1..n_examples.
    """
    if not 1 <= n <= n_examples:
        raise ShardError(f"--num-shards {n}: need 1..{n_examples} shards")
    perm = np.random.default_rng(seed).permutation(n_examples)
    return [Shard(str(s), np.sort(part)) for s, part in enumerate(np.array_split(perm, n))]


def read_shard_manifest(path: Path) -> dict[str, list[Any]]:
    """A shard manifest (--manifest): a JSON object, or CSV lines `entry,shard` (a header line is skipped).

    Args:
        path: the file; a .csv suffix means CSV.

    Returns:
        {shard: [entries]}, an entry being a row (int) or a file path (str).

    Raises:
        ShardError: unreadable, malformed CSV, invalid JSON or not a JSON object.
    """
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ShardError(f"--manifest {path}: cannot read it ({e})") from e
    if Path(path).suffix.lower() == ".csv":
        spec: dict[str, list[Any]] = {}
        for i, row in enumerate(csv.reader(text.splitlines())):
            if not row or (i == 0 and [c.strip().lower() for c in row] in (["file", "shard"], ["row", "shard"])):
                continue
            if len(row) != 2:
                raise ShardError(f"--manifest {path}, line {i + 1}: expected `entry,shard`, got {row}")
            entry = row[0].strip()
            spec.setdefault(row[1].strip(), []).append(int(entry) if entry.isdigit() else entry)
        return spec
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise ShardError(f"--manifest {path}: not valid JSON ({e})") from e
    if not isinstance(spec, dict):
        raise ShardError(f"--manifest {path}: expected a JSON object {{shard: [file paths or rows]}}")
    return spec


def from_manifest(spec: dict[str, list[Any]], private: DataSet, where: str) -> tuple[list[Shard], dict[str, int]]:
    """Shards from a manifest.

    Args:
        spec: {shard: [source rows or file paths]}.
        private: the private data set the entries name.
        where: where the spec came from, for messages.

    Returns:
        (the shards, per shard how many of its entries are in the held-out test split and left out).

    Raises:
        ShardError: no shard, an empty one, an unknown entry, an entry in two shards, or a shard with no training
            example.
    """
    if not spec:
        raise ShardError(f"{where}: no shards")
    n_source = len(private.train.labels) + len(private.test.labels)
    files = {f: i for i, f in enumerate(private.files or [])}
    rows_of = private.train.rows if private.train.rows is not None else np.arange(len(private.train.labels))
    train_pos = {int(r): k for k, r in enumerate(rows_of)}
    shards, owner, held_out = [], {}, {}
    for name, entries in spec.items():
        check_name(str(name))
        if not isinstance(entries, list) or not entries:
            raise ShardError(f"{where}: shard {name!r} must list at least one entry")
        rows = []
        for e in entries:
            if isinstance(e, bool) or not isinstance(e, (int, str)):
                raise ShardError(f"{where}: shard {name!r}: entry {e!r} is neither a row nor a file path")
            if isinstance(e, str):
                if e not in files:
                    raise ShardError(f"{where}: shard {name!r}: {e!r} is not an image of {private.source}"
                                     + ("" if files else " (the data is not a folder: give rows)"))
                e = files[e]
            if not 0 <= e < n_source:
                raise ShardError(f"{where}: shard {name!r}: row {e} outside the {n_source} examples")
            if e in owner:
                raise ShardError(f"{where}: example {e} is in shards {owner[e]!r} and {name!r}: shards must be "
                                 "disjoint (an example in two compartments pays twice, and forgetting one shard "
                                 "would not forget it)")
            owner[e] = name
            rows.append(e)
        index = sorted(train_pos[r] for r in rows if r in train_pos)
        held_out[name] = len(rows) - len(index)
        if not index:
            raise ShardError(f"{where}: every entry of shard {name!r} is in the held-out test split")
        shards.append(Shard(str(name), np.asarray(index, dtype=np.int64),
                            held_out_rows=np.asarray(sorted(r for r in rows if r not in train_pos), dtype=np.int64)))
    return shards, held_out


def example_hashes(split: Split) -> list[str]:
    """sha256 of each example's image as loaded (shape and pixels; the label is left out: the same image under
    another label is still the same record).

    Args:
        split: the examples.

    Returns:
        One hex digest per example, in order.
    """
    return [hashlib.sha256(f"{img.shape}".encode() + np.ascontiguousarray(img).tobytes()).hexdigest()
            for img in split.images]


def overlap(new: Split, shards: dict[str, DataSet]) -> dict[str, int]:
    """How much of each shard new data repeats (same content).

    Args:
        new: the new examples.
        shards: {shard: its data set}.

    Returns:
        {shard: how many of its training examples are also in `new`}, only for shards that share at least one.
    """
    fresh = set(example_hashes(new))
    counts = {name: sum(h in fresh for h in example_hashes(ds.train)) for name, ds in shards.items()}
    return {name: k for name, k in counts.items() if k}


def sharded_folder(root: Path, cfg: dict[str, Any]) -> tuple[DataSet, dict[str, list[str]]]:
    """The folders key: ROOT/<shard>/<class>/<image>.

    Args:
        root: the folder of shard folders.
        cfg: the config (channels, image size, number of classes).

    Returns:
        (one data set over all images, with the fixed held-out split, its manifest {shard: [file paths]}).

    Raises:
        ShardError: no shard folder, or class folders that do not match the config.
    """
    d, nc = cfg["data"], private_classes(cfg)
    dirs = sorted(p for p in Path(root).iterdir() if p.is_dir())
    if not dirs:
        raise ShardError(f"--shard-by folders: {root} holds no shard folders")
    classes = sorted({c.name for s in dirs for c in s.iterdir() if c.is_dir()})
    if len(classes) != nc:
        raise ShardError(f"--shard-by folders: the shard folders of {root} hold {len(classes)} class names "
                         f"{classes}, the config says {nc} classes")
    parts, files, spec = [], [], {}
    for s in dirs:
        split, _ = data_mod.from_folder(s, d["channels"], nc, d["image_size"], classes)
        names = [f"{s.name}/{rel}" for rel, _ in data_mod.folder_listing(s, nc, classes)[1]]
        parts.append(split)
        files += names
        spec[s.name] = names
    full = Split(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]))
    return data_mod.held_out(full, str(root), nc, files), spec


def run_data(reg: dict[str, Any], cfg: dict[str, Any]) -> tuple[DataSet, list[Shard], dict[str, int]]:
    """load_sharded with what a compartments run recorded.

    Args:
        reg: the run's registry (compartments.json).
        cfg: the run's config.

    Returns:
        As load_sharded.
    """
    return load_sharded(reg["key"], reg["data"], cfg, reg["num_shards"], reg["shard_seed"],
                        Path(reg["manifest"]) if reg.get("manifest") else None)


def load_sharded(key: str, data: str | None, cfg: dict[str, Any], n: int | None = None, seed: int = 0,
                 manifest: Path | None = None) -> tuple[DataSet, list[Shard], dict[str, int]]:
    """The private data and its shards under a key (see the module docstring).

    Args:
        key: class, random, manifest or folders.
        data: the private data (a built-in name, a folder or an .npz; None: the config's); for folders, ROOT.
        cfg: the config.
        n: the number of shards (class: default one per class; random: required).
        seed: the random key's seed.
        manifest: the manifest key's file.

    Returns:
        (the private data set, its shards, per shard the number of its entries left out because they are in the
        held-out test split (manifest and folders keys)).

    Raises:
        ShardError: an unknown key, or one missing what it needs, or shards that cannot be used.
    """
    if key not in KEYS:
        raise ShardError(f"--shard-by must be one of {KEYS}, got {key!r}")
    if key == "folders":
        if not data or not Path(data).is_dir():
            raise ShardError("--shard-by folders needs --data ROOT, a folder of shard folders")
        private, spec = sharded_folder(Path(data), cfg)
        shards, held = from_manifest(spec, private, f"--data {data}")
        return private, shards, held
    private = load_private(data or cfg["data"]["private"], cfg)
    labels = private.train.labels
    if key == "class":
        return private, by_class(labels, private.num_classes, n or private.num_classes), {}
    if key == "random":
        if n is None:
            raise ShardError("--shard-by random needs --num-shards")
        return private, at_random(len(labels), n, seed), {}
    if manifest is None:
        raise ShardError("--shard-by manifest needs --manifest FILE")
    shards, held = from_manifest(read_shard_manifest(manifest), private, f"--manifest {manifest}")
    return private, shards, held
