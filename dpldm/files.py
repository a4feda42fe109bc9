"""File I/O and hashing shared by dpldm's stages: atomic writes, sha256, SHA256SUMS, small JSON files.

Only the standard library: data loading and the model folders build on it without pulling in torch.

Writes are atomic, so that a process killed at any point leaves the previous version or the new one:
- a folder (a model, a compartment, a router, a base): filled in a temporary sibling `.<name>.tmp-*`, then swapped
  in with two renames (the previous version passes through `.<name>.old`, which readers fall back to);
- a JSON file: written to `.<name>.tmp`, then renamed over the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath
from typing import Any

SHA256SUMS = "SHA256SUMS"
_HEX64 = re.compile(r"[0-9a-f]{64}")


class Sha256SumsError(ValueError):
    """A SHA256SUMS file with a malformed line, a path leaving its folder, or a path listed twice."""


def atomic_dir(dest: Path, write: Callable[[Path], None]) -> None:
    """Write a folder atomically: fill a temporary sibling, then swap it in with os.replace.

    Args:
        dest: the folder to (re)place; its parent is created if needed.
        write: fills the temporary folder it is given; an exception leaves `dest` as it was.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        write(tmp)
        old = dest.parent / f".{dest.name}.old"
        if old.exists():
            shutil.rmtree(old)
        if dest.exists():
            os.replace(dest, old)  # a crash here leaves `.old`, which load paths fall back to
        os.replace(tmp, dest)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def existing_dir(path: Path) -> Path | None:
    """The folder, or its `.old` twin left by a crash between the two renames of atomic_dir.

    Args:
        path: the folder atomic_dir wrote.

    Returns:
        `path` if it is a folder, else its `.old` twin if that is one, else None.
    """
    path = Path(path)
    if path.is_dir():
        return path
    old = path.parent / f".{path.name}.old"
    return old if old.is_dir() else None


def json_tmp_name(name: str) -> str:
    """The name of the temporary file write_json_atomic leaves beside `name` when killed before its rename.

    Args:
        name: the JSON file's name.

    Returns:
        `.<name>.tmp`.
    """
    return f".{name}.tmp"


def write_json_atomic(path: Path, value: Any) -> None:
    """Write a JSON file atomically: a crash leaves the old file or the new one, never half of one.

    Args:
        path: the file to (re)place.
        value: anything json.dumps takes; written with indent=1.
    """
    tmp = path.with_name(json_tmp_name(path.name))
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def read_json_or_empty(path: Path) -> dict[str, Any]:
    """A JSON metadata file, or {} when there is none (metadata an older version did not write).

    Args:
        path: the file.

    Returns:
        Its parsed content, or {} if `path` is not a file.
    """
    return json.loads(path.read_text()) if path.is_file() else {}


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks.

    Args:
        path: the file.

    Returns:
        The hex digest (64 characters).
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def safe_relative(rel: str) -> bool:
    """Whether a path read from a file stays inside its folder: relative, no `..`, no backslash, not empty.

    Args:
        rel: a POSIX path, as a SHA256SUMS line gives it.

    Returns:
        True if joining it to a folder cannot leave that folder.
    """
    p = PurePosixPath(rel)
    return bool(rel) and not p.is_absolute() and ".." not in p.parts and "\\" not in rel


def read_sha256sums(path: Path, strict: bool = True) -> dict[str, str]:
    """A SHA256SUMS file (`sha256sum -c` format: `<sha256>  <relative path>` per line) as {path: sha256}.

    Args:
        path: the file (it must exist).
        strict: refuse a malformed line, a path leaving the folder or a path listed twice (files a user may have
            edited); otherwise lines without the two-space separator are skipped (the package's own files, looked
            up by name).

    Returns:
        {relative path: hex sha256}, in the file's order.

    Raises:
        Sha256SumsError: (strict) naming the file, the line and what a line must look like.
    """
    entries: dict[str, str] = {}
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, rel = line.partition("  ")
        if not strict:
            if sep:
                entries[rel] = digest
            continue
        if not sep or not _HEX64.fullmatch(digest) or not safe_relative(rel) or rel in entries:
            raise Sha256SumsError(f"{path}, line {i}: malformed entry {line!r} (expected '<sha256>  <relative path>', "
                                  "each path once)")
        entries[rel] = digest
    return entries


def write_sha256sums(folder: Path, names: Iterable[str]) -> None:
    """Write <folder>/SHA256SUMS listing the sha256 of each named file, in `sha256sum -c` format.

    Args:
        folder: the folder the names are relative to, where SHA256SUMS is written.
        names: POSIX paths relative to `folder`, in the order to list them.
    """
    folder = Path(folder)
    (folder / SHA256SUMS).write_text("".join(f"{sha256_file(folder / rel)}  {rel}\n" for rel in names))
