"""PrivacyEngine: the Opacus spelling, our book-keeping.

    engine = PrivacyEngine(accountant="prv")
    model, optimizer, loader = engine.make_private(module=model, optimizer=opt, data_loader=loader,
                                                   noise_multiplier=1.0, max_grad_norm=1.0)

The module is patched in place: each trainable supported layer's forward goes through
the engine (see dpkernels.layers). Everything a bad model could get wrong is checked
here, before any step.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from dpkernels import ops
from dpkernels.bookkeeping import Clipper, Recorder
from dpkernels.layers import RULES, DPLayer, rule_for
from dpkernels.noise import NoiseSource
from dpkernels.optimizer import DPOptimizer
from dpkernels.privacy import create_accountant, get_noise_multiplier, iterate_chunks, poisson_loader, sample_rate_of

log = logging.getLogger("dpkernels")


class PrivacyEngine:
    def __init__(self, accountant: str = "prv", secure_mode: bool = False):
        self.accountant = create_accountant(mechanism=accountant)
        self.secure_mode = secure_mode
        self.optimizer: DPOptimizer | None = None
        self.layers: list[DPLayer] = []
        self.noise: NoiseSource | None = None

    # --- setup --------------------------------------------------------------------------------
    def make_private(
        self,
        *,
        module: nn.Module,
        optimizer: Optimizer,
        data_loader: DataLoader,
        noise_multiplier: float,
        max_grad_norm: float | list[float],
        poisson_sampling: bool = True,
        clipping: str = "flat",
        backend: str = "auto",
        loss_reduction: str = "mean",
        seed: int | None = None,
    ) -> tuple[nn.Module, DPOptimizer, DataLoader]:
        if self.optimizer is not None:
            raise RuntimeError("this PrivacyEngine already made a model private; use a new engine per model")
        if backend not in ops.BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {ops.BACKENDS}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if getattr(module, "_dpkernels_engine", None) is not None:
            raise RuntimeError("this module was already made private by another PrivacyEngine")
        params = trainable_parameters(module)
        check_optimizer(optimizer, params)

        sample_rate = sample_rate_of(data_loader)
        expected_batch_size = int(len(data_loader.dataset) * sample_rate)
        if poisson_sampling:
            data_loader = poisson_loader(data_loader, self.secure_mode)
        else:
            log.warning("dpkernels: poisson_sampling=False: the accountant's guarantee assumes Poisson sampling")

        recorder = Recorder()
        layers = [rule_for(m)(name, m, recorder) for name, m in private_modules(module)]
        clipper = Clipper(layers, max_grad_norm, clipping, backend, loss_reduction)
        self.noise = NoiseSource(seed, self.secure_mode)
        self.optimizer = DPOptimizer(optimizer, params, recorder, clipper, self.noise, noise_multiplier,
                                     expected_batch_size, backend)
        self.optimizer.step_hooks.append(
            lambda opt: self.accountant.step(noise_multiplier=opt.noise_multiplier, sample_rate=sample_rate))
        self.sample_rate = sample_rate
        for layer in layers:  # patch last: nothing is changed if a check above failed
            layer.module.forward = layer.forward
        module._dpkernels_engine = self
        self.layers = layers
        return module, self.optimizer, data_loader

    def make_private_with_epsilon(
        self,
        *,
        module: nn.Module,
        optimizer: Optimizer,
        data_loader: DataLoader,
        target_epsilon: float,
        target_delta: float,
        epochs: int,
        max_grad_norm: float | list[float],
        **kwargs: Any,
    ) -> tuple[nn.Module, DPOptimizer, DataLoader]:
        """Calibrate sigma with Opacus' get_noise_multiplier for `epochs` passes, then make_private."""
        if not target_epsilon > 0:
            raise ValueError(f"target_epsilon must be positive, got {target_epsilon}")
        if not 0 < target_delta < 1:
            raise ValueError(f"target_delta must be in (0, 1), got {target_delta}")
        sigma = get_noise_multiplier(
            target_epsilon=target_epsilon, target_delta=target_delta, sample_rate=sample_rate_of(data_loader),
            epochs=epochs, accountant=self.accountant.mechanism(),
        )
        return self.make_private(module=module, optimizer=optimizer, data_loader=data_loader,
                                 noise_multiplier=sigma, max_grad_norm=max_grad_norm, **kwargs)

    # --- during training ----------------------------------------------------------------------
    def virtual_batches(self, data_loader, max_physical_batch_size: int):
        """Split each logical (Poisson) batch into physical chunks; noise is added once per logical step."""
        if self.optimizer is None:
            raise RuntimeError("call make_private first")
        return iterate_chunks(data_loader, max_physical_batch_size, self.optimizer)

    def get_epsilon(self, delta: float) -> float:
        return self.accountant.get_epsilon(delta=delta)

    def state_dict(self) -> dict:
        return {"accountant": self.accountant.state_dict(), "noise": self.noise.state_dict() if self.noise else {}}

    def load_state_dict(self, state: dict) -> None:
        self.accountant.load_state_dict(state["accountant"])
        if self.noise is not None:
            self.noise.load_state_dict(state.get("noise", {}))


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters, after checking each belongs to exactly one supported module."""
    owners: dict[int, str] = {}
    params = []
    for name, m in module.named_modules(remove_duplicate=False):
        for pname, p in m.named_parameters(recurse=False):
            if p is None or not p.requires_grad:
                continue
            where = f"{name}.{pname}" if name else pname
            if id(p) in owners:
                raise ValueError(
                    f"parameter {where} is also {owners[id(p)]} (weight tying or a shared module): its per-sample "
                    "gradient would mix two uses; untie it or freeze it")
            owners[id(p)] = where
            if rule_for(m) is None:
                supported = ", ".join(c.__name__ for c in RULES)
                raise ValueError(
                    f"module '{name}' ({type(m).__name__}) has trainable parameter '{pname}' but dpkernels has no "
                    f"per-sample rule for it (supported: {supported}); freeze it or replace the module")
            params.append(p)
    if not params:
        raise ValueError("the module has no trainable parameters")
    return params


def private_modules(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in module.named_modules()
            if rule_for(m) is not None and any(p.requires_grad for p in m.parameters(recurse=False))]


def check_optimizer(optimizer: Optimizer, params: list[nn.Parameter]) -> None:
    ours = {id(p) for p in params}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad and id(p) not in ours:
                raise ValueError(
                    "the optimizer holds a parameter that is not a trainable parameter of the module "
                    f"(shape {tuple(p.shape)}): it would be updated without privacy")
