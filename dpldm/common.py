"""Small helpers shared by the stages: CLI arguments, seeds, default run folders, data to tensors."""

from __future__ import annotations

import argparse
import math
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpldm import data as data_mod
from dpldm.config import load_config

DEFAULT_RUNS = Path(os.environ.get("DPLDM_RUNS", "runs"))


def set_threads() -> int:
    """CPU threads for torch: DPLDM_THREADS if set (e.g. 1 on a machine shared with other jobs), else torch's default.

    Guessing idle cores from the load average picked one thread on an idle machine that had just been busy."""
    n = int(os.environ.get("DPLDM_THREADS", "0"))
    if n > 0:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "--preset", dest="config", default="mnist",
                   help="preset name in dpldm/configs/ (mnist, fmnist, rgb32, rgb64, tiny) or a YAML/JSON path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config entry, e.g. --set pretrain.steps=200 (repeatable)")
    p.add_argument("--runs", type=Path, default=DEFAULT_RUNS, help="cache / run root (default ./runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=default_device())


def default_device() -> str:
    """The --device default: "cuda" when a GPU is visible, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def config_from(args: argparse.Namespace) -> dict[str, Any]:
    set_threads()
    return load_config(args.config, args.set)


def seed_all(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def public_dir(args: argparse.Namespace, cfg: dict[str, Any]) -> Path:
    return Path(args.runs) / cfg["name"] / "public"


def private_classes(cfg: dict[str, Any]) -> int:
    """The private label count: data.private_num_classes if set (a label set other than the public one), else
    data.num_classes. Always from the config, never from the private labels."""
    d = cfg["data"]
    return int(d.get("private_num_classes") or d["num_classes"])


def load_private(name: str, cfg: dict[str, Any]) -> data_mod.DataSet:
    d = cfg["data"]
    return data_mod.load(name, d["channels"], private_classes(cfg), d["image_size"])


def load_public(cfg: dict[str, Any]) -> data_mod.DataSet:
    d = cfg["data"]
    return data_mod.load(d["public"], d["channels"], d["num_classes"], d["image_size"])


def images_tensor(split: data_mod.Split, cfg: dict[str, Any]) -> torch.Tensor:
    d = cfg["data"]
    return data_mod.to_model_tensor(split.images, d["image_size"], d["pad_to"], d["channels"])


def cycle_batches(n: int, batch_size: int, gen: torch.Generator):
    """Endless shuffled index batches (ordinary, non-private training)."""
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            yield perm[i : i + batch_size]


def warmup_cosine(opt: torch.optim.Optimizer, steps: int, warmup_fraction: float = 0.05) -> torch.optim.lr_scheduler.LambdaLR:
    warm = max(1, int(warmup_fraction * steps))

    def factor(i: int) -> float:
        if i < warm:
            return (i + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (i - warm) / max(1, steps - warm))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)
