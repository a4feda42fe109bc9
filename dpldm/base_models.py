"""Shipped base models: a public pre-trained autoencoder + class-conditional LDM that installs with the package,
or a text-conditioned diffusers pipeline (`--pipeline NAME`).

A class-conditional base is a folder (dpldm/bases/<name>/ in the package, or any folder named by a path):

    autoencoder/    diffusers AutoencoderKL folder (config.json, diffusion_pytorch_model.safetensors, dpldm.json)
    ldm/            unet/ (diffusers), class_embedder/, ldm.json: the layout save_ldm writes
    base.json       machine-readable record: name, dtype, each stage's steps / wall time / machine / command
    MODEL_CARD.md   the same for people, with the rebuild command and the sha256 of every file
    SHA256SUMS      sha256 of every other file in the folder, in `sha256sum -c` format

A pipeline base holds, in place of autoencoder/ and ldm/, a diffusers pipeline folder's files (model_index.json,
unet/, vae/, text_encoder/, tokenizer/, scheduler/) and dpldm.json, the pre-training's record
(`python -m dpldm.ship_pipeline` writes it). Its SHA256SUMS lists model_index.json; a class-conditional one does not.

Weights are stored as fp16 safetensors (half the size) and loaded back as fp32. Before anything is loaded every
file is checked against SHA256SUMS: a changed, missing or unlisted file is refused (CheckpointError naming it).
`python -m dpldm.ship` turns the folders the pre-training stages write into a base (from the records of
dpldm.provenance); this module finds, verifies and loads bases.

Names are looked up in the folders of $DPLDM_BASES (os.pathsep-separated) first, then in the package's
dpldm/bases/. A value with a path separator (./NAME, /x/NAME) is a folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from diffusers import AutoencoderKL

from dpldm.files import SHA256SUMS, Sha256SumsError, read_json_or_empty, read_sha256sums, sha256_file
from dpldm.models import CheckpointError, ConditionalUNet, load_autoencoder, load_ldm

BASES_DIR = Path(__file__).parent / "bases"
BASES_ENV = "DPLDM_BASES"
MANIFEST = SHA256SUMS
CARD = "MODEL_CARD.md"
RECORD = "base.json"
# The files a base cannot work without: a manifest that omits one is refused before diffusers is reached.
REQUIRED = ("autoencoder/config.json", "autoencoder/diffusion_pytorch_model.safetensors", "ldm/ldm.json",
            "ldm/unet/config.json", "ldm/unet/diffusion_pytorch_model.safetensors",
            "ldm/class_embedder/config.json", "ldm/class_embedder/model.safetensors")
PIPELINE_REQUIRED = ("model_index.json", "dpldm.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                     "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
                     "text_encoder/model.safetensors", "tokenizer/tokenizer_config.json",
                     "scheduler/scheduler_config.json")
KINDS = ("ldm", "pipeline")
# How images were laid out for the base (its architecture alone does not say: 28 px padded to 32 fits a 32 px VAE).
LAYOUT_KEYS = ("image_size", "pad_to", "channels")


class BaseNotFound(CheckpointError):
    """The named base is not installed (not built yet, or not in the search path)."""


# --- finding and verifying a base ----------------------------------------------------------------------------

def search_dirs() -> list[Path]:
    """Where base names are looked up.

    Returns:
        The folders of $DPLDM_BASES, in order, then the package's dpldm/bases/.
    """
    extra = [Path(p) for p in os.environ.get(BASES_ENV, "").split(os.pathsep) if p]
    return [*extra, BASES_DIR]


def shipped_bases() -> list[str]:
    """The bases installed with the package.

    Returns:
        The names of the folders of dpldm/bases/ holding a SHA256SUMS, sorted.
    """
    return sorted(p.parent.name for p in BASES_DIR.glob(f"*/{MANIFEST}"))


def locate_base(name: str) -> Path:
    """The folder of a base, by name (searched in $DPLDM_BASES, then the package) or by path.

    Args:
        name: a base name, or a folder (any value with a path separator: ./NAME, /x/NAME).

    Returns:
        The base's folder (not verified: see verified_base).

    Raises:
        BaseNotFound: no such folder, or a name found nowhere (the message gives the commands that build it).
    """
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


def read_base_sha256sums(folder: Path) -> dict[str, str]:
    """A base's SHA256SUMS, strictly: malformed lines and paths leaving the folder are refused.

    Args:
        folder: the base folder.

    Returns:
        {relative path: sha256}.

    Raises:
        CheckpointError: no SHA256SUMS, or a malformed one.
    """
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"base {folder}: no {MANIFEST}, so its files cannot be verified (a base is written by "
                              "python -m dpldm.ship)")
    try:
        return read_sha256sums(path)
    except Sha256SumsError as e:
        raise CheckpointError(str(e)) from None


def files_in(folder: Path) -> set[str]:
    """The files of a base folder, as its SHA256SUMS lists them.

    Args:
        folder: the base folder.

    Returns:
        Every file under it (hidden ones included) as a POSIX path relative to it, except SHA256SUMS itself.
    """
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()} - {MANIFEST}


def base_kind(expected: dict[str, str]) -> str:
    """What a base holds, from its SHA256SUMS.

    Args:
        expected: the base's SHA256SUMS, {relative path: sha256}.

    Returns:
        "pipeline" if it lists model_index.json (a diffusers pipeline folder), else "ldm".
    """
    return "pipeline" if "model_index.json" in expected else "ldm"


def verify_base(folder: Path, kind: str | None = None) -> dict[str, str]:
    """Check every file of a base against SHA256SUMS; refuse a mismatch, a missing file or an unlisted one.

    Unlisted files are refused whatever their kind: diffusers reads any weight or index file it finds.

    Args:
        folder: the base folder.
        kind: "ldm" (autoencoder + class-conditional LDM) or "pipeline" (a text-conditioned diffusers pipeline):
            refuse a base of the other kind; None accepts either.

    Returns:
        Its SHA256SUMS, {relative path: sha256}.

    Raises:
        CheckpointError: a base of the other kind, or naming the first file that is missing, unlisted or changed
            (with both hashes).
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind {kind!r}: one of {KINDS}")
    folder = Path(folder)
    expected = read_base_sha256sums(folder)
    found = base_kind(expected)
    for rel in REQUIRED if found == "ldm" else PIPELINE_REQUIRED:
        if rel not in expected:
            raise CheckpointError(f"base {folder}: {MANIFEST} does not list {rel}, which a base needs")
    if kind is not None and found != kind:
        what, use = (("a text-conditioned diffusers pipeline", f"--pipeline {folder.name}") if found == "pipeline"
                     else ("a class-conditional autoencoder + LDM", f"--base {folder.name} (or a config naming it)"))
        raise CheckpointError(f"base {folder} is {what}, not a {kind} base: pass it as {use}")
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


