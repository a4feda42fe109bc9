"""A trainable layer routed through the engine.

The module's forward goes through `_Tap`, an autograd.Function whose backward
returns the input gradient only and hands the output gradient G to the layer's
record: autograd never runs the weight-gradient GEMMs. After the backward pass
the engine asks each layer for its per-sample squared norms and then for its
clipped, noised gradient sums, computed from the saved (A, G).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dpkernels.layers import tap_ops

if TYPE_CHECKING:
    from dpkernels.grouping import Grouping
    from dpkernels.noise import NoiseSource


# module type -> the DPLayer subclass that handles it, filled by @register_layer beside each layer's math
LAYER_TYPES: dict[type[nn.Module], type[DPLayer]] = {}


def register_layer(*module_types: type[nn.Module]) -> Callable[[type[DPLayer]], type[DPLayer]]:
    """Class decorator: the decorated DPLayer subclass handles these module types (as Opacus' register_grad_sampler).

    A later registration for the same type replaces the earlier one.

    Args:
        *module_types: the nn.Module classes (a subclass is handled too if it keeps their forward: `rule_for`).

    Returns:
        The decorator; it returns the class unchanged.
    """
    def register(layer_cls: type[DPLayer]) -> type[DPLayer]:
        for module_type in module_types:
            LAYER_TYPES[module_type] = layer_cls
        return layer_cls
    return register


def rule_for(module: nn.Module) -> type[DPLayer] | None:
    """The registered DPLayer class for a module.

    Args:
        module: any module.

    Returns:
        The class registered for the nearest registered class in its MRO, if the module keeps that class's forward
        (a subclass with its own forward computes something else); else None.
    """
    for cls in type(module).__mro__:
        if cls in LAYER_TYPES:
            return LAYER_TYPES[cls] if type(module).forward is cls.forward else None
    return None


@dataclass
class Record:
    """What one call of a layer left for the engine: saved inputs (detached), then G."""

    saved: dict[str, Any]
    rows: int
    grad_out: torch.Tensor | None = None
    has_grad: bool = False  # the backward pass reached this call
    spent: bool = False  # its clipped sum was taken: a later backward through this call has nowhere to go
    pending: bool = False  # opened by a forward inside a backward pass (a recomputation): joins at its backward
    generation: int = 0  # the recorder's batch it was opened in
    replaced: bool = False  # a recomputation's record took its place (see Recorder.join)
    extra: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)  # version counters of `saved` at forward

    def check_unmodified(self, layer_name: str) -> None:
        """Raise as autograd does if a saved input was modified in place after the forward pass.

        Args:
            layer_name: the layer's name, for the message.
        """
        for key, version in self.versions.items():
            t = self.saved.get(key)
            if isinstance(t, torch.Tensor) and t._version != version:
                raise RuntimeError(
                    f"one of the variables needed for gradient computation has been modified by an inplace "
                    f"operation: the input of module '{layer_name}' is at version {t._version}, expected version "
                    f"{version}. Its per-sample gradient would be wrong: do not modify a layer's input in place "
                    "before optimizer.step()")


class _Tap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layer: DPLayer, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        out, saved = layer.compute(x, params)
        keys = [k for k, v in saved.items() if isinstance(v, torch.Tensor)]
        # through autograd too: freed after backward unless retain_graph, checked for in-place changes
        ctx.save_for_backward(*(saved[k] for k in keys))
        ctx.keys, ctx.plain = keys, {k: v for k, v in saved.items() if k not in keys}
        detached = {k: (v.detach() if k in keys else v) for k, v in saved.items()}
        ctx.layer = layer
        ctx.record = layer.engine_record(detached, x.shape[0] if x.dim() else 0)
        ctx.record.versions = {k: saved[k]._version for k in keys}
        ctx.n_params = len(params)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        saved = dict(zip(ctx.keys, ctx.saved_tensors), **ctx.plain)
        rec, layer = ctx.record, ctx.layer
        layer.check_backward(rec)
        grad_out = grad_out.detach()
        grad_x = layer.input_grad(saved, grad_out) if ctx.needs_input_grad[1] else None
        layer.on_grad(rec, saved, grad_out)
        rec.has_grad = True
        return (None, grad_x) + (None,) * ctx.n_params


class DPLayer:
    """Base of the per-layer rules: one subclass per module type, in this folder, registered with `register_layer`.

    Args:
        name: the module's name in the model (for messages).
        module: the module whose forward this layer replaces.
        recorder: the engine's `Recorder`, which collects the records of a batch.
    """

    param_names: tuple[str, ...] = ()

    def __init__(self, name: str, module: nn.Module, recorder):
        self.name = name
        self.module = module
        self.recorder = recorder
        self.trainable = [n for n in self.param_names if getattr(module, n, None) is not None
                          and getattr(module, n).requires_grad]
        self.record: Record | None = None
        self.backend = "auto"  # set by the engine's Clipper
        self.layer_id = tap_ops.register(self)  # what a compiled graph names this layer by
        self.check_module()

    # --- hooked forward ----------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """What the module's forward becomes: the layer's math, routed through the engine when a parameter trains.

        Args:
            x: the module's input (the only argument a private layer takes).

        Returns:
            The module's output.
        """
        if args or kwargs:
            raise TypeError(f"{self.name}: dpkernels expects {type(self.module).__name__}(input) only")
        params = tuple(getattr(self.module, n) for n in self.param_names if getattr(self.module, n, None) is not None)
        if not torch.is_grad_enabled() or not any(p.requires_grad for p in params):
            return self.compute(x, params)[0]
        if torch.compiler.is_compiling():  # dynamo cannot trace _Tap (Python side effects): opaque ops instead
            return tap_ops.tap(self, x, params)
        return _Tap.apply(self, x, *params)

    def engine_record(self, saved: dict[str, Any], rows: int) -> Record:
        """Open this call's record with the engine's recorder.

        Args:
            saved: what `compute` saved for the norms (detached tensors and plain values).
            rows: the input's first dimension (the batch rows).

        Returns:
            The new record.
        """
        return self.recorder.new_record(self, saved, rows)

    def check_backward(self, rec: Record | None) -> None:
        """Before an output gradient reaches `rec`: refuse a spent record, let a recomputed one join its batch.

        Args:
            rec: the record of the forward this backward goes through (None: already dropped).
        """
        if rec is not None and rec.replaced:
            self.recorder.discard()
            raise RuntimeError(
                f"module '{self.name}' got an output gradient through a forward whose record a recomputed forward "
                "(activation checkpointing) had replaced: it was called twice, once inside a checkpointed segment. "
                "Refused, and the batch was dropped: call each trainable module once per forward")
        if rec is None or rec.spent:  # a spent record may already be gone (compiled): optimizer.step() dropped it
            raise RuntimeError(
                f"backward through module '{self.name}' after optimizer.step() already used this forward pass: "
                "its gradient would be lost. Run a new forward pass for each step")
        if rec.pending:
            self.recorder.join(self, rec)

    def params(self) -> dict[str, nn.Parameter]:
        """The trainable parameters by name (what this layer writes a private gradient for).

        Returns:
            {parameter name in the module: parameter}.
        """
        return {n: getattr(self.module, n) for n in self.trainable}

    # --- what each layer type defines ----------------------------------------------------
    def check_module(self) -> None:
        """Raise ValueError for configurations this rule does not cover."""

    def compute(self, x: torch.Tensor, params: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, dict[str, Any]]:
        """The module's forward.

        Args:
            x: the input.
            params: the module's parameters that are not None, in `param_names` order.

        Returns:
            (the output, what the norms and the input gradient need later, by name).
        """
        raise NotImplementedError

    def input_grad(self, saved: dict[str, Any], grad_out: torch.Tensor) -> torch.Tensor:
        """The gradient of the loss with respect to the layer's input (the parameters' gradients are the engine's).

        Args:
            saved: what `compute` saved.
            grad_out: the gradient of the layer's output, G.

        Returns:
            dL/dx, shaped like the input.
        """
        raise NotImplementedError

    def on_grad(self, rec: Record, saved: dict[str, Any], grad_out: torch.Tensor) -> None:
        """Called with each output gradient (after the input gradient): keep G on the record.

        Two backward passes through one forward add their G: the per-sample gradient is of the sum. Layers with
        small per-sample gradients override this to reduce to them here and drop (A, G) early.

        Args:
            rec: this call's record.
            saved: what `compute` saved.
            grad_out: the gradient of the layer's output, G.
        """
        rec.grad_out = grad_out if rec.grad_out is None else rec.grad_out + grad_out

    def sq_norms(self, rec: Record, grouping: Grouping, backend: str) -> dict[str, torch.Tensor]:
        """Squared per-example norm of each trainable parameter's gradient (unscaled).

        Args:
            rec: the call's record, with G.
            grouping: which rows form one example.
            backend: the ops' backend.

        Returns:
            {parameter name: [n examples]}.
        """
        raise NotImplementedError

    def drop_examples(self, rec: Record, grouping: Grouping, drop: torch.Tensor) -> None:
        """Zero what examples `drop` left on `rec` (output gradient, saved floating inputs, per-example gradients):
        their clipped sum is then 0, never 0 * inf. Out of place: the saved inputs are the model's.

        Args:
            rec: the layer's record of this physical batch.
            grouping: rows -> examples.
            drop: [n] bool, the examples to zero.
        """
        rows = drop if grouping.inverse is None else drop.to(grouping.inverse.device)[grouping.inverse]

        def zero(t: Any, mask: torch.Tensor) -> Any:
            if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() and t.shape[0] == len(mask)):
                return t
            return t.masked_fill(mask.to(t.device).view(-1, *([1] * (t.dim() - 1))), 0.0)

        rec.grad_out = zero(rec.grad_out, rows)
        for k, v in list(rec.saved.items()):  # the same dict: a compiled backward may hold it
            rec.saved[k] = zero(v, rows)
        samples = rec.extra.get("grad_samples", {})
        for k, v in list(samples.items()):  # per example, [n, ...]
            if v.shape[0] != len(drop):
                raise RuntimeError(f"module '{self.name}': per-example gradients of {v.shape[0]} rows, {len(drop)} "
                                   "examples")
            samples[k] = zero(v, drop)

    def clipped_sums(
        self, rec: Record, grouping: Grouping, c: dict[str, torch.Tensor], noise_std: float,
        noise: NoiseSource, backend: str,
    ) -> dict[str, torch.Tensor]:
        """sum_b c_b g_b + N(0, noise_std^2) for each trainable parameter, in its shape.

        Args:
            rec: the call's record, with G.
            grouping: which rows form one example.
            c: clip factor per example, [n], for each trainable parameter.
            noise_std: std of the noise (0: none).
            noise: where the noise counters come from (one `take` per noised tensor).
            backend: the ops' backend.

        Returns:
            {parameter name: its noisy clipped sum, in the parameter's shape}.
        """
        raise NotImplementedError
