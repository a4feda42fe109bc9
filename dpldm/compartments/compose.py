"""Sampling from a mixture of compartments: the score of the mixture and its weights (CDM, Golatkar et al. 2024).

Compartment i models q^i; the mixture q = sum_i lambda_i q^i has, at every noise level t, the exact score

    eps(x_t, t) = sum_i w_i(x_t, t) eps_i(x_t, t),   w_i = lambda_i q^i_t(x_t) / sum_j lambda_j q^j_t(x_t)

(CDM Proposition 3.1). compose_sample steps that sum with an ancestral sampler (DDIM with eta=1); the weights come
from a composition rule (dpldm.compartments.rules: `density` estimates them along the trajectory, `router` takes
them from a trained shard classifier, `naive` uses w_i = lambda_i). Classifier-free guidance composes: the step uses
sum_i w_i eps_i^guided.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDIMScheduler
from torch import nn

from dpldm.compartments.rules import Mixture, Step, composition_rule, router_rules
from dpldm.diffusion import randn


@dataclass
class Composed:
    """What compose_sample returns."""

    latents: torch.Tensor  # [B, C, H, W], the model's scaled latent space
    weights: torch.Tensor  # [S, B, n]: w_i used at each of the S sampling steps, per sample
    timesteps: list[int]
    path: torch.Tensor | None = None  # [S, B, C, H, W]: x_t at each step, where the weights were used (keep_path)


def schedule(cfg: dict[str, Any], steps: int) -> tuple[list[int], torch.Tensor]:
    """The sampling schedule.

    Args:
        cfg: the config (its scheduler section).
        steps: the number of sampling steps.

    Returns:
        (the DDIM timesteps, as dpldm.diffusion.ddim_sample uses them, the model's alpha_bar table in float64).
    """
    sched = DDIMScheduler(**cfg["scheduler"], clip_sample=False, set_alpha_to_one=False)
    sched.set_timesteps(steps)
    return [int(t) for t in sched.timesteps], sched.alphas_cumprod.double()


def step_coefficients(alpha_bar: torch.Tensor, t: int, t_prev: int) -> tuple[float, float, float]:
    """x_{t'} = a x_t + b eps + sigma xi for DDIM with eta=1 (ancestral).

    Args:
        alpha_bar: the alpha_bar table.
        t: the current timestep.
        t_prev: the next one; < 0 for the final step.

    Returns:
        (a, b, sigma).
    """
    a_t = float(alpha_bar[t])
    a_p = float(alpha_bar[t_prev] if t_prev >= 0 else alpha_bar[0])  # set_alpha_to_one=False, as ddim_sample
    var = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
    a = (a_p / a_t) ** 0.5
    b = (1 - a_p - var) ** 0.5 - (a_p * (1 - a_t) / a_t) ** 0.5
    return a, b, var**0.5


def null_class_of(models: Sequence[nn.Module]) -> int:
    """The label of the unconditional context (for classifier-free guidance).

    Args:
        models: the compartments (all share the base's class embedder layout).

    Returns:
        The first model's null class, or -1 for a model without a class embedder.
    """
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
        rule: the name of a registered composition rule (dpldm.compartments.rules): "density" (the mixture's
            exact score, weights estimated along the trajectory), "router" (weights from `router`) or "naive"
            (w = lambda).
        steps: sampling steps (ancestral DDIM, eta=1).
        guidance_scale: classifier-free guidance; 1 = none.
        generator: for the starting noise and the ancestral noise.
        keep_path: also return x_t at every step (for checks of the weights).
        router: for rule "router": (x_t, t) -> [B, n] log P(i | x_t, t) - log pi_i (the router's training shares).

    Returns:
        The latents, and the weights used at every step.

    Raises:
        ValueError: an unknown rule, a router given to a rule that takes none (or none to one that needs it), no
            models, or a prior of the wrong shape or with a row that is not a distribution.
    """
    rule_cls = composition_rule(rule)
    if rule_cls.needs_router != (router is not None):
        raise ValueError(f"rule {' or '.join(map(repr, router_rules()))} needs a router, and only it takes one")
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
    # log 0 = -inf: a compartment with lambda 0 never gets weight; one no sample may use is never run (e.g. a batch
    # of one class: only the shards that hold it run)
    mix = Mixture(models, labels, prior, prior.log().to(device), (prior.sum(0) > 0).tolist(), alpha_bar, router)
    weigher = rule_cls(mix, z, timesteps[0])
    history, path = [], []
    for k, t in enumerate(timesteps):
        t_prev = timesteps[k + 1] if k + 1 < len(timesteps) else -1
        cond, guided = _predict(models, z, t, labels, null, guidance_scale, mix.active)
        w = weigher.weights(z, t)
        history.append(w.float().cpu())
        if keep_path:
            path.append(z.cpu())
        eps = torch.einsum("bn,nbchw->bchw", w.to(guided.dtype), guided)
        a, c, sigma = step_coefficients(alpha_bar, t, t_prev)
        z_next = a * z + c * eps + sigma * randn(tuple(z.shape), device, generator)
        weigher.update(Step(t, z, z_next, cond, a, c, sigma))
        z = z_next
    return Composed(latents=z, weights=torch.stack(history), timesteps=timesteps,
                    path=torch.stack(path) if keep_path else None)
