"""A compartments run folder: what it holds, and the lineage of every file in it.

    <run>/compartments.json          config, shard key, base model, delta/accountant, shards (name -> classes)
    <run>/lineage.json               artifacts {folder: {"trained_on": [shards]}} and events (train, add, forget)
    <run>/compartments/<shard>/      one compartment (dpldm.compartments.store)
    <run>/samples/<name>/            composed samples, their attribution, result.json
    <run>/logs/...                   training logs (per-step losses: not covered by the DP guarantee)

Every file in the run folder belongs to the artifact whose folder contains it (compartments.json and lineage.json
are trained on nothing). Forgetting shard j removes every artifact whose `trained_on` holds j.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dpldm.common import set_threads
from dpldm.config import load_config

REGISTRY = "compartments.json"
LINEAGE = "lineage.json"
METADATA = (REGISTRY, LINEAGE)


class RunError(ValueError):
    """A run folder that is missing, or a request it cannot serve (unknown shard, ...)."""


def write_json(path: Path, value: Any) -> None:
    """Atomically: a crash leaves the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def load(run: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    run = Path(run)
    if not (run / REGISTRY).is_file():
        raise RunError(f"{run}: not a compartments run (no {REGISTRY}); create one with "
                       "python -m dpldm.compartments train")
    return json.loads((run / REGISTRY).read_text()), json.loads((run / LINEAGE).read_text())


def save(run: Path, registry: dict[str, Any], lineage: dict[str, Any]) -> None:
    Path(run).mkdir(parents=True, exist_ok=True)
    write_json(Path(run) / REGISTRY, registry)
    write_json(Path(run) / LINEAGE, lineage)


def new_lineage() -> dict[str, Any]:
    return {"artifacts": {}, "events": []}


def record(lineage: dict[str, Any], folder: str, trained_on: list[str], event: str, **details: Any) -> None:
    lineage["artifacts"][folder] = {"trained_on": sorted(trained_on), "created": now()}
    lineage["events"].append({"event": event, "artifact": folder, "time": now(), **details})


def owner(lineage: dict[str, Any], rel: str) -> str | None:
    """The artifact folder a run-relative file path belongs to (longest matching folder), None if none."""
    best = None
    for folder in lineage["artifacts"]:
        if (rel == folder or rel.startswith(folder.rstrip("/") + "/")) and (best is None or len(folder) > len(best)):
            best = folder
    return best


def unaccounted_files(run: Path, lineage: dict[str, Any]) -> list[str]:
    """Files in the run folder that no artifact (and no metadata file) accounts for."""
    run = Path(run)
    files = [p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()]
    return [f for f in files if f not in METADATA and not f.startswith(".") and owner(lineage, f) is None]


def config_of(registry: dict[str, Any]) -> dict[str, Any]:
    """The config the run was created with (its name or path and --set overrides)."""
    set_threads()
    return load_config(registry["config"], registry["set"])


def samples_dir(run: Path, name: str) -> Path:
    folder = Path(run) / "samples" / name
    if not (folder / "samples.npz").is_file():
        raise RunError(f"no samples named {name!r} in {run} (samples/*/samples.npz)")
    return folder


def cli(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], Any], argv: list[str] | None) -> Any:
    """A stage's main: parse, run, and turn a RunError into the one-line error the other stages print."""
    try:
        return run(parser.parse_args(argv))
    except RunError as e:
        raise SystemExit(f"error: {e}") from e


def check_shards(registry: dict[str, Any], names: list[str]) -> list[str]:
    known = list(registry["shards"])
    unknown = [n for n in names if n not in known]
    if unknown:
        raise RunError(f"unknown shard(s) {', '.join(unknown)}: this run has {', '.join(known) or 'none'}"
                       + (f" (forgotten: {', '.join(registry['forgotten'])})" if registry.get("forgotten") else ""))
    return names
