"""A compartments run folder: what it holds, and the lineage of every file in it.

    <run>/compartments.json          config, shard key, base model (or pipeline, with the config derived from it),
                                     delta/accountant, shards (name -> classes, trained or not), the options each
                                     shard is trained with (for --resume)
    <run>/lineage.json               artifacts {folder: {"trained_on": [shards]}} and events (train, add, forget)
    <run>/compartments/<shard>/      one compartment (dpldm.compartments.store)
    <run>/work/<shard>/              PRIVATE while its shard trains: the dpldm.train run (checkpoint with the noise
                                     seeds, log); deleted once the compartment is stored
    <run>/samples/<name>/            composed samples, their attribution and evaluation, result.json
    <run>/logs/...                   training logs (per-step losses: not covered by the DP guarantee)
    <run>/.lock                      locked (flock) by the one stage working on the run; holds its pid

Every file in the run folder belongs to the artifact whose folder contains it (compartments.json and lineage.json
are trained on nothing), or to the artifact whose temporary sibling holds it (`.<name>.tmp-*`, `.<name>.old`: what
an atomic write killed half-way leaves). An artifact is recorded BEFORE anything is written into it, so a process
killed at any point leaves no file without lineage. Forgetting shard j removes every artifact whose `trained_on`
holds j, with its temporary siblings.

One stage at a time: every stage holds <run>/.lock while it reads and writes the run (locked()), so that `forget`
cannot run between a `sample`'s reading of the registry and its writing of files trained on the forgotten shard.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import fcntl
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dpldm.common import set_threads
from dpldm.config import load_config
from dpldm.data import DataError
from dpldm.files import json_tmp_name, write_json_atomic
from dpldm.models import CheckpointError

REGISTRY = "compartments.json"
LINEAGE = "lineage.json"
LOCK = ".lock"
METADATA = (REGISTRY, LINEAGE, LOCK)
# the temporary files write_json_atomic leaves when killed between its write and its rename: metadata too
METADATA_TMP = tuple(json_tmp_name(name) for name in METADATA)


class RunError(ValueError):
    """A run folder that is missing, corrupt, or a request it cannot serve (unknown shard, ...)."""


def now() -> str:
    """The time for lineage entries.

    Returns:
        UTC now, ISO 8601 to the second.
    """
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def read_json(path: Path, what: str, fix: str) -> Any:
    """A JSON file of the run, or a RunError that names the file, what is wrong with it, and `fix`.

    Args:
        path: the file.
        what: what it holds, for the message.
        fix: what to do about it, for the message.

    Returns:
        Its parsed content.
    """
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise RunError(f"{path}: missing ({what}); {fix}") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(f"{path}: unreadable or corrupt ({what}: {type(e).__name__}: {e}); {fix}") from e


def _check_shape(path: Path, value: Any, fields: dict[str, type], fix: str) -> None:
    if not isinstance(value, dict):
        raise RunError(f"{path}: corrupt (expected a JSON object, found {type(value).__name__}); {fix}")
    bad = [k for k, t in fields.items() if not isinstance(value.get(k), t)]
    if bad:
        raise RunError(f"{path}: corrupt (entries {', '.join(bad)} missing or of the wrong type); {fix}")


def load(run: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run's registry and lineage, checked enough that the stages can read them.

    Args:
        run: the compartments run folder.

    Returns:
        (compartments.json, lineage.json).

    Raises:
        RunError: not a run, or a file missing, unreadable or of the wrong shape (saying what to do).
    """
    run = Path(run)
    if not (run / REGISTRY).is_file():
        raise RunError(f"{run}: not a compartments run (no {REGISTRY}); create one with "
                       "python -m dpldm.compartments train")
    fix = ("restore it from a backup; without it the run cannot be used (deleting the whole run folder removes "
           "every shard's data with it)")
    reg = read_json(run / REGISTRY, "the run's registry", fix)
    _check_shape(run / REGISTRY, reg, {"shards": dict, "base": dict, "forgotten": list}, fix)
    if not all(isinstance(info, dict) for info in reg["shards"].values()):
        raise RunError(f"{run / REGISTRY}: corrupt (a shard entry is not an object); {fix}")
    lin_fix = ("restore it from a backup. Without it no file can be traced to the shards it was trained on, so "
               "nothing can be forgotten safely: the only safe forget is deleting the whole run folder")
    lineage = read_json(run / LINEAGE, "which shards every file derives from", lin_fix)
    _check_shape(run / LINEAGE, lineage, {"artifacts": dict, "events": list}, lin_fix)
    for folder, art in lineage["artifacts"].items():
        if not (isinstance(art, dict) and isinstance(art.get("trained_on"), list)):
            raise RunError(f"{run / LINEAGE}: corrupt (artifact {folder!r} has no list of shards); {lin_fix}")
    return reg, lineage


