"""backend="auto" on CUDA tensors: time the available GPU backends once per (op, shape without the
batch dim, dtype) and cache the fastest. Poisson batches change B every step, so B is not in the key.

Candidates, in fallback order: "cuda" (the extension's CUDA kernels, if built), "triton" (if
importable and the dtype is supported), then "torch" (the reference, always works).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from dpkernels import backends

log = logging.getLogger("dpkernels")

_cache: dict[tuple, str] = {}
REPEATS = 5


def _key(op_name: str, args: tuple) -> tuple:
    """Batch-free key: trailing shapes and dtypes of tensors, bools and None; other scalars (seeds,
    offsets, noise std) vary per step and are left out."""
    parts: list[Any] = [op_name]
    for a in args:
        if isinstance(a, torch.Tensor):
            parts.append((tuple(a.shape[1:]), a.dtype, a.device))
        elif a is None or isinstance(a, bool):
            parts.append(a)
    return tuple(parts)


def _example_args(op_name: str, x: torch.Tensor) -> tuple | None:
    """Arguments like the caller's when only the first tensor is known (p is taken equal to d)."""
    if not x.is_floating_point():
        return None  # embedding ids: the gradient's shape is unknown
    B = x.shape[0]
    ones = torch.ones(B, device=x.device, dtype=torch.float32)
    return {
        "ghost_norm": (x, x, True),
        "direct_norm": (x, x, True),
        "clipped_sum": (x, x, ones, ones, 1.0, 0, 0),
        "sq_norms": (x,),
        "clipped_rows_sum": (x, ones, 1.0, 0, 0),
        "affine_grad_sample": (x, x),
        "add_noise_": (x, 1.0, 0, 0),
    }.get(op_name)


def _candidates(dtype: torch.dtype) -> list[str]:
    out = ["cuda"] if backends.extension_has("cuda") else []
    if backends.triton_available():
        from dpkernels import triton as dtriton

        if dtriton.supports(dtype):
            out.append("triton")
    return out


def _time(fn, args: tuple, op_name: str) -> float:
    if op_name == "add_noise_":  # never touch the caller's tensor
        args = (args[0].clone(),) + tuple(args[1:])
    fn(*args)  # compile / autotune outside the timing
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(REPEATS):
        fn(*args)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / REPEATS


def fastest(op_name: str, x: torch.Tensor, args: tuple | None = None) -> str:
    """The fastest working backend for an op on CUDA tensors, timed once per batch-free key and cached.

    Args:
        op_name: one of `dpkernels.backends.OP_NAMES`.
        x: the call's first tensor.
        args: all of the call's arguments, if known (else example arguments like x are timed).

    Returns:
        "cuda", "triton" or "torch" (the reference, when no GPU backend works or none is built).
    """
    key = _key(op_name, args) if args is not None else (op_name, tuple(x.shape[1:]), x.dtype, x.device)
    if key in _cache:  # the per-call cost: no allocation, no sync
        return _cache[key]
    args = args if args is not None else _example_args(op_name, x)
    floats = [a.dtype for a in (args or (x,)) if isinstance(a, torch.Tensor) and a.is_floating_point()]
    candidates = _candidates(floats[0] if floats else torch.float32)  # embedding ops: ids first, then G
    chosen, times = None, {}
    if args is None or len(candidates) < 2:
        chosen = candidates[0] if candidates else "torch"
    else:
        for name in candidates:
            try:
                times[name] = _time(backends.implementation(op_name, name), args, op_name)
            except Exception as e:  # noqa: BLE001  (any failure: that backend is not chosen; say why)
                log.warning("dpkernels: backend %s failed on %s while timing: %s", name, op_name, e)
        chosen = min(times, key=times.get) if times else "torch"
    _cache[key] = chosen
    log.info("dpkernels: auto backend for %s %s: %s (timed: %s)", op_name, key[1:], chosen, times or "no")
    return chosen
