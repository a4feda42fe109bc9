"""The diffusion objective (epsilon prediction), latent encoding, and DDIM sampling with classifier-free guidance."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler

from dpldm.models import ConditionalUNet


def train_scheduler(cfg: dict[str, Any]) -> DDPMScheduler:
    """The noise schedule of training.

    Args:
        cfg: the config (its scheduler section).

    Returns:
        diffusers' DDPMScheduler.
    """
    return DDPMScheduler(**cfg["scheduler"])


def draw_device(device: torch.device, generator: torch.Generator | None) -> torch.device:
    """Where to draw: a generator only draws on its own device (a CPU generator with a CUDA model is common).

    Args:
        device: where the result is used.
        generator: the generator to draw with, or None (torch's global one).

    Returns:
        The generator's device, or `device` without one.
    """
    return generator.device if generator is not None else device


def randn(shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device and moved to `device`.

    Args:
        shape: the shape.
        device: where the result is used.
        generator: the generator, or None.

    Returns:
        The noise, on `device`.
    """
    return torch.randn(shape, generator=generator, device=draw_device(device, generator)).to(device)


def diffusion_loss(model: ConditionalUNet, sched: DDPMScheduler, z0: torch.Tensor, labels: torch.Tensor,
                   label_dropout: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean-reduced epsilon-MSE; labels dropped to the null class with prob `label_dropout` (for CFG).

    Timesteps, noise and dropout are drawn for z0's device (the model's), never mixed with the CPU.

    Args:
        model: the noise predictor.
        sched: the training noise schedule.
        z0: clean latents [B, C, H, W] (encode_latents').
        labels: their classes [B].
        label_dropout: probability of replacing a label by the null class.
        generator: for timesteps, noise and dropout (None: torch's global generator).

    Returns:
        The scalar loss.
    """
    b, device = z0.shape[0], z0.device
    at = draw_device(device, generator)
    t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=generator, device=at).to(device)
    noise = randn(tuple(z0.shape), device, generator)
    if label_dropout > 0:
        drop = (torch.rand(b, generator=generator, device=at) < label_dropout).to(labels.device)
        labels = torch.where(drop, torch.full_like(labels, model.class_embedder.null_class), labels)
    zt = sched.add_noise(z0, noise, t)
    return F.mse_loss(model(zt, t, labels), noise)


@torch.no_grad()
def encode(vae: AutoencoderKL, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The autoencoder's own latents (unscaled): what its scaling factor is measured on. The LDM's latents are
    encode_latents'.

    Args:
        vae: the autoencoder (put in eval mode).
        x: images in [-1, 1], [N, C, H, W].
        batch_size: images per forward.

    Returns:
        The posterior means, [N, c, h, w].
    """
    vae.eval()
    return torch.cat([vae.encode(x[i : i + batch_size]).latent_dist.mode() for i in range(0, len(x), batch_size)])


@torch.no_grad()
def decode(vae: AutoencoderKL, z: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Images from the autoencoder's own (unscaled) latents; decode_latents takes the LDM's.

    Args:
        vae: the autoencoder (put in eval mode).
        z: unscaled latents, [N, c, h, w].
        batch_size: latents per forward.

    Returns:
        Images in about [-1, 1], [N, C, H, W].
    """
    vae.eval()
    return torch.cat([vae.decode(z[i : i + batch_size]).sample for i in range(0, len(z), batch_size)])


def encode_latents(vae: AutoencoderKL, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Images to the latent space the LDM is trained and sampled in: posterior means times the autoencoder's
    scaling_factor (measured on the public latents at pre-training, so that they have unit variance, as in LDM).

    Args:
        vae: the frozen autoencoder.
        x: images in [-1, 1], [N, C, H, W] (dpldm.common.images_tensor makes them).
        batch_size: images per forward.

    Returns:
        Contiguous latents [N, c, h, w], on x's device.
    """
    return (encode(vae, x, batch_size) * vae.config.scaling_factor).contiguous()


def encode_split(vae: AutoencoderKL, images: np.ndarray, cfg: dict[str, Any], device: str = "cpu",
                 batch_size: int = 64) -> torch.Tensor:
    """encode_latents of uint8 images, converted a batch at a time on `device`: at 512 px a whole private set as
    one float tensor would take gigabytes.

    Args:
        vae: the frozen autoencoder (moved to `device` for the call, then back).
        images: uint8 [N, H, W, C].
        cfg: the config (its data layout).
        device: where to encode.
        batch_size: images per forward.

    Returns:
        Latents [N, c, h, w] on the CPU.
    """
    from dpldm.data import to_model_tensor

    d, home = cfg["data"], next(vae.parameters()).device
    vae.to(device)
    out = [encode_latents(vae, to_model_tensor(images[i : i + batch_size], d["image_size"], d["pad_to"],
                                               d["channels"]).to(device), batch_size).cpu()
           for i in range(0, len(images), batch_size)]
    vae.to(home)
    return torch.cat(out).contiguous()


def decode_latents(vae: AutoencoderKL, z: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Images from the LDM's latents (what sampling returns): the inverse of encode_latents.

    Args:
        vae: the frozen autoencoder.
        z: latents in the LDM's (scaled) space, [N, c, h, w].
        batch_size: latents per forward.

    Returns:
        Images in about [-1, 1], [N, C, H, W] (dpldm.data.from_model_tensor turns them into uint8).
    """
    return decode(vae, z / vae.config.scaling_factor, batch_size)


@torch.no_grad()
def ddim_sample(model: ConditionalUNet, cfg: dict[str, Any], labels: torch.Tensor, steps: int = 50,
                guidance_scale: float = 1.0, eta: float = 0.0, generator: torch.Generator | None = None
                ) -> torch.Tensor:
    """DDIM from pure noise to latents (in the model's scaled latent space).

    Args:
        model: the noise predictor.
        cfg: the config (scheduler, unet sample shape).
        labels: the class of each sample [B].
        steps: sampling steps.
        guidance_scale: classifier-free guidance; 1 = none.
        eta: DDIM's eta (0 deterministic, 1 ancestral).
        generator: for the starting noise and the steps' noise.

    Returns:
        Latents [B, C, H, W] (decode_latents turns them into images).
    """
    model.eval()
    sched = DDIMScheduler(**cfg["scheduler"], clip_sample=False, set_alpha_to_one=False)
    sched.set_timesteps(steps)
    u = cfg["unet"]
    device = next(model.parameters()).device  # the starting latents live where the model runs
    z = randn((len(labels), u["in_channels"], u["sample_size"], u["sample_size"]), device, generator)
    labels = labels.to(device)
    null = torch.full_like(labels, model.class_embedder.null_class)
    for t in sched.timesteps:
        tt = t.expand(len(labels)).to(device)  # the schedule stays on the CPU; the UNet wants its own device
        if guidance_scale == 1.0:
            eps = model(z, tt, labels)
        else:
            e_cond, e_null = model(torch.cat([z, z]), torch.cat([tt, tt]), torch.cat([labels, null])).chunk(2)
            eps = e_null + guidance_scale * (e_cond - e_null)
        z = sched.step(eps, t, z, eta=eta, generator=generator).prev_sample
    return z
