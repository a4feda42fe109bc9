"""Shipped base models: a public pre-trained autoencoder + class-conditional LDM that installs with the package.

A base is a folder (dpldm/bases/<name>/ in the package, or any folder named by a path):

    autoencoder/    diffusers AutoencoderKL folder (config.json, diffusion_pytorch_model.safetensors, dpldm.json)
    ldm/            unet/ (diffusers), class_embedder/, ldm.json: the layout save_ldm writes
    base.json       machine-readable record: name, dtype, each stage's steps / wall time / machine / command
    MODEL_CARD.md   the same for people, with the rebuild command and the sha256 of every file
    SHA256SUMS      sha256 of every other file in the folder, in `sha256sum -c` format

Weights are stored as fp16 safetensors (half the size) and loaded back as fp32. Before anything is loaded every
file is checked against SHA256SUMS: a changed, missing or unlisted file is refused (CheckpointError naming it).
`python -m dpldm.ship` turns the folders the pre-training stages write into a base; this module finds,
verifies and loads bases, and holds the run record those stages write into their metadata.

Names are looked up in the folders of $DPLDM_BASES (os.pathsep-separated) first, then in the package's
dpldm/bases/. A value with a path separator (./NAME, /x/NAME) is a folder.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import re
import shlex
import time
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from diffusers import AutoencoderKL

from dpldm.models import CheckpointError, ConditionalUNet, load_autoencoder, load_ldm

BASES_DIR = Path(__file__).parent / "bases"
BASES_ENV = "DPLDM_BASES"
MANIFEST = "SHA256SUMS"
CARD = "MODEL_CARD.md"
RECORD = "base.json"
# The files a base cannot work without: a manifest that omits one is refused before diffusers is reached.
REQUIRED = ("autoencoder/config.json", "autoencoder/diffusion_pytorch_model.safetensors", "ldm/ldm.json",
            "ldm/unet/config.json", "ldm/unet/diffusion_pytorch_model.safetensors",
            "ldm/class_embedder/config.json", "ldm/class_embedder/model.safetensors")
# The autoencoder files whose hashes the LDM's metadata records: the LDM was trained on latents of exactly these.
AE_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
_HEX64 = re.compile(r"[0-9a-f]{64}")
# How images were laid out for the base (its architecture alone does not say: 28 px padded to 32 fits a 32 px VAE).
LAYOUT_KEYS = ("image_size", "pad_to", "channels")


class BaseNotFound(CheckpointError):
    """The named base is not installed (not built yet, or not in the search path)."""


# --- what the pre-training stages record ---------------------------------------------------------------------

def command_line(module: str, argv: list[str]) -> str:
    """The command as typed: `python -m <module> <args>`, quoted so that it can be pasted back."""
    return shlex.join(["python", "-m", module, *argv])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """Where a stage ran: CPU model, cores available to the process, torch threads, library versions, GPU."""
    import diffusers

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info: dict[str, Any] = {"cpu": cpu_model(), "cores": cores, "torch_threads": torch.get_num_threads(),
                            "torch": torch.__version__, "diffusers": diffusers.__version__,
                            "python": platform.python_version(), "device": device}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def run_record(cfg: dict[str, Any], *, steps: int, batch_size: int, seed: int, device: str, t_start: float,
               public_images: int, command: str | None) -> dict[str, Any]:
    """The metadata a pre-training stage saves beside its weights, from which a model card is written.

    `command` is None when the stage was called from Python (e.g. train pre-training on the way); the resolved
    config is recorded either way, so the run can be redone."""
    return {"steps": steps, "batch_size": batch_size, "seed": seed, "public_images": public_images,
            "wall_s": round(time.time() - t_start, 1),
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(device), "command": command, "config": cfg}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def autoencoder_hashes(ae_dir: Path) -> dict[str, str]:
    """sha256 of the autoencoder files an LDM depends on (weights, and config.json for its scaling factor)."""
    return {f: sha256_file(Path(ae_dir) / f) for f in AE_FILES if (Path(ae_dir) / f).is_file()}


# --- finding and verifying a base ----------------------------------------------------------------------------

def search_dirs() -> list[Path]:
    extra = [Path(p) for p in os.environ.get(BASES_ENV, "").split(os.pathsep) if p]
    return [*extra, BASES_DIR]


def shipped_bases() -> list[str]:
    """Names of the bases installed with the package (folders of dpldm/bases/ holding a SHA256SUMS)."""
    return sorted(p.parent.name for p in BASES_DIR.glob(f"*/{MANIFEST}"))


def locate_base(name: str) -> Path:
    """The folder of a base, by name (searched in $DPLDM_BASES, then the package) or by path."""
    if os.sep in name or "/" in name:  # a path; a bare name is only looked up (./NAME for a folder here)
        if Path(name).expanduser().is_dir():
            return Path(name).expanduser()
        raise BaseNotFound(f"base {name!r}: no such folder.")
    for d in search_dirs():
        if (d / name).is_dir():
            return d / name
    where = ", ".join(str(d) for d in search_dirs())
    raise BaseNotFound(
        f"base {name!r} is not installed (searched {where}; ${BASES_ENV} adds folders). Build it from public data: "
        f"python -m dpldm.pretrain_autoencoder --config CONFIG --out AE && python -m dpldm.pretrain --config CONFIG "
        f"--autoencoder AE --out LDM && python -m dpldm.ship --autoencoder AE --ldm LDM --name {name}.")


def _safe_relative(rel: str) -> bool:
    p = PurePosixPath(rel)
    return bool(rel) and not p.is_absolute() and ".." not in p.parts and "\\" not in rel


def read_manifest(folder: Path) -> dict[str, str]:
    """SHA256SUMS as {relative path: sha256}; malformed lines and paths leaving the folder are refused."""
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"base {folder}: no {MANIFEST}, so its files cannot be verified (a base is written by "
                              "python -m dpldm.ship)")
    entries: dict[str, str] = {}
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, rel = line.partition("  ")
        if not sep or not _HEX64.fullmatch(digest) or not _safe_relative(rel) or rel in entries:
            raise CheckpointError(f"{path}, line {i}: malformed entry {line!r} (expected '<sha256>  <relative path>', "
                                  "each path once)")
        entries[rel] = digest
    return entries


def files_in(folder: Path) -> set[str]:
    """Every file under the folder (hidden ones included), as POSIX paths relative to it, except the manifest."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()} - {MANIFEST}


