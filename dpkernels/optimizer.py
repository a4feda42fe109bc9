"""DPOptimizer: wraps the user's optimizer; step() writes the private gradients, then steps.

The training loop stays `loss.backward(); optimizer.step()`. Gradients of the
trainable layers are never computed by autograd: step() (or the next forward, when
gradients are accumulated over several physical batches) turns the recorded (A, G)
into clipped sums, and the last physical batch of a logical step adds the noise in
the same fused pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.optim import Optimizer

from dpkernels import ops
from dpkernels.bookkeeping import Clipper, Recorder
from dpkernels.noise import NoiseSource


class DPOptimizer(Optimizer):
    def __init__(self, optimizer: Optimizer, params: list[nn.Parameter], recorder: Recorder, clipper: Clipper,
                 noise: NoiseSource, noise_multiplier: float, expected_batch_size: int, backend: str = "auto"):
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
        self.step_hooks: list[Callable[[DPOptimizer], None]] = []
        self._skip_next = False
        self._acc: dict[nn.Parameter, torch.Tensor] = {}
        recorder.on_new_batch = self._accumulate

    # --- the wrapped optimizer's state ------------------------------------------------------
    @property
    def param_groups(self):
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.original_optimizer.param_groups = value

    @property
    def state(self):
        return self.original_optimizer.state

    @state.setter
    def state(self, value):
        self.original_optimizer.state = value

    @property
    def defaults(self):
        return self.original_optimizer.defaults

    @defaults.setter
    def defaults(self, value):
        self.original_optimizer.defaults = value

    def state_dict(self):
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.original_optimizer.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"DPOptimizer({self.original_optimizer!r})"

    @property
    def max_grad_norm(self) -> float:
        """The sensitivity of the summed gradient (the L2 norm of the per-layer thresholds)."""
        return self.clipper.total_norm

    # --- what the training loop calls -------------------------------------------------------
    def set_example_ids(self, ids: torch.Tensor | None) -> None:
        """Rows with equal ids form one example (clipped together). Call between forward and step."""
        self.recorder.example_ids = ids

    def signal_skip_step(self, do_skip: bool = True) -> None:
        """The next step() only accumulates (the logical batch is not complete yet)."""
        self._skip_next = do_skip

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.original_optimizer.zero_grad(set_to_none)

    def step(self, closure=None):
        if closure is not None:
            with torch.enable_grad():
                closure()
        if self._skip_next:
            self._skip_next = False
            self._accumulate()
            return None
        self.write_private_grads()
        for hook in self.step_hooks:
            hook(self)
        return self.original_optimizer.step()

    # --- the private gradient ---------------------------------------------------------------
    def _accumulate(self) -> None:
        """Clipped sums of the finished physical batch into the accumulator (no noise yet)."""
        records, rows, ids = self.recorder.take()
        try:
            sums = self.clipper.sums(records, rows, ids, 1.0 / self.expected_batch_size, 0.0, None)
        except Exception:
            self._acc.clear()
            raise
        for p, g in sums.items():
            self._acc[p] = self._acc[p] + g if p in self._acc else g

    def write_private_grads(self) -> None:
        """p.grad = (sum_b c_b g_b + N(0, sigma^2 C^2)) / E for every private parameter."""
        self.noise.new_step()
        std = self.noise_multiplier * self.clipper.total_norm / self.expected_batch_size
        records, rows, ids = self.recorder.take()
        try:
            sums = self.clipper.sums(records, rows, ids, 1.0 / self.expected_batch_size, std, self.noise)
        except Exception:
            self._acc.clear()
            raise
        grads = {}
        for p in self.params:
            if p in sums:
                g = sums[p] + self._acc[p] if p in self._acc else sums[p]
            else:  # its layer did not run in the last physical batch: noise on what was accumulated
                g = self._acc.get(p)
                g = torch.zeros(p.shape, dtype=_acc_dtype(p), device=p.device) if g is None else g.clone()
                seed, offset = self.noise.take(p.numel())
                ops.add_noise_(g, std, seed, offset, backend=self.backend)
            grads[p] = g
        self._acc.clear()
        for p, g in grads.items():
            p.grad = g.reshape(p.shape).to(p.dtype)


def _acc_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32
