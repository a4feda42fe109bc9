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

from dpldm.base import sha256_file
from dpldm.export import plain_copy
from dpldm.models import CheckpointError, ConditionalUNet, atomic_dir, existing_dir, load_ldm
from dpldm.trainable import add_lora

WEIGHTS = "weights.safetensors"
META = "compartment.json"


class CompartmentError(CheckpointError):
    """A compartment that is missing, corrupt, or trained on another base model."""


def ldm_id(ldm_dir: Path) -> str:
    """Identity of a (base) LDM: sha256 over its UNet and class-embedder weight files."""
    found = existing_dir(ldm_dir)
    if found is None:
        raise CompartmentError(f"no LDM at {ldm_dir}")
    h = hashlib.sha256()
    for rel in ("unet/diffusion_pytorch_model.safetensors", "class_embedder/model.safetensors"):
        h.update(sha256_file(found / rel).encode())
    return h.hexdigest()


def trained_tensors(model: ConditionalUNet) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save_compartment(folder: Path, model: ConditionalUNet, meta: dict[str, Any]) -> None:
    tensors = trained_tensors(model)
    if not tensors:
        raise CompartmentError("the model has no trained parameters to store")

    def write(tmp: Path) -> None:
        save_file(tensors, tmp / WEIGHTS)
        (tmp / META).write_text(json.dumps({**meta, "sha256": sha256_file(tmp / WEIGHTS)}, indent=1))

    atomic_dir(folder, write)


def read_meta(folder: Path) -> dict[str, Any]:
    path = Path(folder) / META
    if not path.is_file():
        raise CompartmentError(f"no compartment at {folder} (expected {META} and {WEIGHTS})")
    return json.loads(path.read_text())


def load_compartment(folder: Path, base_ldm: Path, cfg: dict[str, Any], base_id: str | None = None
                     ) -> ConditionalUNet:
    """The base LDM with the compartment's tensors in place (LoRA folded in): a plain model for sampling.

    Refuses a compartment whose weights do not match their recorded sha256, or that was trained on another base."""
    meta = read_meta(folder)
    base_id = base_id or ldm_id(base_ldm)
    if meta.get("base_id") != base_id:
        raise CompartmentError(f"compartment {folder} was trained on another base model (base id "
                               f"{str(meta.get('base_id'))[:12]}..., this base {base_id[:12]}...): train it again "
                               "on this base, or sample with the base it was trained on")
    weights = Path(folder) / WEIGHTS
    if not weights.is_file() or sha256_file(weights) != meta.get("sha256"):
        raise CompartmentError(f"{weights}: missing or changed since it was written (sha256 mismatch)")
    model, _ = load_ldm(base_ldm, cfg)
    if meta["mode"] == "lora":
        add_lora(model, int(meta["lora_rank"]))
    params = dict(model.named_parameters())
    tensors = load_file(weights)
    for name, value in tensors.items():
        if name not in params or params[name].shape != value.shape:
            raise CompartmentError(f"{weights}: tensor {name} {tuple(value.shape)} does not fit the base model")
        with torch.no_grad():
            params[name].copy_(value)
    return plain_copy(model, cfg)
