"""Sampling from a mixture of compartments: the score of the mixture and its weights (CDM, Golatkar et al. 2024).

Compartment i models q^i; the mixture q = sum_i lambda_i q^i has, at every noise level t, the exact score

    eps(x_t, t) = sum_i w_i(x_t, t) eps_i(x_t, t),   w_i = lambda_i q^i_t(x_t) / sum_j lambda_j q^j_t(x_t)

(CDM Proposition 3.1). `naive` uses w_i = lambda_i at every step (plain averaging: the baseline, not the
mixture). `router` takes w_i from a trained shard classifier (dpldm.compartments.router). `density` estimates log q^i_t(x_t) along the sampling trajectory from the compartments' own outputs,
with nothing extra trained (the Ito density estimator of SuperDiff, Skreta et al. 2024, in discrete time):

The sampler is ancestral (DDIM with eta=1): x_{t'} ~ N(mu(x_t), sigma_t^2 I), mu linear in the predicted noise.
By Bayes, q^i_{t'}(x_{t'}) / q^i_t(x_t) = q^i(x_{t'} | x_t) / q(x_t | x_{t'}); the forward kernel q(x_t | x_{t'})
is the same for every compartment and cancels in w, and compartment i's reverse kernel
p^i(x_{t'} | x_t) = N(mu_i(x_t), sigma_t^2 I) stands for q^i(x_{t'} | x_t). So along the trajectory

    log q^i_{t'}(x_{t'}) = log q^i_t(x_t) - |x_{t'} - mu_i(x_t)|^2 / (2 sigma_t^2) + (terms shared by all i),

whose continuous-time limit is the Ito estimator d log q_t = <dx, score> + ... . At the start, x_T is not quite
pure noise (alpha_bar_T > 0), so log q^i_T(x_T) is taken as the integral of compartment i's score along the ray
from 0 to x_T (4-point Gauss-Legendre); it removes the leading sqrt(alpha_bar_T) term that would otherwise bias
the first weights; what remains is the difference of the compartments' log q^i_T(0), zero for compartments
whose data have equal spread (tests/test_compartments_compose.py measures both cases). Classifier-free guidance composes: the step uses sum_i w_i eps_i^guided, the weights track the
class-conditional densities q^i_t(x | c).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler
from torch import nn

from dpldm.diffusion import randn

RULES = ("density", "router", "naive")
_GAUSS_LEGENDRE = np.polynomial.legendre.leggauss(4)


@dataclass
class Composed:
    latents: torch.Tensor  # [B, C, H, W], the model's scaled latent space
    weights: torch.Tensor  # [S, B, n]: w_i used at each of the S sampling steps, per sample
    timesteps: list[int]
    path: torch.Tensor | None = None  # [S, B, C, H, W]: x_t at each step, where the weights were used (keep_path)


def schedule(cfg: dict[str, Any], steps: int) -> tuple[list[int], torch.Tensor]:
    """The DDIM timesteps (as dpldm.diffusion.ddim_sample uses them) and the model's alpha_bar table."""
    sched = DDIMScheduler(**cfg["scheduler"], clip_sample=False, set_alpha_to_one=False)
    sched.set_timesteps(steps)
    return [int(t) for t in sched.timesteps], sched.alphas_cumprod.double()


def step_coefficients(alpha_bar: torch.Tensor, t: int, t_prev: int) -> tuple[float, float, float]:
    """x_{t'} = a x_t + b eps + sigma xi for DDIM with eta=1 (ancestral); t_prev < 0 is the final step."""
    a_t = float(alpha_bar[t])
    a_p = float(alpha_bar[t_prev] if t_prev >= 0 else alpha_bar[0])  # set_alpha_to_one=False, as ddim_sample
    var = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
    a = (a_p / a_t) ** 0.5
    b = (1 - a_p - var) ** 0.5 - (a_p * (1 - a_t) / a_t) ** 0.5
    return a, b, var**0.5


def null_class_of(models: Sequence[nn.Module]) -> int:
    emb = getattr(models[0], "class_embedder", None)
    return int(emb.null_class) if emb is not None else -1


