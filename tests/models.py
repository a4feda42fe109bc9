"""Small models the engine tests share: every supported layer type, a diffusers UNet, a LoRA model."""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import nn


class AllLayers(nn.Module):
    """Linear, Conv2d (k x k and 1x1), GroupNorm, LayerNorm and Embedding, all trainable."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.emb = nn.Embedding(num_classes, 8)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.gn = nn.GroupNorm(2, 6)
        self.conv1 = nn.Conv2d(6, 8, 1)
        self.ln = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.conv1(torch.relu(self.gn(self.conv(x))))
        h = h.flatten(2).transpose(1, 2) + self.emb(y)[:, None]
        return self.fc(self.ln(h)).mean(1)


def all_layers_batch(B: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 3, 5, 5, generator=g), torch.randint(0, 10, (B,), generator=g),
            torch.randn(B, 5, generator=g))


def all_layers_loss(model, batch) -> torch.Tensor:
    x, y, t = batch
    return ((model(x, y) - t) ** 2).mean()


class ClassConditionedUNet(nn.Module):
    """A small diffusers UNet2DConditionModel whose cross-attention context is a class embedding."""

    def __init__(self, num_classes: int = 4, ctx: int = 16):
        super().__init__()
        from diffusers import UNet2DConditionModel

        self.unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=ctx, attention_head_dim=8, norm_num_groups=8,
        )
        self.class_embed = nn.Embedding(num_classes, ctx)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=self.class_embed(y)[:, None]).sample


def freeze_all_but_attention(model: ClassConditionedUNet) -> None:
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    model.requires_grad_(False)
    for m in model.unet.modules():
        if isinstance(m, Transformer2DModel):
            m.requires_grad_(True)
    model.class_embed.requires_grad_(True)


def unet_batch(B: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 4, 8, 8, generator=g), torch.randint(0, 1000, (B,), generator=g),
            torch.randint(0, 4, (B,), generator=g), torch.randn(B, 4, 8, 8, generator=g))


def unet_loss(model, batch) -> torch.Tensor:
    x, t, y, eps = batch
    return ((model(x, t, y) - eps) ** 2).mean()


class TinyAttention(nn.Module):
    """q/k/v/out projections named as diffusers names them, for peft LoRA."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.to_out = nn.ModuleList([nn.Linear(d, d)])
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        a = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, -1) @ v
        return self.head(self.to_out[0](a)).mean(1)


def checkpointed(fn, mode: str | None):
    """fn itself, or fn under torch.utils.checkpoint (reentrant or not)."""
    if mode is None:
        return fn
    return lambda *a: torch.utils.checkpoint.checkpoint(fn, *a, use_reentrant=mode == "reentrant")


class CheckpointedAllLayers(AllLayers):
    """Every layer type, in two checkpointed segments (the embedding between them, outside)."""

    def __init__(self, mode: str | None):
        super().__init__()
        self.mode = mode

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.mode == "reentrant":
            x = x.requires_grad_(True)  # reentrant checkpointing gives no gradient to a segment whose inputs need none
        h = checkpointed(lambda x: self.conv1(torch.relu(self.gn(self.conv(x)))), self.mode)(x)
        h = h.flatten(2).transpose(1, 2) + self.emb(y)[:, None]
        return checkpointed(lambda h: self.fc(self.ln(h)), self.mode)(h).mean(1)
