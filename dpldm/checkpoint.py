"""Resumable DP training state: model weights (safetensors), optimizer, engine (accountant + noise), step, args.

Written atomically (dpldm.models.atomic_dir): a run killed while writing keeps its previous checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dpldm.models import atomic_dir, existing_dir


def save_train_state(folder: Path, model: nn.Module, optimizer: Any, engine: Any, step: int, meta: dict[str, Any]
                     ) -> None:
    def write(tmp: Path) -> None:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "engine": engine.state_dict(), "step": step,
                    "torch_rng": torch.get_rng_state()}, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=1))

    atomic_dir(folder, write)


def read_meta(folder: Path) -> dict[str, Any] | None:
    found = existing_dir(folder)
    return json.loads((found / "meta.json").read_text()) if found is not None else None


def load_train_state(folder: Path, model: nn.Module, optimizer: Any, engine: Any) -> int:
    """Restores everything in place; returns the number of logical steps already taken."""
    found = existing_dir(folder)
    if found is None:
        raise FileNotFoundError(f"no checkpoint at {folder}")
    weights = load_file(found / "model.safetensors")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {found} does not match the model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    state = torch.load(found / "state.pt", weights_only=False)  # our own file: optimizer + accountant history
    optimizer.load_state_dict(state["optimizer"])
    engine.load_state_dict(state["engine"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"])
