"""Models: diffusers AutoencoderKL and a class-conditional UNet2DConditionModel.

The class conditioning follows DP-LDM's ClassEmbedder: one nn.Embedding(num_classes + 1, ctx_dim) whose
output [B, 1, ctx] is the cross-attention context; index num_classes is the null class used for
classifier-free guidance. Checkpoints are diffusers folders (save_pretrained / from_pretrained, safetensors),
written whole or not at all (dpldm.files.atomic_dir).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from torch import nn

from dpldm.files import atomic_dir, existing_dir


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or does not match the config."""


class ClassEmbedder(nn.Module):
    """DP-LDM's class conditioning: one embedding per class plus the null class, as a one-token context.

    Args:
        num_classes: the number of classes; index num_classes is the null class.
        ctx_dim: the UNet's cross_attention_dim.
    """

    def __init__(self, num_classes: int, ctx_dim: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embedding = nn.Embedding(num_classes + 1, ctx_dim)

    @property
    def null_class(self) -> int:
        """The label of the unconditional (classifier-free guidance) context."""
        return self.num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """The cross-attention context of each label.

        Args:
            labels: [B] class indices (num_classes for the null class).

        Returns:
            [B, 1, ctx_dim].
        """
        return self.embedding(labels[:, None])  # [B, 1, ctx]


class ConditionalUNet(nn.Module):
    """The module DP fine-tuning sees: UNet + class embedder, predicts the noise.

    Args:
        unet: the diffusers UNet2DConditionModel.
        embedder: the class embedder whose output is the UNet's cross-attention context.
    """

    def __init__(self, unet: UNet2DConditionModel, embedder: ClassEmbedder) -> None:
        super().__init__()
        self.unet = unet
        self.class_embedder = embedder

    def forward(self, z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The predicted noise.

        Args:
            z: noisy latents [B, C, H, W].
            t: timesteps [B].
            labels: classes [B].

        Returns:
            eps, the shape of z.
        """
        return self.unet(z, t, encoder_hidden_states=self.class_embedder(labels), return_dict=False)[0]


def build_autoencoder(cfg: dict[str, Any]) -> AutoencoderKL:
    """A freshly initialised autoencoder.

    Args:
        cfg: the config (its `autoencoder` section are AutoencoderKL's arguments).

    Returns:
        The AutoencoderKL.
    """
    return AutoencoderKL(**cfg["autoencoder"])


def build_unet(cfg: dict[str, Any]) -> ConditionalUNet:
    """A freshly initialised class-conditional UNet.

    Args:
        cfg: the config (its `unet` section, and data.num_classes for the class embedder).

    Returns:
        The ConditionalUNet.
    """
    unet = UNet2DConditionModel(**cfg["unet"])
    return ConditionalUNet(unet, ClassEmbedder(cfg["data"]["num_classes"], cfg["unet"]["cross_attention_dim"]))


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
    """Save an autoencoder atomically: a diffusers AutoencoderKL folder plus dpldm.json (what it was trained on).

    Args:
        vae: the autoencoder.
        folder: the folder to (re)place.
        extra: the content of dpldm.json (default {}).
    """

    def write(tmp: Path) -> None:
        vae.save_pretrained(tmp, safe_serialization=True)
        (tmp / "dpldm.json").write_text(json.dumps(extra or {}, indent=1))

    atomic_dir(folder, write)


def trained_on(folder: Path) -> str | None:
    """The public data set an autoencoder or LDM folder of ours was pre-trained on.

    Args:
        folder: an autoencoder or LDM folder (or the `.old` twin an interrupted write left).

    Returns:
        The `public` entry of its ldm.json or dpldm.json, or None if not recorded.
    """
    found = existing_dir(folder)
    metas = [] if found is None else [found / "ldm.json", found / "dpldm.json"]
    return next((json.loads(m.read_text()).get("public") for m in metas if m.is_file()), None)


def load_autoencoder(folder: Path, cfg: dict[str, Any]) -> AutoencoderKL:
    """An autoencoder folder, in fp32, after checking that its architecture is the config's.

    Args:
        folder: the folder save_autoencoder wrote (or its `.old` twin).
        cfg: the config whose `autoencoder` section it must match.

    Returns:
        The AutoencoderKL.

    Raises:
        CheckpointError: no checkpoint there, or one of another architecture.
    """
    found = existing_dir(folder)
    if found is None or not (found / "config.json").is_file():
        raise CheckpointError(f"no autoencoder checkpoint at {folder} (expected config.json + safetensors)")
    _check_config("autoencoder", found, json.loads((found / "config.json").read_text()), cfg["autoencoder"])
    return AutoencoderKL.from_pretrained(found, torch_dtype=torch.float32)  # a shipped base stores fp16


def save_ldm(model: ConditionalUNet, folder: Path, extra: dict[str, Any] | None = None) -> None:
    """Save an LDM atomically: unet/ (diffusers), class_embedder/ (safetensors + json), ldm.json (scale etc.).

    Args:
        model: the class-conditional UNet.
        folder: the folder to (re)place.
        extra: the content of ldm.json (default {}).
    """

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
    """An LDM folder, in fp32, after checking that its UNet and class embedder are the config's.

    Args:
        folder: the folder save_ldm wrote (or its `.old` twin).
        cfg: the config whose `unet` section and data.num_classes it must match.

    Returns:
        (the model, its ldm.json).

    Raises:
        CheckpointError: no checkpoint there, or one of another architecture.
    """
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