def verify_base(folder: Path) -> dict[str, str]:
    """Check every file of a base against SHA256SUMS; refuse a mismatch, a missing file or an unlisted one.

    Unlisted files are refused whatever their kind: diffusers reads any weight or index file it finds."""
    folder = Path(folder)
    expected = read_manifest(folder)
    for rel in REQUIRED:
        if rel not in expected:
            raise CheckpointError(f"base {folder}: {MANIFEST} does not list {rel}, which a base needs")
    present = files_in(folder)
    missing, extra = sorted(expected.keys() - present), sorted(present - expected.keys())
    if missing:
        rel = missing[0]
        raise CheckpointError(f"base {folder}: {rel} is missing ({MANIFEST} expects sha256 {expected[rel]}); "
                              "reinstall the package or rebuild the base (MODEL_CARD.md gives the command)")
    if extra:
        rel = extra[0]
        raise CheckpointError(f"base {folder}: {rel} is not listed in {MANIFEST} (its sha256 is "
                              f"{sha256_file(folder / rel)}); a base holds only the files it was shipped with: "
                              "remove it, or reinstall the package")
    for rel, want in sorted(expected.items()):
        got = sha256_file(folder / rel)
        if got != want:
            raise CheckpointError(f"base {folder}: {rel} has sha256 {got}, but {MANIFEST} says {want}: the file was "
                                  "modified or corrupted; reinstall the package or rebuild the base "
                                  "(MODEL_CARD.md gives the command)")
    return expected


def verified_base(name: str) -> Path:
    """Locate a base and verify it; its autoencoder/ and ldm/ folders are then safe to load."""
    folder = locate_base(name)
    verify_base(folder)
    return folder


def base_record(folder: Path) -> dict[str, Any]:
    path = Path(folder) / RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


def check_layout(folder: Path, cfg: dict[str, Any]) -> None:
    """Refuse a base pre-trained on images laid out otherwise than the config's data section says."""
    ldm_meta = Path(folder) / "ldm" / "ldm.json"
    trained = (json.loads(ldm_meta.read_text()).get("config") or {}).get("data", {}) if ldm_meta.is_file() else {}
    diffs = [f"{k}: base {trained[k]!r} != config {cfg['data'].get(k)!r}"
             for k in LAYOUT_KEYS if k in trained and trained[k] != cfg["data"].get(k)]
    if diffs:
        raise CheckpointError(f"base {folder} was pre-trained on images laid out otherwise than config {cfg['name']} "
                              f"says ({'; '.join(diffs)}): use a config that matches the base, or --no-base")


def load_base(name: str, cfg: dict[str, Any]) -> tuple[AutoencoderKL, ConditionalUNet, dict[str, Any]]:
    """(autoencoder, LDM, base.json) of a verified base, weights in fp32; architecture and image layout must match
    the config."""
    folder = verified_base(name)
    check_layout(folder, cfg)
    vae = load_autoencoder(folder / "autoencoder", cfg)
    model, _ = load_ldm(folder / "ldm", cfg)
    return vae, model, base_record(folder)


def config_base(cfg: dict[str, Any]) -> Path | None:
    """The verified folder of the base the config names (top-level key `base`), or None if it names none.

    For stages that need the public models (sample, compartments): use it in place of <runs>/<config>/public."""
    name = cfg.get("base")
    return verified_base(str(name)) if name else None
