"""A compartment on disk: only what DP training changed (LoRA adapters, or the attention blocks and class
embedder), tied by hash to the base model it was trained on.

    <run>/compartments/<shard>/weights.safetensors   the trained tensors, by parameter name
    <run>/compartments/<shard>/compartment.json      shard, mode, base id, accountant history, epsilon, sha256
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dpldm.compartments import pipeline_base
from dpldm.export import plain_copy
from dpldm.files import atomic_dir, existing_dir, sha256_file
from dpldm.models import CheckpointError, ConditionalUNet, load_autoencoder, load_ldm
from dpldm.trainable import add_lora

WEIGHTS = "weights.safetensors"
META = "compartment.json"


class CompartmentError(CheckpointError):
    """A compartment that is missing, corrupt, or trained on another base model."""


def ldm_id(ldm_dir: Path) -> str:
    """Identity of a (base) LDM: sha256 over its UNet and class-embedder weight files.

    Args:
        ldm_dir: the LDM folder (or the `.old` twin an interrupted write left).

    Returns:
        The hex digest.

    Raises:
        CompartmentError: no LDM there, or one missing a weight file.
    """
    found = existing_dir(ldm_dir)
    if found is None:
        raise CompartmentError(f"no LDM at {ldm_dir}")
    h = hashlib.sha256()
    for rel in ("unet/diffusion_pytorch_model.safetensors", "class_embedder/model.safetensors"):
        if not (found / rel).is_file():
            raise CompartmentError(f"{found / rel}: missing (the LDM at {ldm_dir} is incomplete)")
        h.update(sha256_file(found / rel).encode())
    return h.hexdigest()


def autoencoder_id(ae_dir: Path) -> str:
    """Identity of an autoencoder: sha256 over its weight and config files (what decoding and encoding use).

    Args:
        ae_dir: the autoencoder folder (or its `.old` twin).

    Returns:
        The hex digest.

    Raises:
        CompartmentError: no autoencoder there, or one without a weight file.
    """
    found = existing_dir(ae_dir)
    if found is None:
        raise CompartmentError(f"no autoencoder at {ae_dir}")
    files = sorted(p for p in found.iterdir() if p.suffix == ".safetensors" or p.name == "config.json")
    if not any(p.suffix == ".safetensors" for p in files):
        raise CompartmentError(f"{found}: no weight file (the autoencoder is incomplete)")
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}:{sha256_file(p)}".encode())
    return h.hexdigest()


def check_base(base: dict[str, Any]) -> None:
    """Refuse a base whose files changed since the run recorded them: every compartment is a difference to that
    base, so a changed base would silently give other models (and the router encodes with its autoencoder).

    Args:
        base: the run's record ({"ldm", "id", "autoencoder", "autoencoder_id"}; runs written before the
            autoencoder was hashed have no "autoencoder_id", and only their LDM is checked; or a pipeline's,
            dpldm.compartments.pipeline_base).
    """
    if base.get("pipeline"):
        pipeline_base.check(base)
        return
    now = ldm_id(Path(base["ldm"]))
    if now != base["id"]:
        raise CompartmentError(f"the base LDM {base['ldm']} changed since the run was created (sha256 of its weights "
                               f"{now[:12]}..., the run recorded {base['id'][:12]}...): restore the base the run was "
                               "trained on, or train a new run on this one")
    if base.get("autoencoder_id"):
        now = autoencoder_id(Path(base["autoencoder"]))
        if now != base["autoencoder_id"]:
            raise CompartmentError(f"the base autoencoder {base['autoencoder']} changed since the run was created "
                                   f"(sha256 {now[:12]}..., the run recorded {base['autoencoder_id'][:12]}...): "
                                   "restore it, or train a new run on this base")


def base_vae(base: dict[str, Any], cfg: dict[str, Any]) -> nn.Module:
    """The autoencoder every compartment of the run encodes and decodes with: the base's, or the pipeline's VAE.

    Args:
        base: the run's base record.
        cfg: the run's config.

    Returns:
        The frozen autoencoder.
    """
    if base.get("pipeline"):
        return pipeline_base.base_vae(base)
    return load_autoencoder(Path(base["autoencoder"]), cfg)


def base_model(base: dict[str, Any], cfg: dict[str, Any]) -> nn.Module:
    """The model every compartment of the run starts from: the base LDM, or the pipeline's UNet on the class
    prompts (pipeline_base.base_model, its own copy).

    Args:
        base: the run's base record.
        cfg: the run's config.

    Returns:
        The model.
    """
    if base.get("pipeline"):
        return pipeline_base.base_model(base)
    return load_ldm(Path(base["ldm"]), cfg)[0]


def trained_tensors(model: ConditionalUNet) -> dict[str, torch.Tensor]:
    """What a compartment stores: the parameters training changed.

    Args:
        model: the trained model (LoRA adapters separate).

    Returns:
        {parameter name: contiguous CPU copy} of the parameters that require grad.
    """
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save_compartment(folder: Path, model: ConditionalUNet, meta: dict[str, Any]) -> None:
    """Write a compartment atomically: its trained tensors and compartment.json (meta plus the weights' sha256).

    Args:
        folder: <run>/compartments/<shard>.
        model: the trained model.
        meta: shard, mode, base id, accounting, ...

    Raises:
        CompartmentError: the model has no trained parameter.
    """
    tensors = trained_tensors(model)
    if not tensors:
        raise CompartmentError("the model has no trained parameters to store")

    def write(tmp: Path) -> None:
        save_file(tensors, tmp / WEIGHTS)
        (tmp / META).write_text(json.dumps({**meta, "sha256": sha256_file(tmp / WEIGHTS)}, indent=1))

    atomic_dir(folder, write)


def read_meta(folder: Path) -> dict[str, Any]:
    """A compartment's compartment.json.

    Args:
        folder: the compartment folder.

    Returns:
        Its content (with the weights' "sha256").

    Raises:
        CompartmentError: saying what is wrong with it (missing, unreadable, no sha256).
    """
    path = Path(folder) / META
    if not path.is_file():
        raise CompartmentError(f"no compartment at {folder} (expected {META} and {WEIGHTS})")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CompartmentError(f"{path}: unreadable or corrupt ({type(e).__name__}: {e}): train the compartment "
                               "again (forget the shard, then add its data)") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str):
        raise CompartmentError(f"{path}: corrupt (no sha256 of its weights): train the compartment again")
    return meta


def stored(folder: Path) -> bool:
    """Whether a compartment was stored completely.

    Args:
        folder: the compartment folder.

    Returns:
        True if it holds a readable compartment.json and the weights whose sha256 it records.
    """
    try:
        meta = read_meta(folder)
    except CompartmentError:
        return False
    weights = Path(folder) / WEIGHTS
    return weights.is_file() and sha256_file(weights) == meta["sha256"]


def load_compartment(folder: Path, base: dict[str, Any], cfg: dict[str, Any]) -> nn.Module:
    """The base with the compartment's tensors in place: a plain model for sampling (an LDM base: LoRA folded in;
    a pipeline: its UNet copy on the class prompts, adapters kept as peft layers).

    Refuses a compartment whose weights do not match their recorded sha256, or that was trained on another base.

    Args:
        folder: the compartment folder.
        base: the run's base record (its "id" is the base's hash, checked by check_base).
        cfg: the run's config.

    Returns:
        The model, in eval mode.

    Raises:
        CompartmentError: as said above, or a tensor that does not fit the base.
    """
    meta = read_meta(folder)
    if meta.get("base_id") != base["id"]:
        raise CompartmentError(f"compartment {folder} was trained on another base model (base id "
                               f"{str(meta.get('base_id'))[:12]}..., this base {base['id'][:12]}...): train it again "
                               "on this base, or sample with the base it was trained on")
    weights = Path(folder) / WEIGHTS
    if not weights.is_file() or sha256_file(weights) != meta.get("sha256"):
        raise CompartmentError(f"{weights}: missing or changed since it was written (sha256 mismatch)")
    model = base_model(base, cfg)
    if meta.get("mode") == "lora":
        add_lora(model, int(meta.get("lora_rank") or 0))
    params = dict(model.named_parameters())
    tensors = load_file(weights)
    for name, value in tensors.items():
        if name not in params or params[name].shape != value.shape:
            raise CompartmentError(f"{weights}: tensor {name} {tuple(value.shape)} does not fit the base model")
        with torch.no_grad():
            params[name].copy_(value)
    return model.requires_grad_(False).eval() if base.get("pipeline") else plain_copy(model, cfg)
