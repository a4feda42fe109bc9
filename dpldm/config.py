"""Configs: small YAML files in dpldm/configs/ (a preset name) or a user's YAML/JSON path, plus key=value overrides."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"


def presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_config(name_or_path: str, overrides: list[str] | None = None) -> dict[str, Any]:
    path = Path(name_or_path)
    if not path.is_file():
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown config {name_or_path!r}: not a file, and not a preset ({', '.join(presets())})")
    text = path.read_text()
    cfg = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    # a pipeline preset (requires_pipeline: true) takes its model from the pipeline folder (dpldm/pipeline.py)
    needed = {"data", "train"} if isinstance(cfg, dict) and cfg.get("requires_pipeline") else {
        "data", "autoencoder", "unet", "scheduler"}
    if not isinstance(cfg, dict) or not needed <= cfg.keys():
        raise ValueError(f"{path}: a config needs sections {', '.join(sorted(needed))}")
    cfg = copy.deepcopy(cfg)
    cfg.setdefault("name", path.stem)
    for item in overrides or []:
        set_key(cfg, item)
    return cfg


def set_key(cfg: dict[str, Any], item: str) -> None:
    """'train.epochs=3' -> cfg['train']['epochs'] = 3 (value parsed as YAML)."""
    key, sep, value = item.partition("=")
    if not sep:
        raise ValueError(f"--set expects key=value, got {item!r}")
    *parents, leaf = key.split(".")
    node = cfg
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = yaml.safe_load(value)
