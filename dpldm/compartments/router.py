"""The router: a time-conditioned shard classifier on noisy latents (CDM's estimator of the mixture weights),
trained with DP-SGD through dpkernels.PrivacyEngine on the private latents of every shard.

It learns P(i | x_t, t) = pi_i q^i_t(x_t) / sum_j pi_j q^j_t(x_t), pi_i the shard's share of the training data, so
the mixture weight for a prior lambda is w_i = lambda_i P(i | x_t, t) / pi_i, normalised. The shares (pi) follow
from the shard sizes, which each compartment's sampling rate already discloses. It ignores the class: with random
shards pi_{i|c} ~ pi_i; with class shards lambda alone decides. Unlike the density rule it is trained on all the
shards together: every example's privacy loss composes its compartment's with the router's, and forgetting a shard
means training the router again without it (seconds: it is small), which `forget` does.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpldm.calibration import noise_multiplier
from dpldm.files import atomic_dir, sha256_file
from dpldm.models import CheckpointError

WEIGHTS = "router.safetensors"
META = "router.json"
# a config's `router:` section overrides these; epsilon is the router's own budget, composed with each compartment's
DEFAULTS = {"epsilon": 1.0, "epochs": 10, "batch_size": 512, "max_physical_batch_size": 512, "lr": 1e-3,
            "max_grad_norm": 1.0, "width": 64}


def router_hp(cfg: dict[str, Any]) -> dict[str, Any]:
    """The router's training settings.

    Args:
        cfg: the run's config (its optional `router:` section).

    Returns:
        DEFAULTS overridden by that section.
    """
    return {**DEFAULTS, **cfg.get("router", {})}


class Router(nn.Module):
    """Conv net on latents with a sinusoidal timestep embedding added to its features; GroupNorm (per example),
    so DP-SGD clips each example on its own.

    Args:
        in_channels: latent channels.
        num_shards: outputs (one logit per shard).
        width: feature channels.
        t_max: the schedule's number of training timesteps (the embedding is scaled to 1000).
    """

    def __init__(self, in_channels: int, num_shards: int, width: int = 64, t_max: int = 1000) -> None:
        super().__init__()
        self.t_max, self.width = t_max, width
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.norm1 = nn.GroupNorm(8, width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, stride=2)
        self.norm2 = nn.GroupNorm(8, width)
        self.time = nn.Linear(width, width)
        self.head = nn.Linear(width, num_shards)

    def embed(self, t: torch.Tensor) -> torch.Tensor:
        """Sinusoidal timestep embedding.

        Args:
            t: timesteps [B].

        Returns:
            [B, width].
        """
        half = self.width // 2
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device) / half)
        angles = t.float()[:, None] * freqs[None] * (1000.0 / self.t_max)
        return torch.cat([angles.sin(), angles.cos()], 1)

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Shard logits of noisy latents.

        Args:
            z: noisy latents [B, C, H, W].
            t: their timesteps [B].

        Returns:
            Logits [B, num_shards].
        """
        h = F.silu(self.norm1(self.conv1(z)))
        h = h + self.time(self.embed(t))[:, :, None, None]
        h = F.silu(self.norm2(self.conv2(h)))
        return self.head(h.mean((2, 3)))  # logits [B, num_shards]


def train_router(z: torch.Tensor, shard: torch.Tensor, num_shards: int, sched: Any, hp: dict[str, Any], sigma: float,
                 accountant: str, seed: int = 0, noise_seed: int | None = None, backend: str = "auto"
                 ) -> tuple[Router, list[list[float]]]:
    """DP-SGD on (latent, shard id) pairs, a fresh timestep and noise per example and step.

    Args:
        z: every shard's private latents [N, C, H, W].
        shard: the shard index of each [N].
        num_shards: how many shards.
        sched: the training noise schedule (adds the diffusion noise).
        hp: router_hp's settings.
        sigma: the noise multiplier (router_sigma's).
        accountant: the privacy accountant's name.
        seed: public seed of initialisation, timesteps and diffusion noise.
        noise_seed: the DP noise and sampling seed (None: drawn from the OS).
        backend: dpkernels backend.

    Returns:
        (the router, plain and in eval mode, the accountant history).
    """
    from dpkernels import PrivacyEngine

    torch.manual_seed(seed)  # public: initialisation, timesteps and diffusion noise; the DP streams are separate
    model = Router(z.shape[1], num_shards, hp.get("width", 64), sched.config.num_train_timesteps)
    opt = torch.optim.Adam(model.parameters(), lr=hp["lr"])
    loader = DataLoader(TensorDataset(z, shard), batch_size=hp["batch_size"])
    engine = PrivacyEngine(accountant=accountant)
    model, opt, loader = engine.make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=sigma,
                                             max_grad_norm=hp["max_grad_norm"], poisson_sampling=True,
                                             backend=backend, seed=noise_seed)
    model.train()
    for _ in range(hp["epochs"]):
        for zb, yb in engine.virtual_batches(loader, hp.get("max_physical_batch_size", hp["batch_size"])):
            opt.zero_grad(set_to_none=True)
            if len(zb):
                t = torch.randint(0, sched.config.num_train_timesteps, (len(zb),))
                zt = sched.add_noise(zb, torch.randn_like(zb), t)
                F.cross_entropy(model(zt, t), yb).backward()
            opt.step()
    history = [list(h) for h in engine.accountant.history]
    plain = Router(z.shape[1], num_shards, hp.get("width", 64), sched.config.num_train_timesteps)
    plain.load_state_dict({k: v.detach() for k, v in model.state_dict().items()})
    return plain.eval(), history


