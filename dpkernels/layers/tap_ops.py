"""The private layers' tap as opaque custom ops, for `torch.compile`.

Eagerly, a private layer's forward goes through `base._Tap`, an autograd.Function that takes the layer object
and writes Python records as side effects: dynamo cannot put that in a graph and breaks the graph at every
private layer. While dynamo traces, `DPLayer.forward` calls these ops instead. They take tensors, a layer id
and plain values only, so dynamo and AOTAutograd see two opaque calls per layer (fake kernels give the output
shapes), the graph stays whole, and the record keeping runs at run time, in the same order as eagerly:

    dpkernels_py::tap(x, params, layer_id) -> (out, token)        forward; opens the layer's record
    dpkernels_py::tap_backward(grad_out, token, ...) -> grad_x    hands G to the record, returns dL/dx

`token` is a 0-d int64 tensor holding the record's serial number; autograd saves it for the backward, so a
backward always reaches the record of its own forward (or finds it spent, as eagerly). Both ops are marked
side-effectful so that no dead-code elimination drops them (the first layer's grad_x is unused).

A compiled graph owns the memory of its intermediate tensors: inductor may reuse a buffer once its last
consumer in the graph ran. A record keeps A until optimizer.step() and G after the backward, past the op that
saw them, so any saved tensor that is one of the op's inputs is copied (the copy is the record's own; the
in-place check `Record.versions` then can never fire, and needs not: the copy is what the forward saw).

Known problem (torch 2.13, CPU inductor): inductor's peak-memory reordering pass scheduled a kernel reading
the Upsample backward's scatter buffer before the scatter ran, on a diffusers UNet: the mid block's output
gradient was all zeros, so its layers' clipped sums were wrong (the backward graph itself is right, and so is
the record keeping: aot_eager is exact). `dpkernels.compile` turns that pass off; a private model compiled
with plain torch.compile gets a warning, once.
"""

from __future__ import annotations

import itertools
import warnings
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from dpkernels.layers.base import DPLayer, Record

_LAYERS: weakref.WeakValueDictionary[str, DPLayer] = weakref.WeakValueDictionary()
_layer_ids = itertools.count()
# serial -> (the record, what the backward needs); dropped with the record (after the step, or discard)
_ENTRIES: dict[int, tuple[weakref.ref, dict[str, Any]]] = {}
_serials = itertools.count(1)
# records opened by a tap recomputed in a compiled backward (activation checkpointing): only this holds them until
# their backward joins them to their batch
_PENDING: dict[int, tuple[Record, Any]] = {}


def register(layer: DPLayer) -> str:
    """An id the compiled graph can hold as a constant (a weak map: the layer lives with its module).

    A string, not an int: dynamo turns an int that differs between two compilations of the same code (a second
    private model of the same class, or a recompile after a trace that raised) into a SymInt ("automatic
    dynamic"), which the fake kernel could not look up ("unhashable type: non-nested SymInt"); strings stay
    constants.

    Args:
        layer: the private layer.

    Returns:
        Its id.
    """
    layer_id = f"dpkernels-layer-{next(_layer_ids)}"
    _LAYERS[layer_id] = layer
    return layer_id


def _layer(layer_id: str) -> DPLayer:
    layer = _LAYERS.get(layer_id)
    if layer is None:
        raise RuntimeError(f"dpkernels: private layer {layer_id} no longer exists (its module was deleted)")
    return layer


def _owned(v: Any, inputs: list[torch.Tensor]) -> Any:
    """v, copied if it shares memory with one of the op's inputs (which the compiled graph may reuse)."""
    if not isinstance(v, torch.Tensor):
        return v
    v = v.detach()
    ptr = v.untyped_storage().data_ptr()
    if any(t.untyped_storage().data_ptr() == ptr for t in inputs):
        return v.clone()
    return v


