"""Which parameters DP fine-tuning trains.

- attention (DP-LDM): the UNet's Transformer2DModel blocks (GroupNorm, proj_in, transformer_blocks with
  self/cross attention q/k/v/out, feed-forward and LayerNorms, proj_out) plus the class embedder.
  `ablation` i freezes the first i-1 of those blocks (down, mid, up order, as DP-LDM counts them).
- lora (DP-LoRA): peft LoRA adapters on to_q/to_k/to_v/to_out.0 of every attention; only the adapters
  train (the class embedder stays frozen, as in DP-LoRA; cross-attention adapters on to_k/to_v still
  let it re-map each class' context).
- all: every parameter.
"""

from __future__ import annotations

from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn

from dpldm.models import ConditionalUNet

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
MODES = ("attention", "lora", "all")


def transformer_blocks(model: ConditionalUNet) -> list[Transformer2DModel]:
    """Transformer2DModel blocks in DP-LDM's order: down path, middle, up path."""
    unet = model.unet
    parts: list[nn.Module] = [*unet.down_blocks, *([unet.mid_block] if unet.mid_block is not None else []),
                              *unet.up_blocks]
    return [m for part in parts for m in part.modules() if isinstance(m, Transformer2DModel)]


def lora_param_count(model: ConditionalUNet, rank: int) -> int:
    """Analytic LoRA size: r * (in + out) per targeted Linear (A: r x in, B: out x r, no bias)."""
    total = 0
    for block in transformer_blocks(model):
        for name, m in block.named_modules():
            m = getattr(m, "base_layer", m)  # once peft has injected adapters, the Linear is its base_layer
            if isinstance(m, nn.Linear) and any(name == t or name.endswith("." + t) for t in LORA_TARGETS):
                total += rank * (m.in_features + m.out_features)
    return total


def add_lora(model: ConditionalUNet, rank: int, alpha: float | None = None) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=LORA_TARGETS, lora_dropout=0.0,
                        init_lora_weights="gaussian")
    inject_adapter_in_model(config, model.unet)


def select_trainable(model: ConditionalUNet, mode: str, ablation: int = 1, lora_rank: int = 8) -> int:
    """Set requires_grad for `mode`; returns the number of trainable parameters."""
    if mode not in MODES:
        raise ValueError(f"--trainable must be one of {MODES}, got {mode!r}")
    blocks = transformer_blocks(model)
    if not 1 <= ablation <= len(blocks):
        raise ValueError(f"--ablation must be in 1..{len(blocks)} (this UNet has {len(blocks)} transformer blocks), "
                         f"got {ablation}")
    model.requires_grad_(mode == "all")
    if mode == "attention":
        for block in blocks[ablation - 1 :]:
            block.requires_grad_(True)
        if hasattr(model, "class_embedder"):  # a text-conditioned UNet's context comes from a frozen text encoder
            model.class_embedder.requires_grad_(True)
    elif mode == "lora":
        add_lora(model, lora_rank)
        model.requires_grad_(False)
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