def save(run: Path, registry: dict[str, Any], lineage: dict[str, Any]) -> None:
    """Write the run's registry and lineage, each atomically.

    Args:
        run: the run folder (created if needed).
        registry: compartments.json's content.
        lineage: lineage.json's content.
    """
    Path(run).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(run) / REGISTRY, registry)
    write_json_atomic(Path(run) / LINEAGE, lineage)


def new_lineage() -> dict[str, Any]:
    """A new run's lineage.

    Returns:
        No artifact, no event.
    """
    return {"artifacts": {}, "events": []}


def record(lineage: dict[str, Any], folder: str, trained_on: list[str], event: str, **details: Any) -> None:
    """Record that `folder` derives from the shards `trained_on`. An artifact already recorded keeps its shards
    too (the union): its folder may still hold files of the earlier request. To replace an artifact, remove it
    first (remove_artifact).

    Args:
        lineage: the run's lineage (changed in place).
        folder: the artifact, relative to the run folder.
        trained_on: the shards it derives from.
        event: what made it (train, add, sample, ...), for the event log.
        details: more fields of the event.
    """
    old = lineage["artifacts"].get(folder)
    shards = set(trained_on) | set(old["trained_on"] if old else ())
    lineage["artifacts"][folder] = {"trained_on": sorted(shards), "created": old["created"] if old else now()}
    lineage["events"].append({"event": event, "artifact": folder, "time": now(), **details})


def _temp_sibling(name: str) -> str | None:
    """The artifact folder name whose temporary sibling `name` is (`.x.tmp-*`, `.x.tmp`, `.x.old`), else None."""
    m = re.fullmatch(r"\.(.+?)\.(?:tmp-.*|tmp|old)", name)
    return m.group(1) if m else None


def owner(lineage: dict[str, Any], rel: str) -> str | None:
    """The artifact folder a run-relative file path belongs to (longest matching folder, a temporary sibling
    counting as its folder).

    Args:
        lineage: the run's lineage.
        rel: a file's path relative to the run folder.

    Returns:
        The artifact folder, or None if none.
    """
    parts = rel.split("/")
    candidates = {rel}
    for i, part in enumerate(parts):
        base = _temp_sibling(part)
        if base is not None:  # e.g. compartments/.1.tmp-x/weights.safetensors -> compartments/1/weights.safetensors
            candidates.add("/".join([*parts[:i], base, *parts[i + 1:]]))
    best = None
    for folder in lineage["artifacts"]:
        prefix = folder.rstrip("/") + "/"
        if any(c == folder or c.startswith(prefix) for c in candidates) and (best is None or len(folder) > len(best)):
            best = folder
    return best


def artifact_paths(run: Path, folder: str) -> list[Path]:
    """The artifact's folder (or file) and the temporary siblings an interrupted atomic write left, that exist.

    Args:
        run: the run folder.
        folder: the artifact, relative to it.

    Returns:
        The paths that exist.
    """
    path = Path(run) / folder
    paths = [path] if path.exists() or path.is_symlink() else []
    if path.parent.is_dir():
        paths += sorted(p for p in path.parent.iterdir() if _temp_sibling(p.name) == path.name)
    return paths