@torch.library.custom_op("dpkernels_py::tap", mutates_args=())
def tap_op(x: torch.Tensor, params: list[torch.Tensor], layer_id: str,
           autocast_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """dpkernels_py::tap: the layer's forward, opening its record (at run time, in graph order).

    Args:
        x: the layer's input.
        params: its parameters (as `DPLayer.compute` takes them).
        layer_id: `register`'s id of the layer.
        autocast_dtype: the autocast dtype the graph was traced under, or None.

    Returns:
        (the output, a 0-d int64 token naming the record for the backward).
    """
    layer = _layer(layer_id)
    with _autocast(x, autocast_dtype):  # a compiled graph runs its ops outside the autocast region it traced
        out, saved = layer.compute(x, tuple(params))
    saved = {k: _owned(v, [x, *params]) for k, v in saved.items()}
    rec = layer.engine_record(dict(saved), x.shape[0] if x.dim() else 0)
    rec.versions = {k: v._version for k, v in saved.items() if isinstance(v, torch.Tensor)}
    serial = next(_serials)
    # the backward's own view of the saved tensors: norm layers clear rec.saved at the first backward, and a
    # second one (retain_graph) needs them again, as eagerly (there autograd's ctx keeps them)
    _ENTRIES[serial] = (weakref.ref(rec), saved)
    weakref.finalize(rec, _ENTRIES.pop, serial, None)
    for s, (r, recorder) in list(_PENDING.items()):  # pending ones of a batch that is gone will never join
        if r.generation != recorder.generation:
            del _PENDING[s]
    if rec.pending:  # recomputed inside a compiled backward (activation checkpointing): held until it joins
        _PENDING[serial] = (rec, layer.recorder)
    return out, torch.scalar_tensor(serial, dtype=torch.int64)


@tap_op.register_fake
def _(x: torch.Tensor, params: list[torch.Tensor], layer_id: str,
      autocast_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    # the layer's own forward on fake tensors gives the output's shape, dtype and strides
    layer = _layer(layer_id)
    _warn_options(layer)
    with _autocast(x, autocast_dtype):
        out, _ = layer.compute(x, tuple(params))
    return out, torch.empty((), dtype=torch.int64)


_warned = False
_options_set: weakref.WeakSet[DPLayer] = weakref.WeakSet()  # layers compiled through dpkernels.compile


def mark_options_set(layers: Iterable[DPLayer]) -> None:
    """Layers compiled through dpkernels.compile: their fake kernel does not warn.

    Args:
        layers: the private layers of the compiled model.
    """
    _options_set.update(layers)


def _warn_options(layer: DPLayer) -> None:
    """Once, for the known problem above (here, in the fake kernel: a warning inside dynamo's trace breaks it)."""
    global _warned
    if not _warned and layer not in _options_set:
        _warned = True
        warnings.warn("dpkernels: compile a private model with dpkernels.compile(model), or pass inductor "
                      "options={'reorder_for_peak_memory': False}: with that pass on, inductor mis-ordered a "
                      "scatter and gave wrong gradients on a diffusers UNet (torch 2.13, CPU)",
                      UserWarning, stacklevel=2)


def _autocast(x: torch.Tensor, dtype: torch.dtype | None) -> torch.autocast:
    return torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None)


@torch.library.custom_op("dpkernels_py::tap_backward", mutates_args=())
def tap_backward_op(grad_out: torch.Tensor, token: torch.Tensor, layer_id: str, x_shape: list[int],
                    x_dtype: torch.dtype, need_input_grad: bool) -> torch.Tensor:
    """dpkernels_py::tap_backward: hands G to the record of the token's forward and returns the input gradient.

    Args:
        grad_out: the gradient of the layer's output.
        token: the forward's token.
        layer_id: `register`'s id of the layer.
        x_shape, x_dtype: the input's shape and dtype.
        need_input_grad: whether autograd wants dL/dx.

    Returns:
        dL/dx, or an empty tensor when it is not wanted.
    """
    layer = _layer(layer_id)
    serial = int(token.item())
    entry = _ENTRIES.get(serial)
    rec: Record | None = entry[0]() if entry is not None else None
    layer.check_backward(rec)
    _PENDING.pop(serial, None)  # joined its batch: the recorder holds it now
    saved = entry[1]
    G = grad_out.detach()
    grad_x = layer.input_grad(saved, G).to(x_dtype).contiguous() if need_input_grad else None
    layer.on_grad(rec, saved, G)
    if rec.grad_out is G:  # the record keeps G itself past this op: make it the record's own
        rec.grad_out = G.clone()
    rec.has_grad = True
    return grad_x if grad_x is not None else grad_out.new_empty((0,), dtype=x_dtype)


@tap_backward_op.register_fake
def _(grad_out: torch.Tensor, token: torch.Tensor, layer_id: str, x_shape: list[int], x_dtype: torch.dtype,
      need_input_grad: bool) -> torch.Tensor:
    return grad_out.new_empty(x_shape if need_input_grad else (0,), dtype=x_dtype)


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    x, _, layer_id, _ = inputs
    ctx.save_for_backward(output[1])
    ctx.layer_id, ctx.x_shape, ctx.x_dtype, ctx.n_params = layer_id, list(x.shape), x.dtype, len(inputs[1])


def _backward(ctx, grad_out: torch.Tensor, _grad_token: torch.Tensor | None):
    (token,) = ctx.saved_tensors
    need = bool(ctx.needs_input_grad[0])
    grad_x = tap_backward_op(grad_out, token, ctx.layer_id, ctx.x_shape, ctx.x_dtype, need)
    # no gradient for the parameters: the engine writes theirs at optimizer.step()
    return (grad_x if need else None), [None] * ctx.n_params, None, None


tap_op.register_autograd(_backward, setup_context=_setup_context)

# Side-effectful: never dropped by dead-code elimination (FX, AOTAutograd's partitioner, inductor) even when
# their outputs are unused; they are not recomputed in the backward either.
for _op in (torch.ops.dpkernels_py.tap.default, torch.ops.dpkernels_py.tap_backward.default):
    torch.fx.node.has_side_effect(_op)


def tap(layer: DPLayer, x: torch.Tensor, params: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """What `DPLayer.forward` calls while dynamo traces (the autocast state is read at trace time).

    Args:
        layer: the private layer.
        x: its input.
        params: its parameters (as `DPLayer.compute` takes them).

    Returns:
        The layer's output.
    """
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    return torch.ops.dpkernels_py.tap(x, list(params), layer.layer_id, dtype)[0]
