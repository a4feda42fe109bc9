"""Resumable DP training state: model weights (safetensors), optimizer, engine (accountant + noise), step, args.

A checkpoint is PRIVATE: state.pt holds the engine's state, i.e. the secret seeds and positions of the DP noise
stream and of the Poisson sampler (so a resumed run continues the same private streams). Whoever reads it can
regenerate the noise of every step of the run and subtract it. It is the only place those seeds are written; each
checkpoint carries a PRIVATE.txt saying so, and train.py deletes the checkpoint once training is finished.

Written atomically (dpldm.models.atomic_dir): a run killed while writing keeps its previous checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dpldm.models import atomic_dir, existing_dir

PRIVATE_NOTE = """PRIVATE: do not share this folder.
state.pt holds the DP engine's state: the secret seeds and stream positions of the Gaussian noise and of the
Poisson sampling of this run (kept so that --resume continues the same private streams). Whoever reads it can
regenerate the noise added to each update and subtract it, which voids the differential-privacy guarantee.
dpldm.train deletes this folder when training finishes; share ldm/, samples.npz, grid.png and result.json instead.
"""


def save_train_state(folder: Path, model: nn.Module, optimizer: Any, engine: Any, step: int, meta: dict[str, Any]
                     ) -> None:
    def write(tmp: Path) -> None:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
        # torch's global RNGs (diffusion timesteps and noise, seeded by --seed): a resume continues them too
        rng = {"torch_rng": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda_rng"] = torch.cuda.get_rng_state_all()
        torch.save({"optimizer": optimizer.state_dict(), "engine": engine.state_dict(), "step": step, **rng},
                   tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=1))
        (tmp / "PRIVATE.txt").write_text(PRIVATE_NOTE)

    atomic_dir(folder, write)


def discard_train_state(folder: Path) -> None:
    """Delete a checkpoint (and the `.old` twin a crash may leave): a finished run keeps no noise state."""
    folder = Path(folder)
    for path in (folder, folder.parent / f".{folder.name}.old"):
        if path.is_dir():
            shutil.rmtree(path)


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
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"])