def _predict(models: Sequence[nn.Module], z: torch.Tensor, t: int, labels: torch.Tensor, null: torch.Tensor,
             guidance_scale: float, active: Sequence[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per compartment: conditional eps and guided eps, each [n, B, C, H, W]; zeros, never run, for a compartment
    no sample of the batch may use (prior 0)."""
    tt = torch.full((len(z),), t, device=z.device, dtype=torch.long)
    cond, guided = [], []
    for m, on in zip(models, active, strict=True):
        if not on:
            cond.append(torch.zeros_like(z))
            guided.append(torch.zeros_like(z))
        elif guidance_scale == 1.0:
            e = m(z, tt, labels)
            cond.append(e)
            guided.append(e)
        else:
            e_c, e_n = m(torch.cat([z, z]), torch.cat([tt, tt]), torch.cat([labels, null])).chunk(2)
            cond.append(e_c)
            guided.append(e_n + guidance_scale * (e_c - e_n))
    return torch.stack(cond), torch.stack(guided)


def start_log_density(models: Sequence[nn.Module], z: torch.Tensor, t: int, labels: torch.Tensor,
                      alpha_bar: torch.Tensor, active: Sequence[bool]) -> torch.Tensor:
    """log q^i_T(z) - log q^i_T(0) = int_0^1 <score_i(s z), z> ds, score = -eps / sqrt(1 - alpha_bar): [n, B]."""
    nodes, wts = _GAUSS_LEGENDRE
    tt = torch.full((len(z),), t, device=z.device, dtype=torch.long)
    scale = (1 - float(alpha_bar[t])) ** -0.5
    out = torch.zeros(len(models), len(z), dtype=torch.float64, device=z.device)
    for s, w in zip((nodes + 1) / 2, wts / 2, strict=True):
        for i, m in enumerate(models):
            if not active[i]:
                continue
            score = -scale * m(float(s) * z, tt, labels)
            out[i] += float(w) * (score * z).flatten(1).sum(1).double()
    return out


@torch.no_grad()
def compose_sample(models: Sequence[nn.Module], cfg: dict[str, Any], labels: torch.Tensor, prior: torch.Tensor,
                   rule: str = "density", steps: int = 50, guidance_scale: float = 1.0,
                   generator: torch.Generator | None = None, keep_path: bool = False,
                   router: Callable[[torch.Tensor, int], torch.Tensor] | None = None) -> Composed:
    """Draw len(labels) latents from the mixture of `models` (eps predictors called as m(z, t, labels)).

    Args:
        models: the compartments, each an eps predictor on the same latent space and schedule.
        cfg: the config (its scheduler and unet sample shape).
        labels: class of each sample, [B].
        prior: mixture weights lambda, [B, n] (per sample: they may depend on its class) or [n]; rows need not
            be normalised, but must be >= 0 with a positive sum.
        rule: "density" (the mixture's exact score, weights estimated along the trajectory), "router" (weights
            from `router`) or "naive" (w = lambda).
        steps: sampling steps (ancestral DDIM, eta=1).
        guidance_scale: classifier-free guidance; 1 = none.
        generator: for the starting noise and the ancestral noise.
        keep_path: also return x_t at every step (for checks of the weights).
        router: for rule "router": (x_t, t) -> [B, n] log P(i | x_t, t) - log pi_i (the router's training shares).
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if (rule == "router") != (router is not None):
        raise ValueError("rule 'router' needs a router, and only it takes one")
    if not models:
        raise ValueError("no compartments to compose")
    n, b = len(models), len(labels)
    if prior.shape not in ((n,), (b, n)):
        raise ValueError(f"prior must have shape [{n}] or [{b}, {n}] (compartments, or samples x compartments), "
                         f"got {list(prior.shape)}")
    prior = prior.double().expand(b, n)
    if (prior < 0).any() or not (prior.sum(1) > 0).all():
        raise ValueError("prior must be non-negative with a positive sum for every sample")
    for m in models:
        m.eval()
    device = next(models[0].parameters()).device
    u = cfg["unet"]
    z = randn((b, u["in_channels"], u["sample_size"], u["sample_size"]), device, generator)
    labels = labels.to(device)
    null = torch.full_like(labels, null_class_of(models))
    timesteps, alpha_bar = schedule(cfg, steps)
    log_prior = prior.log().to(device)  # log 0 = -inf: a compartment with lambda 0 never gets weight
    active = (prior.sum(0) > 0).tolist()  # e.g. a batch of one class: only the shards that hold it run
    log_q = start_log_density(models, z, timesteps[0], labels, alpha_bar, active) if rule == "density" else None
    history, path = [], []
    for k, t in enumerate(timesteps):
        t_prev = timesteps[k + 1] if k + 1 < len(timesteps) else -1
        cond, guided = _predict(models, z, t, labels, null, guidance_scale, active)
        if rule == "density":
            w = torch.softmax(log_prior + log_q.T, dim=1)
        elif rule == "router":
            w = torch.softmax(log_prior + router(z, t).to(log_prior), dim=1)
        else:
            w = prior / prior.sum(1, keepdim=True)
        history.append(w.float().cpu())
        if keep_path:
            path.append(z.cpu())
        eps = torch.einsum("bn,nbchw->bchw", w.to(guided.dtype), guided)
        a, c, sigma = step_coefficients(alpha_bar, t, t_prev)
        mean = a * z + c * eps
        z_next = mean + sigma * randn(tuple(z.shape), device, generator)
        if rule == "density":
            mu_i = a * z + c * cond  # [n, B, ...]: each compartment's own conditional reverse kernel
            log_q = log_q - ((z_next - mu_i).double() ** 2).flatten(2).sum(2) / (2 * sigma**2)
        z = z_next
    return Composed(latents=z, weights=torch.stack(history), timesteps=timesteps,
                    path=torch.stack(path) if keep_path else None)