def verified_base(name: str, kind: str = "ldm") -> Path:
    """Locate a base and verify it; its files are then safe to load.

    Args:
        name: a base name or folder, as locate_base takes it.
        kind: "ldm" (autoencoder/ and ldm/) or "pipeline" (a diffusers pipeline folder).

    Returns:
        The verified folder.
    """
    folder = locate_base(name)
    verify_base(folder, kind)
    return folder


def base_record(folder: Path) -> dict[str, Any]:
    """A base's base.json.

    Args:
        folder: the base folder.

    Returns:
        The record dpldm.ship wrote, or {} if there is none.
    """
    return read_json_or_empty(Path(folder) / RECORD)


def check_layout(folder: Path, cfg: dict[str, Any]) -> None:
    """Refuse a base pre-trained on images laid out otherwise than the config's data section says.

    Args:
        folder: the base folder (its ldm/ldm.json records the pre-training config).
        cfg: the run's config.

    Raises:
        CheckpointError: naming each of image_size, pad_to, channels that differs.
    """
    ldm_meta = Path(folder) / "ldm" / "ldm.json"
    trained = (json.loads(ldm_meta.read_text()).get("config") or {}).get("data", {}) if ldm_meta.is_file() else {}
    diffs = [f"{k}: base {trained[k]!r} != config {cfg['data'].get(k)!r}"
             for k in LAYOUT_KEYS if k in trained and trained[k] != cfg["data"].get(k)]
    if diffs:
        raise CheckpointError(f"base {folder} was pre-trained on images laid out otherwise than config {cfg['name']} "
                              f"says ({'; '.join(diffs)}): use a config that matches the base, or --no-base")


def load_base(name: str, cfg: dict[str, Any]) -> tuple[AutoencoderKL, ConditionalUNet, dict[str, Any]]:
    """A verified base's models, weights in fp32; architecture and image layout must match the config.

    Args:
        name: a base name or folder.
        cfg: the config the models must match.

    Returns:
        (autoencoder, LDM, base.json).
    """
    folder = verified_base(name)
    check_layout(folder, cfg)
    vae = load_autoencoder(folder / "autoencoder", cfg)
    model, _ = load_ldm(folder / "ldm", cfg)
    return vae, model, base_record(folder)


def config_base(cfg: dict[str, Any]) -> Path | None:
    """The verified folder of the base the config names (top-level key `base`), or None if it names none.

    For stages that need the public models (sample, compartments): use it in place of <runs>/<config>/public.

    Args:
        cfg: the config.

    Returns:
        The base's verified folder, or None.
    """
    name = cfg.get("base")
    return verified_base(str(name)) if name else None
