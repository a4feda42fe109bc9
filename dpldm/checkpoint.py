"""Resumable DP training state: model weights (safetensors), optimizer, engine (accountant + noise), step, args.

A checkpoint is PRIVATE: state.pt holds the engine's state, i.e. the secret seeds and positions of the DP noise
stream and of the Poisson sampler (so a resumed run continues the same private streams). Whoever reads it can
regenerate the noise of every step of the run and subtract it. It is the only place those seeds are written; each
checkpoint carries a PRIVATE.txt saying so, and train.py deletes the checkpoint once training is finished.

Written whole or not at all: a new checkpoint is filled in a temporary folder, then the current one becomes
`<name>.prev` and the new one takes its name, so a run killed, or a disk full, while writing keeps its previous
checkpoint as the latest. meta.json records the sha256 of model.safetensors and state.pt: a corrupt or truncated
checkpoint is refused with the reason, and resuming falls back to `<name>.prev`.

A writer killed (SIGKILL, power loss) before its rename leaves its temporary folder `.<name>.tmp-*`, with a complete
or partial state.pt in it: private too. private_paths() lists it with the checkpoint, and discard_train_state()
deletes it with the rest.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dpldm.files import sha256_file

PRIVATE_NOTE = """PRIVATE: do not share this folder.
state.pt holds the DP engine's state: the secret seeds and stream positions of the Gaussian noise and of the
Poisson sampling of this run (kept so that --resume continues the same private streams). Whoever reads it can
regenerate the noise added to each update and subtract it, which voids the differential-privacy guarantee.
dpldm.train deletes this folder when training finishes; share ldm/, samples.npz, grid.png and result.json instead.
"""


FILES = ("model.safetensors", "state.pt")


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
        sums = {name: sha256_file(tmp / name) for name in FILES}
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "sha256": sums}, indent=1))
        (tmp / "PRIVATE.txt").write_text(PRIVATE_NOTE)
        for f in tmp.iterdir():  # on disk before the rename makes it the latest
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        write(tmp)
        prev = previous(folder)
        if folder.is_dir():
            if prev.exists():
                shutil.rmtree(prev)
            os.replace(folder, prev)  # a crash here leaves only .prev, which latest_checkpoint finds
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def previous(folder: Path) -> Path:
    return Path(folder).parent / f"{Path(folder).name}.prev"


def problem(folder: Path) -> str | None:
    """Why the checkpoint in `folder` cannot be used (None: it is intact)."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"meta.json unreadable ({type(e).__name__})"
    sums = meta.get("sha256")
    if not isinstance(sums, dict):
        return "no checksums in meta.json (written by an older version, or edited)"
    for name in FILES:
        if not (folder / name).is_file():
            return f"{name} missing"
        if sha256_file(folder / name) != sums.get(name):
            return f"{name} corrupt or truncated (sha256 mismatch)"
    return None


def intact_checkpoints(folder: Path) -> tuple[list[tuple[Path, dict[str, Any]]], list[str]]:
    """Every intact checkpoint, newest first: `folder`, `folder.prev` (and the `.old` twin a crash inside an older
    writer may have left), each with its meta; and why each refused one was refused."""
    folder = Path(folder)
    found, refused = [], []
    for path in (folder, previous(folder), folder.parent / f".{folder.name}.old"):
        if not path.is_dir():
            continue
        why = problem(path)
        if why is None:
            found.append((path, json.loads((path / "meta.json").read_text())))
        elif not found:
            refused.append(f"{path}: {why}")
    return found, refused


def latest_checkpoint(folder: Path) -> tuple[Path | None, dict[str, Any] | None, list[str]]:
    """The newest intact checkpoint (see intact_checkpoints): (its path, its meta, why each newer one was
    refused); (None, None, reasons) if there is none."""
    found, refused = intact_checkpoints(folder)
    return (*found[0], refused) if found else (None, None, refused)


def at_step(folder: Path, step: int) -> tuple[Path | None, dict[str, Any] | None]:
    """The intact checkpoint of `step` in `folder` (the latest or the previous one), if any."""
    return next(((path, meta) for path, meta in intact_checkpoints(folder)[0] if meta.get("step") == step),
                (None, None))


def private_paths(folder: Path) -> list[Path]:
    """Every path that may hold this checkpoint's private state and exists: the checkpoint, its `.prev`, an `.old`
    twin, and the temporary folders of writes that were killed before their rename (`.<name>.tmp-*`).

    Args:
        folder: the checkpoint folder (e.g. <run>/checkpoint).
    """
    folder = Path(folder)
    paths = [folder, previous(folder), folder.parent / f".{folder.name}.old"]
    paths += sorted(folder.parent.glob(f".{glob.escape(folder.name)}.tmp-*"))
    return [p for p in paths if p.exists() or p.is_symlink()]


def remove_private(path: Path) -> None:
    """Delete a private file or folder; another process deleting it at the same time (a rank sweeping every
    rank's leftovers) is fine, a path that survives is an error (its secrets would outlive the run)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    if path.exists() or path.is_symlink():
        raise OSError(f"could not delete {path}, which holds private DP state (noise seeds): delete it by hand")


def discard_interrupted_writes(folder: Path) -> None:
    """Delete the temporary folders killed writers of this checkpoint left (never used again, and private).

    Args:
        folder: the checkpoint folder; call it only when no write of it is under way (at a run's start).
    """
    for path in Path(folder).parent.glob(f".{glob.escape(Path(folder).name)}.tmp-*"):
        remove_private(path)


def discard_train_state(folder: Path) -> None:
    """Delete a checkpoint, its `.prev`, any `.old` twin and any killed write's temporary folder: a finished run
    keeps no noise state.

    Args:
        folder: the checkpoint folder (e.g. <run>/checkpoint).
    """
    for path in private_paths(folder):
        remove_private(path)


def load_train_state(found: Path, model: nn.Module, optimizer: Any, engine: Any) -> int:
    """Restores everything in place from an intact checkpoint (latest_checkpoint's); returns the number of logical
    steps already taken."""
    why = problem(found)
    if why is not None:
        raise ValueError(f"checkpoint {found}: {why}")
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
