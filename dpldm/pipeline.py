"""Bring your own model: a local diffusers latent-diffusion pipeline folder (Stable-Diffusion style: unet, vae,
text_encoder, tokenizer, scheduler), loaded with diffusers' own loaders, offline.

The text encoder is frozen: captions become cross-attention contexts once, under no_grad, each from its own caption
only (per-example preprocessing: nothing is computed across examples outside the DP step). The module DP training
sees is TextConditionalUNet: the pipeline's UNet, fed those contexts; caption dropout swaps a context for the empty
caption's (classifier-free guidance).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class PipelineError(ValueError):
    """A pipeline folder that is missing, incomplete, or not a text-conditioned latent diffusion pipeline."""


@dataclass
class Pipeline:
    """The parts of a loaded pipeline that DP fine-tuning uses."""

    folder: Path
    pipe: Any  # the diffusers pipeline, as DiffusionPipeline.from_pretrained loaded it
    sha256: str  # of every file in the folder (names and bytes): the model card's base hash

    @property
    def unet(self) -> nn.Module:
        """The UNet2DConditionModel."""
        return self.pipe.unet

    @property
    def vae(self) -> nn.Module:
        """The AutoencoderKL."""
        return self.pipe.vae


def folder_sha256(folder: Path) -> str:
    """One sha256 over a folder's files (relative names and contents, in sorted order).

    Args:
        folder: the folder.

    Returns:
        The hex digest.
    """
    h = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode() + b"\0")
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def load_pipeline(folder: str | Path) -> Pipeline:
    """Load a local diffusers pipeline folder without touching the network, its models frozen.

    Args:
        folder: the folder holding model_index.json and the components' sub-folders.

    Returns:
        The loaded pipeline.

    Raises:
        PipelineError: the folder, model_index.json or a component is missing, or the UNet does not cross-attend
            to a text encoder's hidden states of its width.
    """
    from diffusers import DiffusionPipeline

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise PipelineError(f"{folder}: no model_index.json (not a diffusers pipeline folder: "
                            "pipeline.save_pretrained(DIR) writes one)")
    missing = [c for c in COMPONENTS if not (folder / c).is_dir()]
    if missing:
        raise PipelineError(f"{folder}: missing component folder(s) {missing}; a text-conditioned latent diffusion "
                            f"pipeline needs {list(COMPONENTS)}")
    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    for name in ("vae", "text_encoder", "unet"):
        getattr(pipe, name).requires_grad_(False).eval()
    ctx, width = pipe.unet.config.cross_attention_dim, pipe.text_encoder.config.hidden_size
    if ctx != width:
        raise PipelineError(f"{folder}: the UNet cross-attends to width {ctx}, the text encoder gives {width}")
    return Pipeline(folder, pipe, folder_sha256(folder))


@torch.no_grad()
def encode_captions(pipeline: Pipeline, captions: list[str], batch_size: int = 256) -> torch.Tensor:
    """Each caption's cross-attention context, from that caption alone (the frozen text encoder's last hidden
    state, padded to the tokenizer's length, as Stable Diffusion's pipeline computes it).

    Args:
        pipeline: the loaded pipeline.
        captions: one per example ("" is the unconditional context).
        batch_size: captions per text-encoder call (the result does not depend on it).

    Returns:
        [len(captions), T, width] float32.
    """
    tok, enc = pipeline.pipe.tokenizer, pipeline.pipe.text_encoder
    out = []
    for i in range(0, len(captions), batch_size):
        ids = tok(captions[i : i + batch_size], padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids
        out.append(enc(ids.to(enc.device))[0].float().cpu())
    return torch.cat(out) if out else torch.empty(0)


class CaptionContexts(nn.Module):
    """A frozen condition-index -> context map, in the place of ConditionalUNet's class embedder: row i is caption
    i's context, the last row the empty caption's (the null condition of caption dropout and guidance). So the DP
    loop, sampling and guidance treat a caption index exactly as a class label.

    The rows are held in a NON-persistent buffer: contexts of private captions never reach a state_dict, a
    checkpoint or a saved model.

    Args:
        contexts: [K, T, width], one per caption (encode_captions).
        null_context: [1, T, width], the empty caption's.
    """

    def __init__(self, contexts: torch.Tensor, null_context: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("contexts", torch.cat([contexts, null_context]).detach().float(), persistent=False)

    @property
    def num_classes(self) -> int:
        """How many captions (indices 0..num_classes-1)."""
        return len(self.contexts) - 1

    @property
    def null_class(self) -> int:
        """The index of the empty caption."""
        return len(self.contexts) - 1

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """The contexts of caption indices.

        Args:
            labels: [B] indices (null_class for the empty caption).

        Returns:
            [B, T, width].
        """
        return self.contexts[labels]


class TextConditionalUNet(nn.Module):
    """The module DP fine-tuning sees for a text-conditioned pipeline: its UNet, each example's condition a caption
    index into a frozen table of caption contexts (computed once by the frozen text encoder).

    Args:
        unet: the pipeline's UNet2DConditionModel.
        captions: the caption contexts.
    """

    def __init__(self, unet: nn.Module, captions: CaptionContexts) -> None:
        super().__init__()
        self.unet = unet
        self.class_embedder = captions  # the name ConditionalUNet's condition map has (diffusion_loss, sampling)

    def forward(self, z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The predicted noise.

        Args:
            z: noisy latents [B, C, H, W].
            t: timesteps [B].
            labels: caption indices [B].

        Returns:
            eps, the shape of z.
        """
        context = self.class_embedder(labels).to(next(self.unet.parameters()).dtype)
        return self.unet(z, t, encoder_hidden_states=context, return_dict=False)[0]


def save_lora(unet: nn.Module, folder: Path, rank: int, alpha: float | None = None) -> Path:
    """Save the LoRA adapters of a pipeline's UNet in diffusers' LoRA format, so that
    `pipeline.load_lora_weights(folder)` puts them back (pytorch_lora_weights.safetensors, with the adapter's
    rank and alpha as metadata).

    Args:
        unet: the UNet2DConditionModel with peft adapters (dpldm.trainable.add_lora).
        folder: where to write (created).
        rank: the adapters' rank.
        alpha: their alpha (default rank: scale 1, as add_lora).

    Returns:
        The file written.

    Raises:
        ValueError: the UNet has no LoRA adapter.
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from dpldm.trainable import LORA_TARGETS

    state = get_peft_model_state_dict(unet)
    if not state:
        raise ValueError("the UNet has no LoRA adapter to save")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"r": rank, "lora_alpha": alpha or rank, "target_modules": LORA_TARGETS, "lora_dropout": 0.0}
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=convert_state_dict_to_diffusers(state),
                                              unet_lora_adapter_metadata=meta, safe_serialization=True)
    return folder / "pytorch_lora_weights.safetensors"
