"""Benchmark workloads: the models, their fixed batches and the loss.

Three workloads, each at a "tiny" size (CI smoke run) and a "full" size (the numbers in RESULTS.md):
  transformer  a stack of pre-LN transformer blocks, every parameter trainable (all nn.Linear / nn.LayerNorm)
  unet         a small diffusers UNet2DConditionModel, random init, cross-attention on a class nn.Embedding;
               only its Transformer2DModel blocks and the embedding are trainable (the DP-LDM setting)
  ldm          dpldm's own model of a preset (fmnist at full size, tiny at tiny size), random init, trainable
               set "attention" (DP-LDM: transformer blocks + class embedder), the preset's physical batch
               (max_physical_batch_size x noise_multiplicity rows on CUDA; each row one example here)
A workload is a model, a fixed batch (inputs + target) and a per-sample MSE loss, built on one device
from a fixed seed, so every variant of a benchmark trains the same model on the same batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

SIZES = ("tiny", "full")
MODELS = ("transformer", "unet", "ldm")


@dataclass(frozen=True)
class TransformerSize:
    batch: int
    tokens: int
    dim: int
    depth: int
    heads: int


@dataclass(frozen=True)
class UNetSize:
    batch: int
    sample: int  # latent height = width
    channels: tuple[int, ...]  # block_out_channels; every level but the last has cross-attention
    layers_per_block: int
    heads: int
    context_dim: int  # cross_attention_dim = class embedding width
    num_classes: int
    norm_groups: int


# (device type, size) -> shape. CPU full is the issue-2 goal shape; CUDA full is the issue-3 shape.
TRANSFORMER_SIZES: dict[tuple[str, str], TransformerSize] = {
    ("cpu", "tiny"): TransformerSize(batch=4, tokens=8, dim=32, depth=1, heads=2),
    ("cpu", "full"): TransformerSize(batch=32, tokens=64, dim=256, depth=2, heads=4),
    ("cuda", "tiny"): TransformerSize(batch=4, tokens=8, dim=32, depth=1, heads=2),
    ("cuda", "full"): TransformerSize(batch=64, tokens=256, dim=768, depth=4, heads=12),
}

UNET_SIZES: dict[tuple[str, str], UNetSize] = {
    ("cpu", "tiny"): UNetSize(batch=2, sample=8, channels=(16, 32), layers_per_block=1, heads=2,
                              context_dim=16, num_classes=10, norm_groups=8),
    ("cpu", "full"): UNetSize(batch=8, sample=32, channels=(64, 128, 128), layers_per_block=1, heads=4,
                              context_dim=128, num_classes=10, norm_groups=32),
    ("cuda", "tiny"): UNetSize(batch=2, sample=8, channels=(16, 32), layers_per_block=1, heads=2,
                               context_dim=16, num_classes=10, norm_groups=8),
    ("cuda", "full"): UNetSize(batch=256, sample=32, channels=(128, 256, 256), layers_per_block=1, heads=8,
                               context_dim=256, num_classes=10, norm_groups=32),
}


@dataclass(frozen=True)
class LDMSize:
    preset: str  # dpldm/configs/<preset>.yaml
    batch: int  # rows through the UNet per step


# CUDA full: the fmnist preset's physical chunk, 1024 examples x 4 diffusion noises (noise_multiplicity)
LDM_SIZES: dict[tuple[str, str], LDMSize] = {
    ("cpu", "tiny"): LDMSize("tiny", 4),
    ("cpu", "full"): LDMSize("fmnist", 256),
    ("cuda", "tiny"): LDMSize("tiny", 4),
    ("cuda", "full"): LDMSize("fmnist", 4096),
}


class PerSampleMSE(nn.Module):
    """MSE averaged over every non-batch dimension of each example.

    `reduction` follows torch losses: "mean" (the mean over rows = the plain MSE), "sum" or "none" ([B]).
    Opacus ghost clipping flips it to "none" to get one loss per example, which a stock nn.MSELoss
    would give per element instead.
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        per_sample = (pred - target).pow(2).flatten(1).mean(1)
        if self.reduction == "none":
            return per_sample
        if self.reduction == "sum":
            return per_sample.sum()
        return per_sample.mean()


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x)), MLP 4x with GELU."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        return x.view(b, t, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        a = F.scaled_dot_product_attention(self._split(self.q(h)), self._split(self.k(h)), self._split(self.v(h)))
        x = x + self.out(a.transpose(1, 2).reshape(x.shape))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TransformerStack(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class ClassConditionedUNet(nn.Module):
    """UNet2DConditionModel whose cross-attention context is one class-embedding token."""

    def __init__(self, unet: nn.Module, num_classes: int, context_dim: int) -> None:
        super().__init__()
        self.unet = unet
        self.class_embed = nn.Embedding(num_classes, context_dim)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        context = self.class_embed(labels).unsqueeze(1)  # [B, 1, context_dim]
        return self.unet(x_t, t, encoder_hidden_states=context).sample


@dataclass
class Workload:
    name: str
    model: nn.Module
    inputs: tuple[torch.Tensor, ...]  # model(*inputs)
    target: torch.Tensor
    batch_size: int
    shape: str  # human-readable size for reports

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


def device_type(device: torch.device | str) -> str:
    return torch.device(device).type


def build_transformer(size: str | TransformerSize, device: torch.device | str, seed: int = 0) -> Workload:
    """The transformer workload at a named size (TRANSFORMER_SIZES) or at any TransformerSize."""
    s = size if isinstance(size, TransformerSize) else TRANSFORMER_SIZES[(device_type(device), size)]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TransformerStack(s.dim, s.depth, s.heads).to(device)
    x = torch.randn(s.batch, s.tokens, s.dim, generator=gen).to(device)
    target = torch.randn(s.batch, s.tokens, s.dim, generator=gen).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    shape = f"[B,T,d]=[{s.batch},{s.tokens},{s.dim}] depth={s.depth} ({n_params / 1e6:.2f}M trainable)"
    return Workload("transformer", model, (x,), target, s.batch, shape)


def _small_unet(s: UNetSize) -> nn.Module:
    from diffusers import UNet2DConditionModel  # imported lazily: only this workload needs diffusers

    levels = len(s.channels)
    down = tuple("CrossAttnDownBlock2D" if i < levels - 1 else "DownBlock2D" for i in range(levels))
    up = tuple("UpBlock2D" if i == 0 else "CrossAttnUpBlock2D" for i in range(levels))
    return UNet2DConditionModel(
        sample_size=s.sample,
        in_channels=4,
        out_channels=4,
        down_block_types=down,
        up_block_types=up,
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=s.channels,
        layers_per_block=s.layers_per_block,
        norm_num_groups=s.norm_groups,
        cross_attention_dim=s.context_dim,
        attention_head_dim=s.heads,  # diffusers' legacy name: this is the number of heads
    )


def _freeze_all_but_transformers(model: ClassConditionedUNet) -> None:
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    model.requires_grad_(False)
    for module in model.unet.modules():
        if isinstance(module, Transformer2DModel):
            module.requires_grad_(True)
    model.class_embed.requires_grad_(True)


def build_unet(size: str, device: torch.device | str, seed: int = 0) -> Workload:
    """A small diffusers UNet on a diffusion-style batch (_diffusion_batch)."""
    s = UNET_SIZES[(device_type(device), size)]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ClassConditionedUNet(_small_unet(s), s.num_classes, s.context_dim)
    _freeze_all_but_transformers(model)
    model = model.to(device)

    x_t, t, labels, eps = _diffusion_batch(s.batch, 4, s.sample, s.num_classes, gen)

    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    shape = (
        f"latents {s.batch}x4x{s.sample}x{s.sample}, channels={s.channels} "
        f"({n_train / 1e6:.2f}M of {n_all / 1e6:.2f}M trainable)"
    )
    inputs = (x_t.to(device), t.to(device), labels.to(device))
    return Workload("unet", model, inputs, eps.to(device), s.batch, shape)


def _diffusion_batch(batch: int, channels: int, sample: int, num_classes: int, gen: torch.Generator
                     ) -> tuple[torch.Tensor, ...]:
    """x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, its timesteps, labels and target eps (fixed for timing)."""
    x0 = torch.randn(batch, channels, sample, sample, generator=gen)
    eps = torch.randn(batch, channels, sample, sample, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)[t].float().view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    return x_t, t, labels, eps


def build_ldm(size: str, device: torch.device | str, seed: int = 0) -> Workload:
    """dpldm's ConditionalUNet of a preset with DP-LDM's trainable set (what `dpldm.train` fine-tunes)."""
    from dpldm.config import load_config
    from dpldm.models import build_unet as build_ldm_unet
    from dpldm.trainable import select_trainable

    s = LDM_SIZES[(device_type(device), size)]
    cfg = load_config(s.preset)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = build_ldm_unet(cfg)
    n_train = select_trainable(model, "attention", ablation=1)
    model = model.to(device)
    u = cfg["unet"]
    x_t, t, labels, eps = _diffusion_batch(s.batch, u["in_channels"], u["sample_size"], cfg["data"]["num_classes"],
                                           gen)
    n_all = sum(p.numel() for p in model.parameters())
    shape = (f"{s.preset} preset UNet, latents {s.batch}x{u['in_channels']}x{u['sample_size']}x{u['sample_size']}, "
             f"channels={tuple(u['block_out_channels'])} ({n_train / 1e6:.2f}M of {n_all / 1e6:.2f}M trainable)")
    inputs = (x_t.to(device), t.to(device), labels.to(device))
    return Workload("ldm", model, inputs, eps.to(device), s.batch, shape)


def build(model: str, size: str, device: torch.device | str, seed: int = 0) -> Workload:
    if model == "transformer":
        return build_transformer(size, device, seed)
    if model == "unet":
        return build_unet(size, device, seed)
    if model == "ldm":
        return build_ldm(size, device, seed)
    raise ValueError(f"unknown benchmark model {model!r}; expected one of {MODELS}")

