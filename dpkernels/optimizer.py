"""DPOptimizer: wraps the user's optimizer; step() writes the private gradients, then steps.

The training loop stays `loss.backward(); optimizer.step()`. Gradients of the
trainable layers are never computed by autograd: step() (or the next forward, when
gradients are accumulated over several physical batches) turns the recorded (A, G)
into clipped sums, and the last physical batch of a logical step adds the noise in
the same fused pass.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.optim import Optimizer

from dpkernels import ops
from dpkernels.bookkeeping import Batch, Clipper, Recorder
from dpkernels.conventions import acc_dtype
from dpkernels.distributed import all_reduce_sum
from dpkernels.layers.base import DPLayer
from dpkernels.noise import NoiseSource


class DPOptimizer(Optimizer):
    """The user's optimizer, stepping on private gradients: step() writes them (clipped sums, noise, / E), then steps.

    Built by `PrivacyEngine.make_private`; the optimizer state (param_groups, state, defaults, state_dict) is the
    wrapped optimizer's.

    Args:
        optimizer: the wrapped optimizer.
        params: the private parameters (the model's trainable ones).
        recorder: collects each physical batch's records.
        clipper: turns them into clipped, noised sums.
        noise: the noise counters.
        noise_multiplier: sigma.
        expected_batch_size: E = q N (the mean loss's gradient is divided by it).
        backend: the ops' backend.
        names: id(parameter) -> its name in the module, for error messages.
        rank, world_size: this process's place in a data-parallel run.
    """
    def __init__(self, optimizer: Optimizer, params: list[nn.Parameter], recorder: Recorder, clipper: Clipper,
                 noise: NoiseSource, noise_multiplier: float, expected_batch_size: int, backend: str = "auto",
                 names: dict[int, str] | None = None, rank: int = 0, world_size: int = 1):
        # Deliberately no super().__init__: param_groups/state/defaults are the wrapped optimizer's.
        if expected_batch_size <= 0:
            raise ValueError(f"expected batch size must be positive, got {expected_batch_size}")
        if noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        self.original_optimizer = optimizer
        self.params = params
        self.recorder = recorder
        self.clipper = clipper
        self.noise = noise
        self.noise_multiplier = float(noise_multiplier)
        self.expected_batch_size = int(expected_batch_size)
        self.backend = backend
        self.names = names or {}  # id(parameter) -> its name in the module, for error messages
        self.rank, self.world_size = rank, world_size  # data parallel: noise on rank 0, then one all-reduce
        self.bytes_all_reduced = 0  # this rank's all-reduce payload so far (distributed runs)
        # the private gradient is divided by E for a mean-reduced loss, as Opacus does (not for a sum)
        self.normaliser = self.expected_batch_size if clipper.loss_reduction == "mean" else 1
        self.step_hooks: list[Callable[[DPOptimizer], None]] = []
        self._skip_next = False
        self._last_step_skipped = False
        self._acc: dict[nn.Parameter, torch.Tensor] = {}
        self.poisson = False  # set by make_private: batches must come from its Poisson loader
        self._warned_loader = False

    # --- the wrapped optimizer's state ------------------------------------------------------
    @property
    def param_groups(self):
        """The wrapped optimizer's param_groups."""
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.original_optimizer.param_groups = value

    @property
    def state(self):
        """The wrapped optimizer's state."""
        return self.original_optimizer.state

    @state.setter
    def state(self, value):
        self.original_optimizer.state = value

    @property
    def defaults(self):
        """The wrapped optimizer's defaults."""
        return self.original_optimizer.defaults

    @defaults.setter
    def defaults(self, value):
        self.original_optimizer.defaults = value

    def state_dict(self):
        """The wrapped optimizer's state_dict (the engine's own state is `PrivacyEngine.state_dict`).

        Returns:
            Its state dict.
        """
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        """Load the wrapped optimizer's state.

        Args:
            state_dict: what `state_dict` returned.
        """
        self.original_optimizer.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"DPOptimizer({self.original_optimizer!r})"

    @property
    def max_grad_norm(self) -> float:
        """The sensitivity of the summed gradient (the L2 norm of the per-layer thresholds)."""
        return self.clipper.total_norm

    # --- what the training loop calls -------------------------------------------------------
    def set_example_ids(self, ids: torch.Tensor | None) -> None:
        """Rows with equal ids form one example (clipped together). Call between forward and step.

        Ids group the rows of ONE physical batch: every row of an example must be in the same physical batch.
        Rows split over two chunks of a virtual batch are clipped as two examples (each to C, the example's
        update to 2 C) whatever their ids; the engine cannot tell them from ids reused chunk by chunk (dpldm
        numbers each chunk's examples from 0). engine.virtual_batches never splits an example's rows.

        Args:
            ids: one integer id per row of the batch, or None (every row is an example).
        """
        self.recorder.example_ids = ids

    def signal_skip_step(self, do_skip: bool = True) -> None:
        """The next step() only accumulates (the logical batch is not complete yet).

        Args:
            do_skip: whether it does.
        """
        self._skip_next = do_skip

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop everything of the current logical step, as Opacus does: the (A, G) of a batch that ran
        backward without a step, and the clipped sums accumulated so far, unless the last step() only
        accumulated (a physical chunk of a virtual batch).

        Args:
            set_to_none: as torch.optim.Optimizer.zero_grad.
        """
        self.discard_batch()
        self.original_optimizer.zero_grad(set_to_none)

    def discard_batch(self, layers: set[DPLayer] | None = None) -> None:
        """What zero_grad drops besides p.grad: the pending (A, G) of `layers`, and what was accumulated for their
        parameters unless the last step() only accumulated (a virtual batch's chunk). Called by this optimizer's
        zero_grad and by any zero_grad that reaches the parameters (dpkernels.engine).

        Args:
            layers: the private layers concerned (None: every one).
        """
        if layers is None or layers >= set(self.clipper.layers):
            self.recorder.discard()
            if not self._last_step_skipped:
                self._acc.clear()
            return
        self.recorder.discard_layers(layers)
        if not self._last_step_skipped:
            for layer in layers:
                for p in layer.params().values():
                    self._acc.pop(p, None)

    def add_param_group(self, param_group: dict) -> None:
        """Refused: the new parameters would train on their plain, non-private gradients.

        Args:
            param_group: ignored.
        """
        raise RuntimeError(
            "add_param_group after make_private is refused: the new parameters would be updated with their plain, "
            "non-private gradients. Put every trainable parameter in the optimizer before make_private (frozen "
            "ones may be unfrozen only by making the model private again with a new PrivacyEngine)")

    def step(self, closure=None):
        """Write the private gradients (noise on the last physical batch of a logical step), then step the wrapped
        optimizer; a step signalled as skipped only accumulates the clipped sums.

        Args:
            closure: as torch.optim.Optimizer.step: re-evaluates the model (its backward's batch is the one stepped on).

        Returns:
            The wrapped optimizer's step result, or None for an accumulating step.
        """
        if closure is not None:
            with torch.enable_grad():
                closure()
        self.check_parameters()
        if self._skip_next:
            self._skip_next = False
            self._last_step_skipped = True
            self._accumulate()
            return None
        self._last_step_skipped = False
        self.write_private_grads()
        for hook in self.step_hooks:
            hook(self)
        return self.original_optimizer.step()

    def check_parameters(self) -> None:
        """Refuse a step that would update a parameter with a gradient the engine did not write."""
        ours = {id(p) for p in self.params}
        for group in self.param_groups:
            for p in group["params"]:
                name = self.names.get(id(p), f"of shape {tuple(p.shape)} (not a parameter of the private module)")
                if id(p) in ours:
                    if not p.requires_grad:
                        raise RuntimeError(
                            f"parameter {name} was frozen after make_private; the engine would still write its noisy "
                            "gradient. Make the model private again with a new PrivacyEngine to change what trains")
                elif p.requires_grad:
                    raise RuntimeError(
                        f"parameter {name} is trainable but was not registered by make_private (unfrozen or added to "
                        "the optimizer afterwards): it would be updated with its plain, non-private gradient. Freeze "
                        "it, or make the model private again with a new PrivacyEngine. Nothing was changed")
                elif p.grad is not None:
                    raise RuntimeError(
                        f"parameter {name} has a gradient that the engine did not write: the optimizer would apply "
                        "it without privacy. Set its .grad to None. Nothing was changed")

    # --- the private gradient ---------------------------------------------------------------
    def _check_loader(self, batch: Batch) -> None:
        """Warn (once) when the accountant assumes Poisson sampling but a batch did not come from the loader that
        make_private returned (a loop over the user's own loader): its epsilon would not hold."""
        if self.poisson and batch.records and batch.batch_examples is None and not self._warned_loader:
            self._warned_loader = True
            warnings.warn("dpkernels: a step's batch did not come from the private data loader that make_private "
                          "returned, while the accountant assumes its Poisson sampling: the reported epsilon does "
                          "not hold for batches drawn another way. Iterate the returned loader (or "
                          "engine.virtual_batches over it)", stacklevel=3)

    @torch.no_grad()
    def _accumulate(self) -> None:
        """Clipped sums of the finished physical batch into the accumulator (no noise yet)."""
        batch = self.recorder.take()
        self._check_loader(batch)
        try:
            sums = self.clipper.sums(batch, 1.0 / self.normaliser, 0.0, None)
        except Exception:
            self._acc.clear()
            raise
        for p, g in sums.items():
            self._acc[p] = self._acc[p] + g if p in self._acc else g

    @torch.no_grad()  # the private gradient carries no graph, and keeps no activation alive
    def write_private_grads(self) -> None:
        """p.grad = (sum_b c_b g_b + N(0, sigma^2 C^2)) / E for every private parameter (no / E for a sum loss).

        Distributed: each rank's sum over its examples; rank 0 alone adds the noise; the all-reduce sums them."""
        self.noise.new_step()
        std = self.noise_multiplier * self.clipper.total_norm / self.normaliser if self.rank == 0 else 0.0
        noise = self.noise if self.rank == 0 else None
        batch = self.recorder.take()
        self._check_loader(batch)
        try:
            sums = self.clipper.sums(batch, 1.0 / self.normaliser, std, noise)
        except Exception:
            self._acc.clear()
            raise
        grads = {}
        for p in self.params:
            if p in sums:
                g = sums[p] + self._acc[p] if p in self._acc else sums[p]
            else:  # its layer did not run in the last physical batch: noise on what was accumulated
                g = self._acc.get(p)
                g = torch.zeros(p.shape, dtype=acc_dtype(p), device=p.device) if g is None else g.clone()
                if noise is not None:
                    seed, offset = self.noise.take(p.numel())
                    ops.add_noise_(g, std, seed, offset, backend=self.backend)
            grads[p] = g
        self._acc.clear()
        if self.world_size > 1:
            self.bytes_all_reduced += all_reduce_sum([grads[p] for p in self.params])
        for p, g in grads.items():
            p.grad = g.reshape(p.shape).to(p.dtype)
