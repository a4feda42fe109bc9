"""PrivacyEngine: the Opacus spelling, our book-keeping.

    engine = PrivacyEngine(accountant="prv")
    model, optimizer, loader = engine.make_private(module=model, optimizer=opt, data_loader=loader,
                                                   noise_multiplier=1.0, max_grad_norm=1.0)

The module is patched in place: each trainable supported layer's forward goes through
the engine (see dpkernels.layers). Everything a bad model could get wrong is checked
here, before any step.
"""

from __future__ import annotations

import functools
import logging
import warnings
import weakref
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from dpkernels import distributed as distributed_mod
from dpkernels import ops
from dpkernels.bookkeeping import Clipper, Recorder
from dpkernels.layers import LAYER_TYPES, DPLayer, rule_for
from dpkernels.noise import NoiseSource
from dpkernels.optimizer import DPOptimizer
from dpkernels.privacy import (
    create_accountant,
    get_noise_multiplier,
    iterate_chunks,
    poisson_loader,
    sample_rate_of,
    sampler_generator,
)

log = logging.getLogger("dpkernels")


class PrivacyEngine:
    """DP-SGD for a model, the Opacus way: `make_private` patches the model, wraps the optimizer and the loader.

    Args:
        accountant: Opacus' accountant: "prv" (default), "rdp" or "gdp".
        secure_mode: draw the noise seed from the OS at every step (no stream state is kept, none may be given).
    """
    def __init__(self, accountant: str = "prv", secure_mode: bool = False):
        self.accountant = create_accountant(mechanism=accountant)
        self.secure_mode = secure_mode
        self.optimizer: DPOptimizer | None = None
        self.layers: list[DPLayer] = []
        self.noise: NoiseSource | None = None
        self._calibration: dict[str, Any] = {}  # make_private_with_epsilon's targets, checked across ranks too

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
        distributed: bool | None = None,
    ) -> tuple[nn.Module, DPOptimizer, DataLoader]:
        """Make `module` private in place; return it, the DP optimizer and the Poisson loader.

        Args:
            module: the model. Every trainable parameter must belong to a supported layer (dpkernels/README.md); a
                BatchNorm must be frozen and in eval mode.
            optimizer: holds the trainable parameters (frozen ones may be held too; they must stay frozen).
            data_loader: its batch size over its data set size is the sampling rate q.
            noise_multiplier: sigma; the noise std on the summed gradient is sigma * C.
            max_grad_norm: C, or one threshold per trainable parameter with clipping="per_layer".
            poisson_sampling: replace the loader by Opacus' Poisson (uniform with replacement) loader.
            clipping: "flat" (one norm over all parameters) or "per_layer".
            backend: "auto", "cpu", "cuda", "triton" or "torch" (the plain-torch reference).
            loss_reduction: "mean" (the update is divided by the expected batch size q N) or "sum".
            seed: None (the default) draws the noise seed and the Poisson sampler's seed from the OS; an int
                makes both reproducible, for tests only: whoever knows it can subtract the noise.
            distributed: data-parallel over the initialised torch.distributed process group
                (dpkernels.distributed: every rank passes a loader over the whole data set; the noise is added
                once, on rank 0; one all-reduce per step). None: when a group of more than one process exists.
                `module` may be wrapped in DistributedDataParallel.

        Returns:
            (module, patched in place; the DPOptimizer to step; the loader to draw batches from: Opacus' Poisson
            loader, or `data_loader` itself with poisson_sampling=False).
        """
        if self.optimizer is not None:
            raise RuntimeError("this PrivacyEngine already made a model private; use a new engine per model")
        calibration, self._calibration = self._calibration, {}
        check_arguments(module, backend, loss_reduction)
        outer, module = module, distributed_mod.unwrap(module)
        distributed, rank, world_size = data_parallel_world(distributed)
        params = trainable_parameters(module)
        check_optimizer(optimizer, params)
        norm_guards = batch_statistics_modules(module)
        check_batch_first(module)

        sample_rate = sample_rate_of(data_loader)
        expected_batch_size = int(len(data_loader.dataset) * sample_rate)
        if distributed:
            self._check_ranks_agree(module, data_loader.dataset, sample_rate, noise_multiplier, max_grad_norm,
                                    clipping, loss_reduction, poisson_sampling, seed, calibration)
        self.noise = NoiseSource(seed, self.secure_mode)
        recorder = Recorder()
        data_loader = self._private_loader(data_loader, poisson_sampling, distributed, seed, rank, world_size, recorder)

        layers = [rule_for(m)(name, m, recorder) for name, m in private_modules(module)]
        clipper = Clipper(layers, max_grad_norm, clipping, backend, loss_reduction)
        names = {id(p): n for n, p in module.named_parameters()}
        self.optimizer = DPOptimizer(optimizer, params, recorder, clipper, self.noise, noise_multiplier,
                                     expected_batch_size, backend, names, rank, world_size)
        self.optimizer.poisson = poisson_sampling
        self.optimizer.step_hooks.append(
            lambda opt: self.accountant.step(noise_multiplier=opt.noise_multiplier, sample_rate=sample_rate))
        self.sample_rate = sample_rate
        self._patch(outer, module, layers, recorder, norm_guards)
        self.layers = layers
        return outer, self.optimizer, data_loader

    def _check_ranks_agree(self, module: nn.Module, dataset: Any, sample_rate: float, noise_multiplier: float,
                           max_grad_norm: float | list[float], clipping: str, loss_reduction: str,
                           poisson_sampling: bool, seed: int | None, calibration: dict[str, Any]) -> None:
        """Refuse a distributed run whose ranks differ in anything the guarantee (and the one epsilon every rank
        reports) depends on: make_private's arguments, the accounting, the trainable parameters and the data (the
        same examples at the same indices)."""
        distributed_mod.check_same_settings({
            "the data set size": len(dataset),
            "the sampling rate": sample_rate,
            "noise_multiplier": float(noise_multiplier),
            "max_grad_norm": max_grad_norm,
            "clipping": clipping,
            "loss_reduction": loss_reduction,
            "poisson_sampling": poisson_sampling,
            "the accountant": self.accountant.mechanism(),
            "the accountant's history": self.accountant.history,
            "secure_mode": self.secure_mode,
            "seed=None (OS seeding) or a test seed": seed is None,
            "the trainable parameters (names and shapes)": [
                (n, tuple(p.shape)) for n, p in module.named_parameters() if p.requires_grad],
            "the data set's content": distributed_mod.dataset_fingerprint(dataset),
            **calibration,
        })

    def _private_loader(self, data_loader: DataLoader, poisson_sampling: bool, distributed: bool, seed: int | None,
                        rank: int, world_size: int, recorder: Recorder) -> DataLoader:
        """The loader the private step draws from: Opacus' Poisson loader (this rank's share when distributed), or
        the user's own with a warning."""
        self.sampler_generator = None
        if poisson_sampling:
            self.sampler_generator = sampler_generator(seed, rank)
            data_loader = (distributed_mod.rank_poisson_loader(data_loader, self.sampler_generator, rank, world_size)
                           if distributed else poisson_loader(data_loader, self.sampler_generator))
            data_loader.recorder = recorder  # each batch's size: what the private layers' rows are checked against
        elif distributed:
            raise ValueError("distributed training needs poisson_sampling=True (each rank samples its share)")
        else:
            log.warning("dpkernels: poisson_sampling=False: the accountant's guarantee assumes Poisson sampling")
        return data_loader

    def _patch(self, outer: nn.Module, module: nn.Module, layers: list[DPLayer], recorder: Recorder,
               norm_guards: list[tuple[str, nn.Module]]) -> None:
        """Route the private layers' forwards through the engine and install the guards. Last: nothing is changed
        if a check before it failed."""
        for layer in layers:
            layer.module.forward = layer.forward
        for m in {id(module): module, id(outer): outer}.values():
            m._dpkernels_engine = self
        _reach_zero_grad(self.optimizer)
        module.register_forward_pre_hook(_record_input_rows(recorder), with_kwargs=True)
        for name, m in norm_guards:  # model.train() later must not bring batch statistics back
            m.register_forward_pre_hook(_refuse_batch_statistics(name))

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
        """Calibrate sigma with Opacus' get_noise_multiplier for `epochs` passes, then make_private.

        Args:
            target_epsilon, target_delta: the (epsilon, delta) to spend over `epochs` passes.
            epochs: passes over the data set at the loader's sampling rate (steps = epochs / q).
            module, optimizer, data_loader, max_grad_norm, **kwargs: as in make_private.

        Returns:
            As make_private.
        """
        if not target_epsilon > 0:
            raise ValueError(f"target_epsilon must be positive, got {target_epsilon}")
        if not 0 < target_delta < 1:
            raise ValueError(f"target_delta must be in (0, 1), got {target_delta}")
        sigma = get_noise_multiplier(
            target_epsilon=target_epsilon, target_delta=target_delta, sample_rate=sample_rate_of(data_loader),
            epochs=epochs, accountant=self.accountant.mechanism(),
        )
        self._calibration = {"target_epsilon": float(target_epsilon), "target_delta": float(target_delta),
                             "epochs": epochs}
        return self.make_private(module=module, optimizer=optimizer, data_loader=data_loader,
                                 noise_multiplier=sigma, max_grad_norm=max_grad_norm, **kwargs)

    # --- during training ----------------------------------------------------------------------
    def virtual_batches(self, data_loader, max_physical_batch_size: int):
        """Split each logical (Poisson) batch into physical chunks; noise is added once per logical step.

        Args:
            data_loader: the private loader make_private returned.
            max_physical_batch_size: the most rows per chunk.

        Returns:
            An iterator over the chunks; step() after each (only the last chunk of a logical batch takes the step).
        """
        if self.optimizer is None:
            raise RuntimeError("call make_private first")
        return iterate_chunks(data_loader, max_physical_batch_size, self.optimizer)

    def get_epsilon(self, delta: float) -> float:
        """The privacy spent so far, by the accountant over the steps taken.

        Args:
            delta: the target delta.

        Returns:
            epsilon.
        """
        with warnings.catch_warnings():  # PRV with a release at sample rate 1 in the history: log(1 - q), unused
            warnings.filterwarnings("ignore", message="divide by zero encountered in log", category=RuntimeWarning)
            return self.accountant.get_epsilon(delta=delta)

    def state_dict(self) -> dict:
        """Accountant, and where the noise and Poisson streams stand. PRIVATE: whoever reads the stream
        states can regenerate the noise; keep them with the checkpoint, never in logs or results.
        Secure mode keeps no stream state (a resumed run draws fresh OS seeds).

        Returns:
            {"accountant", "noise", and "sampler" unless in secure mode or without Poisson sampling}.
        """
        state = {"accountant": self.accountant.state_dict(), "noise": self.noise.state_dict() if self.noise else {}}
        if self.sampler_generator is not None and not self.secure_mode:
            state["sampler"] = self.sampler_generator.get_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Resume the accountant and the streams from `state_dict`'s output (after make_private, with the same settings).

        Args:
            state: what `state_dict` returned.
        """
        self.accountant.load_state_dict(state["accountant"])
        if self.noise is not None:
            self.noise.load_state_dict(state.get("noise", {}))
        if self.sampler_generator is not None and "sampler" in state:
            self.sampler_generator.set_state(state["sampler"])


def check_arguments(module: nn.Module, backend: str, loss_reduction: str) -> None:
    """Refuse make_private arguments that no model could make right.

    Args:
        module: the model (refused if another PrivacyEngine made it private).
        backend: must be one of `dpkernels.backends.BACKENDS`.
        loss_reduction: "mean" or "sum".
    """
    if backend not in ops.BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {ops.BACKENDS}")
    if loss_reduction not in ("mean", "sum"):
        raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
    if getattr(module, "_dpkernels_engine", None) is not None:
        raise RuntimeError("this module was already made private by another PrivacyEngine")


def data_parallel_world(distributed: bool | None) -> tuple[bool, int, int]:
    """Whether this run is data parallel, and this process's place in it.

    Args:
        distributed: make_private's argument: None means "if a group of more than one process exists".

    Returns:
        (distributed, rank, world size); (False, 0, 1) for a single process.
    """
    rank, world_size = distributed_mod.world()
    if distributed is None:
        distributed = world_size > 1
    elif distributed and world_size == 1:
        raise ValueError("distributed=True needs an initialised torch.distributed process group of more than "
                         "one process")
    if not distributed:
        rank, world_size = 0, 1
    return distributed, rank, world_size


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters, after checking each belongs to exactly one supported module.

    Args:
        module: the model.

    Returns:
        The trainable parameters, in module order.
    """
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
                supported = ", ".join(c.__name__ for c in LAYER_TYPES)
                raise ValueError(
                    f"module '{name}' ({type(m).__name__}) has trainable parameter '{pname}' but dpkernels has no "
                    f"per-sample rule for it (supported: {supported}); freeze it or replace the module")
            params.append(p)
    if not params:
        raise ValueError("the module has no trainable parameters")
    return params


