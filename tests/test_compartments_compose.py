"""Composition of compartments at sampling (dpldm.compartments.compose) on cases with known answers.

Gaussian compartments have analytic noise predictions and densities at every noise level, so the density
estimator's weights can be compared with the true posterior weights w_i(x_t) along the trajectory, and the
composed samples with the true mixture."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dpldm.compartments.compose import compose_sample, schedule
from dpldm.config import load_config
from dpldm.diffusion import ddim_sample
from dpldm.models import build_unet

CFG = {"scheduler": load_config("mnist")["scheduler"], "unet": {"in_channels": 2, "sample_size": 4}}
SHAPE = (2, 4, 4)


class GaussianEps(nn.Module):
    """The exact noise prediction of data N(mean, std^2 I): E[eps | x_t] = sqrt(1-a) (x_t - sqrt(a) m) / v_t,
    v_t = a std^2 + 1 - a. Labels are ignored."""

    def __init__(self, mean: torch.Tensor, std: float) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.std = std
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the sampler a device
        self.alpha_bar = schedule(CFG, 1)[1].float()

    def variance(self, t: torch.Tensor) -> torch.Tensor:
        a = self.alpha_bar[t].view(-1, 1, 1, 1)
        return a * self.std**2 + 1 - a

    def forward(self, z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        a = self.alpha_bar[t].view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (z - a.sqrt() * self.mean) / self.variance(t)

    def log_density(self, z: torch.Tensor, t: int) -> torch.Tensor:
        a = float(self.alpha_bar[t])
        v = a * self.std**2 + 1 - a
        d = z[0].numel()
        return (-((z - a**0.5 * self.mean) ** 2).flatten(1).sum(1) / (2 * v) - d / 2 * torch.log(torch.tensor(v)))


def two_gaussians(sep: float = 0.6, std: float = 0.5) -> list[GaussianEps]:
    m = torch.full(SHAPE, sep)
    return [GaussianEps(m, std), GaussianEps(-m, std)]


def true_weights(models: list[GaussianEps], prior: torch.Tensor, z: torch.Tensor, t: int) -> torch.Tensor:
    logs = torch.stack([m.log_density(z, t) for m in models], 1) + prior.log()
    return torch.softmax(logs, 1)


def test_density_weights_track_the_true_posterior() -> None:
    models = two_gaussians()
    prior = torch.tensor([0.3, 0.7])
    out = compose_sample(models, CFG, torch.zeros(200, dtype=torch.long), prior, "density", steps=200,
                         generator=torch.Generator().manual_seed(0), keep_path=True)
    errors = torch.stack([(out.weights[k] - true_weights(models, prior, out.path[k], t)).abs()
                          for k, t in enumerate(out.timesteps)])
    # the weights go from ~prior (x_T is nearly noise) to ~one-hot: the check covers the whole range
    assert out.weights[0, :, 0].std() < out.weights[-1, :, 0].std()
    assert errors.mean() < 1e-3, errors.mean()  # measured 2.5e-5
    assert errors.max() < 0.02, errors.max()  # measured 0.003


def test_density_estimator_with_few_steps_and_unequal_spreads() -> None:
    """Unequal variances and 25 steps (the sampling default). The start is then off by the difference of the
    compartments' log q_T(0) (here d/2 log(v_1/v_2), a 0.016 weight error), which the steps carry along."""
    m = torch.full(SHAPE, 0.4)
    models = [GaussianEps(m, 0.3), GaussianEps(-m, 0.8)]
    prior = torch.tensor([0.5, 0.5])
    out = compose_sample(models, CFG, torch.zeros(200, dtype=torch.long), prior, "density", steps=25,
                         generator=torch.Generator().manual_seed(1), keep_path=True)
    errors = torch.stack([(out.weights[k] - true_weights(models, prior, out.path[k], t)).abs()
                          for k, t in enumerate(out.timesteps)])
    assert errors.mean() < 0.03, errors.mean()  # measured 0.011
    assert errors[-1].mean() < 0.01, errors[-1].mean()


def nearest_mode_distance(models: list[GaussianEps], z: torch.Tensor) -> torch.Tensor:
    return torch.stack([((z - m.mean) ** 2).flatten(1).sum(1) for m in models], 1).min(1).values


