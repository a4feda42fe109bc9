"""Models: diffusers AutoencoderKL and a class-conditional UNet2DConditionModel.

The class conditioning follows DP-LDM's ClassEmbedder: one nn.Embedding(num_classes + 1, ctx_dim) whose
output [B, 1, ctx] is the cross-attention context; index num_classes is the null class used for
classifier-free guidance. Checkpoints are diffusers folders (save_pretrained / from_pretrained, safetensors).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or does not match the config."""


class ClassEmbedder(nn.Module):
    def __init__(self, num_classes: int, ctx_dim: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embedding = nn.Embedding(num_classes + 1, ctx_dim)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding(labels[:, None])  # [B, 1, ctx]


class ConditionalUNet(nn.Module):
    """The module DP fine-tuning sees: UNet + class embedder, predicts the noise."""

    def __init__(self, unet: UNet2DConditionModel, embedder: ClassEmbedder) -> None:
        super().__init__()
        self.unet = unet
        self.class_embedder = embedder

    def forward(self, z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.unet(z, t, encoder_hidden_states=self.class_embedder(labels), return_dict=False)[0]


def build_autoencoder(cfg: dict[str, Any]) -> AutoencoderKL:
    return AutoencoderKL(**cfg["autoencoder"])


def build_unet(cfg: dict[str, Any]) -> ConditionalUNet:
    unet = UNet2DConditionModel(**cfg["unet"])
    return ConditionalUNet(unet, ClassEmbedder(cfg["data"]["num_classes"], cfg["unet"]["cross_attention_dim"]))


def atomic_dir(dest: Path, write: Callable[[Path], None]) -> None:
    """Write a folder atomically: fill a temporary sibling, then swap it in with os.replace."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        write(tmp)
        old = dest.parent / f".{dest.name}.old"
        if old.exists():
            shutil.rmtree(old)
        if dest.exists():
            os.replace(dest, old)  # a crash here leaves `.old`, which load paths fall back to
        os.replace(tmp, dest)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def existing_dir(path: Path) -> Path | None:
    """The folder, or its `.old` twin left by a crash between the two renames of atomic_dir."""
    path = Path(path)
    if path.is_dir():
        return path
    old = path.parent / f".{path.name}.old"
    return old if old.is_dir() else None


def _check_config(kind: str, folder: Path, saved: dict[str, Any], wanted: dict[str, Any]) -> None:
    diffs = [f"{k}: checkpoint {saved.get(k)!r} != config {v!r}" for k, v in wanted.items() if _norm(saved.get(k)) != _norm(v)]
    if diffs:
        raise CheckpointError(
            f"{kind} checkpoint {folder} does not match the config ({'; '.join(diffs)}). "
            "Use a matching --config, or point --out/--pretrained at another folder."
        )


def _norm(v: Any) -> Any:
    return [_norm(x) for x in v] if isinstance(v, (list, tuple)) else v


def save_autoencoder(vae: AutoencoderKL, folder: Path, extra: dict[str, Any] | None = None) -> None:
    """A diffusers AutoencoderKL folder plus dpldm.json (what it was trained on)."""

    def write(tmp: Path) -> None:
        vae.save_pretrained(tmp, safe_serialization=True)
        (tmp / "dpldm.json").write_text(json.dumps(extra or {}, indent=1))

    atomic_dir(folder, write)


def trained_on(folder: Path) -> str | None:
    """The public data set an autoencoder or LDM folder of ours was pre-trained on (None if not recorded)."""
    found = existing_dir(folder)
    metas = [] if found is None else [found / "ldm.json", found / "dpldm.json"]
    return next((json.loads(m.read_text()).get("public") for m in metas if m.is_file()), None)


def load_autoencoder(folder: Path, cfg: dict[str, Any]) -> AutoencoderKL:
    found = existing_dir(folder)
    if found is None or not (found / "config.json").is_file():
        raise CheckpointError(f"no autoencoder checkpoint at {folder} (expected config.json + safetensors)")
    _check_config("autoencoder", found, json.loads((found / "config.json").read_text()), cfg["autoencoder"])
    return AutoencoderKL.from_pretrained(found, torch_dtype=torch.float32)  # a shipped base stores fp16


def save_ldm(model: ConditionalUNet, folder: Path, extra: dict[str, Any] | None = None) -> None:
    """An LDM folder: unet/ (diffusers), class_embedder/ (safetensors + json), ldm.json (scale etc.)."""

    def write(tmp: Path) -> None:
        model.unet.save_pretrained(tmp / "unet", safe_serialization=True)
        (tmp / "class_embedder").mkdir()
        save_file({"weight": model.class_embedder.embedding.weight.detach().contiguous()},
                  tmp / "class_embedder" / "model.safetensors")
        emb = model.class_embedder
        meta = {"num_classes": emb.num_classes, "ctx_dim": emb.embedding.embedding_dim}
        (tmp / "class_embedder" / "config.json").write_text(json.dumps(meta))
        (tmp / "ldm.json").write_text(json.dumps(extra or {}, indent=1))

    atomic_dir(folder, write)


def load_ldm(folder: Path, cfg: dict[str, Any]) -> tuple[ConditionalUNet, dict[str, Any]]:
    found = existing_dir(folder)
    if found is None or not (found / "unet" / "config.json").is_file():
        raise CheckpointError(f"no LDM checkpoint at {folder} (expected unet/, class_embedder/, ldm.json)")
    _check_config("UNet", found / "unet", json.loads((found / "unet" / "config.json").read_text()), cfg["unet"])
    meta = json.loads((found / "class_embedder" / "config.json").read_text())
    want = {"num_classes": cfg["data"]["num_classes"], "ctx_dim": cfg["unet"]["cross_attention_dim"]}
    _check_config("class embedder", found / "class_embedder", meta, want)
    unet = UNet2DConditionModel.from_pretrained(found / "unet", torch_dtype=torch.float32)  # fp16 in a shipped base
    emb = ClassEmbedder(meta["num_classes"], meta["ctx_dim"])
    emb.embedding.weight.data.copy_(load_file(found / "class_embedder" / "model.safetensors")["weight"])
    return ConditionalUNet(unet, emb), json.loads((found / "ldm.json").read_text())