def router_sigma(target_epsilon: float, delta: float, n: int, hp: dict[str, Any], accountant: str) -> float:
    """The router's noise multiplier: target_epsilon over hp['epochs'] passes over n latents in batches of
    hp['batch_size'] (dpldm.calibration.noise_multiplier).

    Args:
        target_epsilon: the router's budget.
        delta: the run's delta.
        n: the number of private training latents (all shards').
        hp: the router's hyper-parameters (router_hp).
        accountant: the run's accountant.

    Returns:
        Sigma.
    """
    return noise_multiplier(target_epsilon, delta, n, hp["batch_size"], hp["epochs"], accountant, quiet=True)


class RouterError(CheckpointError):
    """A router folder that is missing, corrupt, or changed since it was written."""


def save_router(folder: Path, model: Router, meta: dict[str, Any]) -> None:
    """Write a router atomically: router.safetensors and router.json (the shards, shares, accounting, architecture
    and the weights' sha256).

    Args:
        folder: <run>/router.
        model: the trained router.
        meta: shards, shares, accounting, ...
    """
    def write(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / WEIGHTS)
        cfg = {"in_channels": model.conv1.in_channels, "num_shards": model.head.out_features, "width": model.width,
               "t_max": model.t_max}
        (tmp / META).write_text(json.dumps({**meta, "model": cfg, "sha256": sha256_file(tmp / WEIGHTS)}, indent=1))

    atomic_dir(folder, write)


def load_router(folder: Path) -> tuple[Router, dict[str, Any]]:
    """The router and its router.json; a RouterError when either file is missing, corrupt or changed (its weights
    must match the sha256 recorded when they were written, like a compartment's).

    Args:
        folder: <run>/router.

    Returns:
        (the router in eval mode, its router.json).
    """
    folder = Path(folder)
    fix = (f"sample with --rule density (it needs no router), or delete {folder} and train it again with "
           f"python -m dpldm.compartments train --resume --out {folder.parent} (its budget is spent again)")
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RouterError(f"{folder / META}: missing or corrupt ({type(e).__name__}: {e}); {fix}") from e
    if not (isinstance(meta, dict) and isinstance(meta.get("model"), dict) and isinstance(meta.get("shards"), list)
            and isinstance(meta.get("shares"), list) and isinstance(meta.get("sha256"), str)):
        raise RouterError(f"{folder / META}: corrupt (model, shards, shares or sha256 missing); {fix}")
    weights = folder / WEIGHTS
    if not weights.is_file() or sha256_file(weights) != meta["sha256"]:
        raise RouterError(f"{weights}: missing or changed since it was written (sha256 mismatch); {fix}")
    try:
        model = Router(**meta["model"])
        model.load_state_dict(load_file(weights))
    except Exception as e:  # a router.json whose architecture does not fit the weights
        raise RouterError(f"{folder}: the weights do not fit router.json ({type(e).__name__}: {e}); {fix}") from e
    return model.eval(), meta


class RouterWeights:
    """log P(shard | x_t, t) for the shards sampled from, in their order, renormalised over them: a router trained
    on more shards than a user may access is restricted to those (the others' probability mass is dropped)."""

    def __init__(self, model: Router, trained_shards: list[str], shares: list[float], use: list[str]) -> None:
        missing = [s for s in use if s not in trained_shards]
        if missing:
            raise ValueError(f"the router was not trained on shards {missing}: train it again (forget/add do)")
        self.model, self.index = model, [trained_shards.index(s) for s in use]
        self.log_share = torch.tensor([shares[i] for i in self.index]).log()

    @torch.no_grad()
    def __call__(self, z: torch.Tensor, t: int) -> torch.Tensor:
        logits = self.model(z.float(), torch.full((len(z),), t, device=z.device))
        return (torch.log_softmax(logits, 1)[:, self.index] - self.log_share.to(z.device)).double()
