"""A trainable layer routed through the engine.

The module's forward goes through `_Tap`, an autograd.Function whose backward
returns the input gradient only and hands the output gradient G to the layer's
record: autograd never runs the weight-gradient GEMMs. After the backward pass
the engine asks each layer for its per-sample squared norms and then for its
clipped, noised gradient sums, computed from the saved (A, G).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from dpkernels.grouping import Grouping
    from dpkernels.noise import NoiseSource


@dataclass
class Record:
    """What one call of a layer left for the engine: saved inputs, then G."""

    saved: dict[str, Any]
    rows: int
    grad_out: torch.Tensor | None = None
    has_grad: bool = False  # the backward pass reached this call
    extra: dict[str, Any] = field(default_factory=dict)


class _Tap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layer: DPLayer, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        out, saved = layer.compute(x, params)
        ctx.layer = layer
        ctx.record = layer.engine_record(saved, x.shape[0] if x.dim() else 0)
        ctx.n_params = len(params)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        rec = ctx.record
        rec.grad_out, rec.has_grad = grad_out, True
        grad_x = ctx.layer.input_grad(rec, grad_out) if ctx.needs_input_grad[1] else None
        ctx.layer.on_grad(rec)
        return (None, grad_x) + (None,) * ctx.n_params


class DPLayer:
    """Base of the per-layer rules (one subclass per module type, in this folder)."""

    module_type: type[nn.Module] = nn.Module
    param_names: tuple[str, ...] = ()

    def __init__(self, name: str, module: nn.Module, recorder):
        self.name = name
        self.module = module
        self.recorder = recorder
        self.trainable = [n for n in self.param_names if getattr(module, n, None) is not None
                          and getattr(module, n).requires_grad]
        self.record: Record | None = None
        self.backend = "auto"  # set by the engine's Clipper
        self.check_module()

    # --- hooked forward ----------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs:
            raise TypeError(f"{self.name}: dpkernels expects {type(self.module).__name__}(input) only")
        params = tuple(getattr(self.module, n) for n in self.param_names if getattr(self.module, n, None) is not None)
        if not torch.is_grad_enabled() or not any(p.requires_grad for p in params):
            return self.compute(x, params)[0]
        return _Tap.apply(self, x, *params)

    def engine_record(self, saved: dict[str, Any], rows: int) -> Record:
        return self.recorder.new_record(self, saved, rows)

    def params(self) -> dict[str, nn.Parameter]:
        return {n: getattr(self.module, n) for n in self.trainable}

    # --- what each layer type defines ----------------------------------------------------
    def check_module(self) -> None:
        """Raise ValueError for configurations this rule does not cover."""

    def compute(self, x: torch.Tensor, params: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, dict[str, Any]]:
        """The module's forward; returns the output and what the norms need later."""
        raise NotImplementedError

    def input_grad(self, rec: Record, grad_out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def on_grad(self, rec: Record) -> None:
        """Called once G is in (after the input gradient): layers with small per-sample gradients
        reduce to them here and drop (A, G) early."""

    def sq_norms(self, rec: Record, grouping: Grouping, backend: str) -> dict[str, torch.Tensor]:
        """Squared per-example norm of each trainable parameter's gradient (unscaled), [n] each."""
        raise NotImplementedError

    def clipped_sums(
        self, rec: Record, grouping: Grouping, c: dict[str, torch.Tensor], noise_std: float,
        noise: NoiseSource, backend: str,
    ) -> dict[str, torch.Tensor]:
        """sum_b c_b g_b + N(0, noise_std^2) for each trainable parameter, in its shape."""
        raise NotImplementedError

    def noise_numel(self) -> int:
        """Counters one noised sum of this layer consumes."""
        from dpkernels.reference import round_up4

        return sum(round_up4(getattr(self.module, n).numel()) for n in self.trainable)