def remove_artifact(run: Path, lineage: dict[str, Any], folder: str) -> None:
    """Delete an artifact's files (its temporary siblings too) and its lineage entry.

    Args:
        run: the run folder.
        lineage: the run's lineage (changed in place).
        folder: the artifact, relative to the run folder.

    Raises:
        RunError: a path that could not be deleted.
    """
    for path in artifact_paths(run, folder):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        if path.exists() or path.is_symlink():
            shards = lineage["artifacts"].get(folder, {}).get("trained_on", [])
            raise RunError(f"could not delete {path} (derived from shards {', '.join(shards) or 'unknown'}): delete "
                           "it by hand")
    lineage["artifacts"].pop(folder, None)


def unaccounted_files(run: Path, lineage: dict[str, Any]) -> list[str]:
    """Files in the run folder that no artifact (and no metadata file) accounts for.

    Args:
        run: the run folder.
        lineage: its lineage.

    Returns:
        Their paths relative to the run folder.
    """
    run = Path(run)
    files = [p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file() or p.is_symlink()]
    return [f for f in files if f not in METADATA + METADATA_TMP and owner(lineage, f) is None]


def trained(reg: dict[str, Any]) -> list[str]:
    """The shards whose compartment is stored (a run interrupted while training has others, not yet trained).

    Args:
        reg: the run's registry.

    Returns:
        Their names, in the registry's order.
    """
    return [name for name, info in reg["shards"].items() if info.get("trained", True)]


def pending(reg: dict[str, Any]) -> list[str]:
    """The shards registered but not trained yet: what `train --resume` trains.

    Args:
        reg: the run's registry.

    Returns:
        Their names, in the registry's order.
    """
    return [name for name, info in reg["shards"].items() if not info.get("trained", True)]


def router_pending(reg: dict[str, Any], run: Path | None = None) -> bool:
    """Whether the run wants a router and has none trained on exactly its current shards (given `run`: or its
    router folder is gone, e.g. deleted because it was corrupt).

    Args:
        reg: the run's registry.
        run: the run folder, to check that the router folder exists.

    Returns:
        True if a router must be trained.
    """
    runs = reg.get("router_runs") or []
    if not (reg.get("router") and trained(reg)):
        return False
    return not runs or runs[-1]["shards"] != trained(reg) or (run is not None and not (Path(run) / "router").is_dir())


def complete(reg: dict[str, Any], run: Path | None = None) -> bool:
    """Whether the run is complete: every registered shard trained, and the router (if any) trained on them.

    Args:
        reg: the run's registry.
        run: the run folder (see router_pending).

    Returns:
        True if nothing is left to train.
    """
    return not pending(reg) and not router_pending(reg, run)


def config_of(registry: dict[str, Any]) -> dict[str, Any]:
    """The config the run was created with (its name or path and --set overrides; on a pipeline, the config
    derived from it then, recorded whole: dpldm.compartments.pipeline_base).

    Args:
        registry: the run's registry.

    Returns:
        The resolved config.
    """
    set_threads()
    if registry.get("run_config"):
        return copy.deepcopy(registry["run_config"])
    return load_config(registry["config"], registry["set"])


def samples_dir(run: Path, name: str, lineage: dict[str, Any] | None = None) -> Path:
    """samples/<name>: refused when missing, or when the lineage (if given) does not say what it derives from.

    Args:
        run: the run folder.
        name: the samples' name.
        lineage: the run's lineage, to check the samples are in it.

    Returns:
        The folder.

    Raises:
        RunError: as said above.
    """
    folder = Path(run) / "samples" / name
    if not (folder / "samples.npz").is_file():
        raise RunError(f"no samples named {name!r} in {run} (samples/*/samples.npz)")
    if lineage is not None and f"samples/{name}" not in lineage["artifacts"]:
        raise RunError(f"{folder} has no lineage in {run / LINEAGE}: which shards it derives from is unknown, so it "
                       "is not used; delete it and sample again")
    return folder


