"""Composition rules: how the compartments' noise predictions are weighted at each sampling step.

compose_sample (dpldm.compartments.compose) steps x_t with eps = sum_i w_i(x_t, t) eps_i(x_t, t); a rule supplies
the weights w. A rule is a small class with the same two methods, registered by name in COMPOSITION_RULES:

    weights(z, t) -> [B, n]   the weights of each sample at x_t (rows sum to 1; 0 where the prior is 0)
    update(step)              the step just taken, x_t -> x_{t'} (a rule that keeps no state ignores it)

One object serves one batch: compose_sample builds it at the start of the trajectory, `rule(mixture, x_T, T)`.

- `density`: the exact score of the mixture, log q^i_t(x_t) estimated along the trajectory from the compartments'
  own outputs, with nothing extra trained (DensityRule's docstring derives it).
- `router`: w_i from the run's DP-trained shard classifier (dpldm.compartments.router).
- `naive`: w_i = lambda_i at every step (plain averaging: the baseline, not the mixture).

Adding a rule: subclass CompositionRule in this module, set `name` and `summary` (a phrase for `--rule`'s help),
`needs_router = True` if its weights read the run's router, write `weights` (and `update`, and `__init__` calling
super's, if it keeps state), and decorate the class with @register_rule. `python -m dpldm.compartments sample
--rule NAME` then offers it, and tests/test_compartments_compose.py shows how to check it on Gaussian compartments
whose true weights are known.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

_GAUSS_LEGENDRE = np.polynomial.legendre.leggauss(4)


@dataclass
class Mixture:
    """One batch being composed, as every rule sees it.

    Attributes:
        models: the compartments, eps predictors called as m(z, t, labels).
        labels: the class of each sample, [B], on the models' device.
        prior: the mixture weights lambda, [B, n], float64 (rows not normalised).
        log_prior: log lambda on the models' device, [B, n] (-inf where lambda is 0: that compartment never gets
            weight).
        active: per compartment, whether some sample of the batch may use it (the others are never run).
        alpha_bar: the schedule's alpha_bar table, float64.
        router: (x_t, t) -> [B, n] log P(i | x_t, t) - log pi_i, for the rules that need one; else None.
    """

    models: Sequence[nn.Module]
    labels: torch.Tensor
    prior: torch.Tensor
    log_prior: torch.Tensor
    active: list[bool]
    alpha_bar: torch.Tensor
    router: Callable[[torch.Tensor, int], torch.Tensor] | None = None


@dataclass
class Step:
    """One ancestral sampling step, x_{t'} = a x_t + c eps + sigma xi, as a rule's update sees it.

    Attributes:
        t: the timestep of x_t.
        z: x_t, [B, C, H, W].
        z_next: x_{t'}.
        cond: each compartment's conditional eps at x_t, [n, B, C, H, W] (zeros for an inactive one).
        a: the coefficient of x_t.
        c: the coefficient of eps.
        sigma: the standard deviation of the step's noise.
    """

    t: int
    z: torch.Tensor
    z_next: torch.Tensor
    cond: torch.Tensor
    a: float
    c: float
    sigma: float


class CompositionRule(ABC):
    """The weights of the compartments along one batch's trajectory (see the module docstring).

    Args:
        mix: the batch being composed.
        z: its starting latents x_T.
        t: the first timestep T.
    """

    name: ClassVar[str]  # the value of --rule
    summary: ClassVar[str]  # what it does, for --rule's help
    needs_router: ClassVar[bool] = False  # its weights read the run's router (compose_sample's `router`)

    def __init__(self, mix: Mixture, z: torch.Tensor, t: int) -> None:
        self.mix = mix

    @abstractmethod
    def weights(self, z: torch.Tensor, t: int) -> torch.Tensor:
        """The mixture weights at x_t.

        Args:
            z: x_t, [B, C, H, W].
            t: its timestep.

        Returns:
            w, [B, n], each row summing to 1.
        """

    def update(self, step: Step) -> None:
        """Take in the step just made; by default a rule keeps no state.

        Args:
            step: the step x_t -> x_{t'}.
        """


COMPOSITION_RULES: dict[str, type[CompositionRule]] = {}


def register_rule(cls: type[CompositionRule]) -> type[CompositionRule]:
    """Class decorator: make a rule available by its name (to compose_sample and to `sample --rule`).

    Args:
        cls: the CompositionRule subclass.

    Returns:
        cls, unchanged.

    Raises:
        ValueError: a rule of that name is registered already.
    """
    if cls.name in COMPOSITION_RULES:
        raise ValueError(f"composition rule {cls.name!r} is registered twice")
    COMPOSITION_RULES[cls.name] = cls
    return cls


def rule_names() -> tuple[str, ...]:
    """The registered rules' names.

    Returns:
        The names, in registration order.
    """
    return tuple(COMPOSITION_RULES)


def composition_rule(name: str) -> type[CompositionRule]:
    """A registered rule, by name.

    Args:
        name: the rule's name.

    Returns:
        Its class.

    Raises:
        ValueError: no rule of that name.
    """
    if name not in COMPOSITION_RULES:
        raise ValueError(f"rule must be one of {rule_names()}, got {name!r}")
    return COMPOSITION_RULES[name]


def rules_help() -> str:
    """The registered rules for a help text.

    Returns:
        `a (summary), b (summary) or c (summary)`.
    """
    items = [f"{name} ({cls.summary})" for name, cls in COMPOSITION_RULES.items()]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def router_rules() -> tuple[str, ...]:
    """The rules whose weights read a router.

    Returns:
        Their names, in registration order.
    """
    return tuple(name for name, cls in COMPOSITION_RULES.items() if cls.needs_router)


def start_log_density(models: Sequence[nn.Module], z: torch.Tensor, t: int, labels: torch.Tensor,
                      alpha_bar: torch.Tensor, active: Sequence[bool]) -> torch.Tensor:
    """log q^i_T(z) - log q^i_T(0) = int_0^1 <score_i(s z), z> ds, score = -eps / sqrt(1 - alpha_bar).

    Args:
        models: the compartments.
        z: x_T, [B, C, H, W].
        t: T.
        labels: [B].
        alpha_bar: the schedule's alpha_bar table.
        active: which compartments to run (the others get 0).

    Returns:
        [n, B], float64.
    """
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


@register_rule
class DensityRule(CompositionRule):
    """The mixture's exact score: w_i = lambda_i q^i_t(x_t) / sum_j lambda_j q^j_t(x_t), log q^i_t tracked along the
    trajectory (the Ito density estimator of SuperDiff, Skreta et al. 2024, in discrete time).

    The sampler is ancestral (DDIM with eta=1): x_{t'} ~ N(mu(x_t), sigma_t^2 I), mu linear in the predicted noise.
    By Bayes, q^i_{t'}(x_{t'}) / q^i_t(x_t) = q^i(x_{t'} | x_t) / q(x_t | x_{t'}); the forward kernel
    q(x_t | x_{t'}) is the same for every compartment and cancels in w, and compartment i's reverse kernel
    p^i(x_{t'} | x_t) = N(mu_i(x_t), sigma_t^2 I) stands for q^i(x_{t'} | x_t). So along the trajectory

        log q^i_{t'}(x_{t'}) = log q^i_t(x_t) - |x_{t'} - mu_i(x_t)|^2 / (2 sigma_t^2) + (terms shared by all i),

    whose continuous-time limit is the Ito estimator d log q_t = <dx, score> + ... . At the start, x_T is not quite
    pure noise (alpha_bar_T > 0), so log q^i_T(x_T) is taken as the integral of compartment i's score along the ray
    from 0 to x_T (4-point Gauss-Legendre); it removes the leading sqrt(alpha_bar_T) term that would otherwise bias
    the first weights; what remains is the difference of the compartments' log q^i_T(0), zero for compartments
    whose data have equal spread (tests/test_compartments_compose.py measures both cases). With classifier-free
    guidance the weights track the class-conditional densities q^i_t(x | c): the update uses each compartment's
    conditional prediction.
    """

    name = "density"
    summary = "exact mixture score, estimated along the trajectory"

    def __init__(self, mix: Mixture, z: torch.Tensor, t: int) -> None:
        super().__init__(mix, z, t)
        self.log_q = start_log_density(mix.models, z, t, mix.labels, mix.alpha_bar, mix.active)  # [n, B]

    def weights(self, z: torch.Tensor, t: int) -> torch.Tensor:
        """softmax_i(log lambda_i + log q^i_t(x_t)).

        Args:
            z: x_t (the density was tracked up to it).
            t: its timestep.

        Returns:
            w, [B, n].
        """
        return torch.softmax(self.mix.log_prior + self.log_q.T, dim=1)

    def update(self, step: Step) -> None:
        """log q^i -= |x_{t'} - mu_i(x_t)|^2 / (2 sigma^2), mu_i from compartment i's own conditional prediction.

        Args:
            step: the step x_t -> x_{t'}.
        """
        mu_i = step.a * step.z + step.c * step.cond  # [n, B, ...]: each compartment's own reverse kernel
        self.log_q = self.log_q - ((step.z_next - mu_i).double() ** 2).flatten(2).sum(2) / (2 * step.sigma**2)


@register_rule
class RouterRule(CompositionRule):
    """w_i = lambda_i P(i | x_t, t) / pi_i, normalised: the router estimates the posterior over shards."""

    name = "router"
    summary = "the run's DP-trained shard classifier"
    needs_router = True

    def weights(self, z: torch.Tensor, t: int) -> torch.Tensor:
        """softmax_i(log lambda_i + log P(i | x_t, t) - log pi_i).

        Args:
            z: x_t.
            t: its timestep.

        Returns:
            w, [B, n].
        """
        return torch.softmax(self.mix.log_prior + self.mix.router(z, t).to(self.mix.log_prior), dim=1)


@register_rule
class NaiveRule(CompositionRule):
    """w_i = lambda_i at every step: plain averaging of the predictions (the baseline, not the mixture)."""

    name = "naive"
    summary = "averaging, a baseline"

    def weights(self, z: torch.Tensor, t: int) -> torch.Tensor:
        """The prior, normalised.

        Args:
            z: x_t (unused).
            t: its timestep (unused).

        Returns:
            w, [B, n].
        """
        return self.mix.prior / self.mix.prior.sum(1, keepdim=True)