def test_composed_samples_follow_the_mixture_and_naive_averaging_does_not() -> None:
    models = two_gaussians(sep=1.0, std=0.5)
    prior = torch.tensor([0.3, 0.7])
    labels = torch.zeros(600, dtype=torch.long)
    d = models[0].mean.numel()
    mixed = compose_sample(models, CFG, labels, prior, "density", steps=100, generator=torch.Generator().manual_seed(2))
    naive = compose_sample(models, CFG, labels, prior, "naive", steps=100, generator=torch.Generator().manual_seed(2))
    first = (mixed.latents.flatten(1).mean(1) > 0).float().mean()
    assert abs(float(first) - 0.3) < 0.06, first  # 3.3 standard errors of a 600-sample proportion
    # samples of the mixture sit at one of the modes, at the data's spread; averaged scores land between them
    assert abs(float(nearest_mode_distance(models, mixed.latents).mean()) / (d * 0.25) - 1) < 0.15
    assert nearest_mode_distance(models, naive.latents).mean() > 2 * d * 0.25
    # attribution: the final weight picks the mode each sample ended in
    picked = mixed.weights[-1].argmax(1)
    assert (picked == (mixed.latents.flatten(1).mean(1) < 0).long()).float().mean() > 0.98


def test_router_rule_with_the_exact_posterior_gives_the_true_weights() -> None:
    """A router that returns log q^i_t(x_t) (the shares pi uniform, so no correction) makes w the true weights."""
    models = two_gaussians()
    prior = torch.tensor([0.3, 0.7])
    timesteps = schedule(CFG, 20)[0]

    def exact(z: torch.Tensor, t: int) -> torch.Tensor:
        return torch.stack([m.log_density(z, t) for m in models], 1)

    out = compose_sample(models, CFG, torch.zeros(50, dtype=torch.long), prior, "router", steps=20,
                         generator=torch.Generator().manual_seed(7), keep_path=True, router=exact)
    for k, t in enumerate(timesteps):
        torch.testing.assert_close(out.weights[k], true_weights(models, prior, out.path[k], t), atol=1e-5, rtol=0)


def test_one_compartment_is_the_plain_model() -> None:
    """Composing a single real UNet (any rule) is ancestral DDIM sampling of that model (diffusers' step, eta=1)."""
    cfg = load_config("tiny")
    torch.manual_seed(0)
    model = build_unet(cfg)
    labels = torch.arange(4)
    want = ddim_sample(model, cfg, labels, steps=5, guidance_scale=2.0, eta=1.0,
                       generator=torch.Generator().manual_seed(3))
    for rule in ("density", "naive"):
        got = compose_sample([model], cfg, labels, torch.ones(1), rule, steps=5, guidance_scale=2.0,
                             generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(got.latents, want, rtol=1e-4, atol=1e-5)
        assert torch.equal(got.weights, torch.ones(5, 4, 1))


def test_identical_compartments_keep_the_prior() -> None:
    models = two_gaussians()
    same = [models[0], models[0]]
    out = compose_sample(same, CFG, torch.zeros(8, dtype=torch.long), torch.tensor([0.25, 0.75]), "density",
                         steps=20, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(out.weights, torch.tensor([0.25, 0.75]).expand(20, 8, 2))


def test_zero_prior_compartment_gets_no_weight() -> None:
    models = two_gaussians()
    prior = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # per sample: e.g. its class lives in one shard only
    out = compose_sample(models, CFG, torch.zeros(2, dtype=torch.long), prior, "density", steps=10,
                         generator=torch.Generator().manual_seed(5))
    assert torch.equal(out.weights, prior.float().expand(10, 2, 2))


class Forbidden(GaussianEps):
    def forward(self, z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise AssertionError("a compartment with prior 0 for the whole batch was run")


def test_compartment_without_prior_in_the_batch_is_never_run() -> None:
    models = two_gaussians()
    models.append(Forbidden(torch.zeros(SHAPE), 1.0))
    for rule in ("density", "naive"):
        out = compose_sample(models, CFG, torch.zeros(4, dtype=torch.long), torch.tensor([1.0, 1.0, 0.0]), rule,
                             steps=5, generator=torch.Generator().manual_seed(6))
        assert (out.weights[..., 2] == 0).all()


@pytest.mark.parametrize("prior, match", [(torch.tensor([1.0]), "prior"), (torch.tensor([-1.0, 2.0]), "prior"),
                                          (torch.tensor([0.0, 0.0]), "prior")])
def test_bad_prior_is_refused(prior: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        compose_sample(two_gaussians(), CFG, torch.zeros(3, dtype=torch.long), prior, "density", steps=2)


def test_unknown_rule_is_refused() -> None:
    with pytest.raises(ValueError, match="rule"):
        compose_sample(two_gaussians(), CFG, torch.zeros(3, dtype=torch.long), torch.ones(2), "mean", steps=2)
    with pytest.raises(ValueError, match="needs a router"):
        compose_sample(two_gaussians(), CFG, torch.zeros(3, dtype=torch.long), torch.ones(2), "router", steps=2)