def rights_shards(rights: Path, user: str) -> list[str]:
    """The shards `user` may access according to a rights file {user: [shard names]}.

    Args:
        rights: the JSON rights file.
        user: the user's name in it.

    Returns:
        The shard names listed for the user.

    Raises:
        RunError: an unreadable file, or no list for the user.
    """
    try:
        table = json.loads(Path(rights).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(f"--rights {rights}: not a readable JSON file ({e})") from e
    if not isinstance(table, dict) or user not in table:
        raise RunError(f"--rights {rights}: no entry for user {user!r}")
    if not isinstance(table[user], list):
        raise RunError(f"--rights {rights}: user {user!r} must map to a list of shard names")
    return [str(s) for s in table[user]]


_held: dict[Path, int] = {}  # run folders this process holds the lock of -> nesting depth


@contextlib.contextmanager
def locked(run: Path, create: bool = False) -> Iterator[None]:
    """Hold the run folder's lock: no other stage (another process) works on the run meanwhile. The lock is the
    kernel's (flock): a killed stage releases it. Re-entrant within a process.

    Args:
        run: the run folder.
        create: create the folder if it does not exist (a new run); it is removed again on exit if the stage left
            nothing in it. Otherwise a missing folder is not locked (the stage refuses it itself).

    Yields:
        Nothing; the lock is held until the block ends.

    Raises:
        RunError: another process holds the lock.
    """
    key = Path(run).resolve()
    if key in _held or not (create or key.is_dir()):
        _held[key] = _held.get(key, 0) + 1
        try:
            yield
        finally:
            _held[key] -= 1
            if not _held[key]:
                del _held[key]
        return
    created = not key.exists()
    key.mkdir(parents=True, exist_ok=True)
    fd = os.open(key / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise RunError(f"{run}: another stage is working on this run (process {holder}); wait for it to finish "
                           "(one stage at a time: a forget between a sample's reads and writes would leave files "
                           "trained on the forgotten shard)") from e
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        _held[key] = 1
        try:
            yield
        finally:
            del _held[key]
            os.ftruncate(fd, 0)
            if created and [p.name for p in key.iterdir()] == [LOCK]:
                (key / LOCK).unlink()
                key.rmdir()
    finally:
        os.close(fd)


def run_folder(args: argparse.Namespace) -> Path | None:
    """The run folder a stage's arguments name.

    Args:
        args: the stage's parsed arguments (--run, or train's --out).

    Returns:
        The folder, or None where the stage computes it (train without --out).
    """
    folder = getattr(args, "run", None) or getattr(args, "out", None)
    return None if folder is None else Path(folder)


def cli(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], Any], argv: list[str] | None) -> Any:
    """A stage's main: parse, run, and turn a refusal (RunError, a shard, data, checkpoint or dpldm.train error) into
    the one-line error the other stages print.

    Args:
        parser: the stage's parser.
        run: the stage's run(args).
        argv: the arguments (None: sys.argv[1:]).

    Returns:
        run's result.
    """
    from dpldm.compartments.shards import ShardError
    from dpldm.train import TrainError

    try:
        args = parser.parse_args(argv)
        folder = run_folder(args)
        with locked(folder, create=True) if folder is not None else contextlib.nullcontext():
            return run(args)
    except (RunError, ShardError, DataError, CheckpointError, TrainError) as e:
        raise SystemExit(f"error: {e}") from e


def check_shards(registry: dict[str, Any], names: list[str], trained_only: bool = True) -> list[str]:
    """Check the shards a request names.

    Args:
        registry: the run's registry.
        names: the shards.
        trained_only: also require each to be trained.

    Returns:
        `names`, unchanged.

    Raises:
        RunError: an unknown shard, or (trained_only) one not trained yet.
    """
    known = list(registry["shards"])
    unknown = [n for n in names if n not in known]
    if unknown:
        raise RunError(f"unknown shard(s) {', '.join(unknown)}: this run has {', '.join(known) or 'none'}"
                       + (f" (forgotten: {', '.join(registry['forgotten'])})" if registry.get("forgotten") else ""))
    untrained = [n for n in names if n not in trained(registry)]
    if trained_only and untrained:
        raise RunError(f"shard(s) {', '.join(untrained)} not trained yet (the run was interrupted): finish it with "
                       "python -m dpldm.compartments train --resume --out RUN, or forget them")
    return names