def private_modules(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules the engine takes over: those with a registered rule and a trainable parameter of their own.

    Args:
        module: the model.

    Returns:
        [(name, module)].
    """
    return [(n, m) for n, m in module.named_modules()
            if rule_for(m) is not None and any(p.requires_grad for p in m.parameters(recurse=False))]


def batch_statistics_modules(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Norm layers that could read statistics of a batch of private data; refuse those doing it now.

    A BatchNorm using batch statistics mixes the examples of a batch (one example's gradient depends on
    the others, so clipping no longer bounds its influence), and any norm layer tracking running
    statistics in train mode writes raw averages of private data into buffers released with the model.

    Args:
        module: the model.

    Returns:
        The modules to guard at every forward (model.train() may be called later), as [(name, module)].
    """
    guarded = []
    for name, m in module.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.training or m.running_mean is None:
                raise ValueError(
                    f"module '{name}' ({type(m).__name__}) is in train mode (or has no running statistics): its batch "
                    "statistics mix the examples of a batch, so clipping does not bound one example's influence, and "
                    "its running statistics would be raw averages of private data released with the model. Freeze "
                    "it and call .eval() on it before make_private, or replace it with GroupNorm/LayerNorm")
            guarded.append((name, m))
        elif isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats:
            if m.training:
                raise ValueError(
                    f"module '{name}' ({type(m).__name__}) tracks running statistics in train mode: they would be raw "
                    "averages of private data released with the model. Call .eval() on it before make_private, or "
                    "build it with track_running_stats=False")
            guarded.append((name, m))
    return guarded


# DP optimizers whose pending batch a zero_grad may have to drop (weak: an engine dropped is forgotten)
_LIVE: weakref.WeakSet[DPOptimizer] = weakref.WeakSet()


def _reach_zero_grad(optimizer: DPOptimizer) -> None:
    """Make every zero_grad that reaches the private parameters drop their pending batch, as
    optimizer.zero_grad() does: plain PyTorch drops a gradient there, and a batch kept instead would be added
    into the next step. The model's own, a DistributedDataParallel or torch.compile wrapper's (dpkernels.compile
    returns one), any module holding the model, the wrapped optimizer's or another optimizer's over the same
    parameters: nn.Module.zero_grad and torch.optim.Optimizer.zero_grad are wrapped once per process (for
    objects holding no private parameter they do exactly what they did)."""
    _LIVE.add(optimizer)
    if not getattr(nn.Module.zero_grad, "_dpkernels", False):
        nn.Module.zero_grad = _dropping(nn.Module.zero_grad, _module_layers)
    if not getattr(Optimizer.zero_grad, "_dpkernels", False):
        Optimizer.zero_grad = _dropping(Optimizer.zero_grad, _optimizer_layers)


def _module_layers(module: nn.Module, opt: DPOptimizer) -> set[DPLayer]:
    inside = {id(m) for m in module.modules()}
    return {layer for layer in opt.clipper.layers if id(layer.module) in inside}


def _optimizer_layers(optimizer: Optimizer, opt: DPOptimizer) -> set[DPLayer]:
    if optimizer is opt:  # DPOptimizer.zero_grad drops its batch itself
        return set()
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return {layer for layer in opt.clipper.layers if any(id(p) in held for p in layer.params().values())}


def _dropping(plain, layers_of):
    @functools.wraps(plain)
    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in tuple(_LIVE):
            layers = layers_of(self, opt)
            if layers:
                opt.discard_batch(layers)
        plain(self, set_to_none)
    zero_grad._dpkernels = True
    return zero_grad


def _record_input_rows(recorder: Recorder):
    """The first dimensions of the model's tensor inputs, which the private layers' rows must be one of."""
    def hook(m: nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.compiler.is_compiling() or not torch.is_grad_enabled():  # compiled: the loader's size is checked
            return
        recorder.input_rows = {t.shape[0] for t in pytree.tree_leaves((args, kwargs))
                               if isinstance(t, torch.Tensor) and t.dim() > 0}
    return hook


def check_batch_first(module: nn.Module) -> None:
    """Refuse a model holding a time-first module: the layers around it see [T, B, d] inputs, whose rows the
    engine would take as examples (one example's update up to sqrt(T) C).

    Args:
        module: the model; every submodule with `batch_first=False` (torch's RNNs, MultiheadAttention,
            Transformer layers) is refused, by name.
    """
    for name, m in module.named_modules():
        if getattr(m, "batch_first", None) is False:
            raise ValueError(
                f"module '{name}' ({type(m).__name__}) has batch_first=False: it and the layers around it take "
                "[T, B, ...] inputs, and the engine clips each row of a private layer's input as one example (each "
                "time step would be clipped on its own). Build it with batch_first=True and feed [B, T, ...]")


def _refuse_batch_statistics(name: str):
    def hook(m: nn.Module, args: Any) -> None:
        if m.training:
            raise RuntimeError(
                f"module '{name}' ({type(m).__name__}) of a private model ran in train mode: it would read statistics "
                "of the private batch (see make_private). Call .eval() on it after model.train()")
    return hook


def check_optimizer(optimizer: Optimizer, params: list[nn.Parameter]) -> None:
    """Refuse an optimizer holding a trainable parameter that is not the module's (it would train without privacy).

    Args:
        optimizer: the user's optimizer.
        params: the module's trainable parameters.
    """
    ours = {id(p) for p in params}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad and id(p) not in ours:
                raise ValueError(
                    "the optimizer holds a parameter that is not a trainable parameter of the module "
                    f"(shape {tuple(p.shape)}): it would be updated without privacy")
