"""Device placement of dpldm's random draws: a model on another device than the CPU must get its timesteps, noise
and starting latents on its own device (`--device cuda` used to mix CPU draws with a CUDA model).

No GPU is needed: the model runs on the `meta` device, where an op mixing meta and (non-scalar) CPU tensors raises
"Tensor on device meta is not on the expected device cpu!", exactly as a CPU/CUDA mix does.
"""

from __future__ import annotations

import pytest
import torch

from dpldm.config import load_config
from dpldm.diffusion import ddim_sample, diffusion_loss, train_scheduler
from dpldm.models import ConditionalUNet, build_unet

META = torch.device("meta")


def meta_model() -> tuple[ConditionalUNet, dict]:
    cfg = load_config("tiny")
    return build_unet(cfg).to(META), cfg


@pytest.mark.parametrize("generator", [None, "cpu"], ids=["global-rng", "cpu-generator"])
def test_training_step_on_model_device(generator: str | None) -> None:
    """One optimizer step of the diffusion objective; pre-training passes a CPU generator, DP training none."""
    model, cfg = meta_model()
    gen = torch.Generator().manual_seed(0) if generator else None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    z0, labels = torch.zeros(4, 3, 8, 8, device=META), torch.arange(4, device=META)
    loss = diffusion_loss(model, train_scheduler(cfg), z0, labels, label_dropout=0.5, generator=gen)
    loss.backward()
    opt.step()
    assert loss.device == META
    assert all(p.grad is not None and p.grad.device == META for p in model.parameters())


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_sampling_on_model_device(eta: float) -> None:
    """DDIM with guidance and a CPU generator (as dpldm.sample uses), labels given on the CPU."""
    model, cfg = meta_model()
    z = ddim_sample(model, cfg, torch.arange(3), steps=2, guidance_scale=2.0, eta=eta,
                    generator=torch.Generator().manual_seed(0))
    assert z.device == META and z.shape == (3, 3, 8, 8)

