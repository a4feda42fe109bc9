"""Public ops and backend choice.

Every op has a plain-torch reference in `dpkernels.reference` with the same
signature. Backends (`dpkernels.backends`):
  "cpu"    C++ kernels of the compiled extension (`torch.ops.dpkernels.*` on CPU tensors)
  "cuda"   CUDA C++ kernels of the compiled extension (same ops, CUDA tensors)
  "triton" Triton kernels (`dpkernels.triton`), CUDA tensors (CPU under TRITON_INTERPRET=1)
  "torch"  the plain-torch reference
  "auto"   CPU tensors: "cpu", else "torch"; CUDA tensors: the fastest measured of
           "cuda" and "triton" for the op and shape (see `dpkernels.autobackend`),
           falling back cuda -> triton -> torch. The choice is logged once.

Each op lives in a file of the same name on every backend (`<file>` below):

    op                                    <file>
    ghost_norm, direct_norm               linear_norms
    clipped_sum                           clipped_sum
    sq_norms, clipped_rows_sum            rows
    affine_grad_sample                    affine
    embedding_norm, embedding_clipped_sum embedding
    add_noise_                            noise

The 7 places a new op touches:

    1. dpkernels/reference.py             the float64 ground truth (the signature every backend follows)
    2. csrc/ops.cpp                       its schema (TORCH_LIBRARY) and Meta kernel (shapes, for torch.compile)
    3. csrc/cpu/<file>.cpp                the C++ CPU kernel, registered with TORCH_LIBRARY_IMPL(dpkernels, CPU)
    4. csrc/cuda/<file>.cu                the CUDA kernel and its launcher (declared in csrc/cuda/launchers.cuh);
       csrc/cuda/torch_ops.cu             its torch glue, registered with TORCH_LIBRARY_IMPL(dpkernels, CUDA)
    5. dpkernels/triton/<file>.py         the Triton kernel, exported by dpkernels/triton/__init__.py
    6. dpkernels/backends.py              its name in OP_NAMES (tests/test_cuda_compile.py checks the CUDA list)
    7. dpkernels/ops.py                   its public function here (and, for "auto" timing of a first tensor alone,
                                          example arguments in dpkernels/autobackend.py)

and its tests: tests/test_ops_cpu.py, tests/test_triton_interpret.py, tests/test_gpu_kernels.py.
"""

from __future__ import annotations

import logging

import torch

from dpkernels import autobackend
from dpkernels.backends import (
    BACKENDS,
    HAS_EXTENSION,
    IMPORT_ERROR,
    OP_NAMES,
    extension_has,
    implementation,
    triton_available,
)
from dpkernels.conventions import as_3d

log = logging.getLogger("dpkernels")

__all__ = [
    "BACKENDS", "HAS_EXTENSION", "OP_NAMES", "add_noise_", "affine_grad_sample", "call", "choose_strategy",
    "clipped_rows_sum", "clipped_sum", "direct_norm", "embedding_clipped_sum", "embedding_norm", "extension_has",
    "ghost_norm", "linear_norm", "resolve", "sq_norms", "triton_available",
]

_logged: set[tuple[str, str, str]] = set()


def resolve(name: str, backend: str, x: torch.Tensor, args: tuple | None = None) -> str:
    """Map "auto" to a concrete backend for op `name` on tensors like `x`; check an explicit choice.

    Args:
        name: the op, one of OP_NAMES.
        backend: one of BACKENDS.
        x: the call's first tensor (its device decides).
        args: all of the call's arguments, when given: "auto" on CUDA times the real shapes.

    Returns:
        "cpu", "cuda", "triton" or "torch". The first choice per (op, device, backend) is logged.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    dev = x.device.type
    if backend == "auto":
        if dev == "cuda":
            chosen = autobackend.fastest(name, x, args)
        else:
            chosen = "cpu" if extension_has("cpu") else "torch"
    else:
        chosen = backend
        if chosen in ("cpu", "cuda") and not extension_has(chosen):
            raise RuntimeError(
                f"backend {chosen!r} asked for, but the dpkernels extension was built without it"
                + ("" if HAS_EXTENSION else f" (import failed: {IMPORT_ERROR})")
            )
        if chosen in ("cpu", "cuda") and dev != chosen:
            raise RuntimeError(f"backend {chosen!r} cannot run on {dev} tensors")
    key = (name, dev, chosen)
    if key not in _logged:
        _logged.add(key)
        log.info("dpkernels: %s on %s uses backend %s", name, dev, chosen)
    return chosen


def call(name: str, backend: str, *args):
    """Run op `name` on `backend`, resolving "auto" on the first tensor argument.

    Args:
        name: the op, one of OP_NAMES.
        backend: one of BACKENDS.
        *args: the op's arguments, as `dpkernels.reference.<name>` takes them.

    Returns:
        What the op returns.
    """
    x = next(a for a in args if isinstance(a, torch.Tensor))
    return implementation(name, resolve(name, backend, x, args))(*args)


def ghost_norm(A: torch.Tensor, G: torch.Tensor, with_bias: bool = True,
               backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Squared per-sample norms of a linear layer's weight (and bias) gradient by the Gram identity.

    Args:
        A: the layer's input, [B, d] or [B, T, d] (or [B, ..., d]).
        G: the gradient of its output, [B, p] or [B, T, p] (same leading dims as A).
        with_bias: also the bias norms ||sum_t G_b[t]||^2.
        backend: one of BACKENDS.

    Returns:
        (weight norms [B], bias norms [B], or an empty tensor without bias); float32 (float64 for float64 inputs).
    """
    return call("ghost_norm", backend, A, G, with_bias)


def direct_norm(A: torch.Tensor, G: torch.Tensor, with_bias: bool = True,
                backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Squared per-sample norms of a linear layer's weight (and bias) gradient from tiles of G_b^T A_b.

    Args:
        A: the layer's input, [B, d] or [B, T, d] (or [B, ..., d]).
        G: the gradient of its output, [B, p] or [B, T, p].
        with_bias: also the bias norms ||sum_t G_b[t]||^2.
        backend: one of BACKENDS.

    Returns:
        (weight norms [B], bias norms [B], or an empty tensor without bias); as `ghost_norm`.
    """
    return call("direct_norm", backend, A, G, with_bias)


def clipped_sum(A: torch.Tensor, G: torch.Tensor, c: torch.Tensor, c_bias: torch.Tensor | None = None,
                noise_std: float = 0.0, seed: int = 0, offset: int = 0,
                backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """A linear layer's clipped, noised gradient sum in one fused pass.

    Args:
        A: the layer's input, [B, (T,) d].
        G: the gradient of its output, [B, (T,) p].
        c: clip factor per sample, [B].
        c_bias: clip factor per sample for the bias, [B]; None: no bias.
        noise_std: std of the Gaussian noise added (0: none).
        seed: Philox seed of the noise.
        offset: first noise counter: the weight uses offset .. offset + p*d - 1, the bias starts at
            offset + round_up4(p*d).
        backend: one of BACKENDS.

    Returns:
        (sum_b c_b G_b^T A_b + noise [p, d], sum_b c_bias_b sum_t G_b[t] + noise [p] or an empty tensor).
    """
    return call("clipped_sum", backend, A, G, c, c_bias, float(noise_std), int(seed), int(offset))


def sq_norms(X: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Squared norm of each sample of X over all its trailing dims.

    Args:
        X: per-sample tensors, [B, ...].
        backend: one of BACKENDS.

    Returns:
        ||X_b||^2, [B].
    """
    return call("sq_norms", backend, X)


def clipped_rows_sum(X: torch.Tensor, c: torch.Tensor, noise_std: float = 0.0, seed: int = 0, offset: int = 0,
                     backend: str = "auto") -> torch.Tensor:
    """Clipped sum of per-sample gradients that are small enough to hold, plus noise.

    Args:
        X: per-sample gradients, [B, ...].
        c: clip factor per sample, [B].
        noise_std: std of the Gaussian noise (0: none).
        seed: Philox seed of the noise.
        offset: first noise counter.
        backend: one of BACKENDS.

    Returns:
        sum_b c_b X_b + noise, shape X.shape[1:].
    """
    return call("clipped_rows_sum", backend, X, c, float(noise_std), int(seed), int(offset))


def affine_grad_sample(xhat: torch.Tensor, G: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Per-sample gradient of a per-channel scale (a norm layer's weight).

    Args:
        xhat: the normalised input, [B, C, S].
        G: the gradient of the layer's output, [B, C, S].
        backend: one of BACKENDS.

    Returns:
        sum_s xhat * G, [B, C].
    """
    return call("affine_grad_sample", backend, xhat, G)


def embedding_norm(ids: torch.Tensor, G: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Squared per-sample norm of an embedding table's gradient (repeated ids summed first).

    Args:
        ids: int64 ids, [B, ...].
        G: the gradient of the looked-up rows, [B, ..., D].
        backend: one of BACKENDS.

    Returns:
        [B].
    """
    return call("embedding_norm", backend, ids, G)


def embedding_clipped_sum(ids: torch.Tensor, G: torch.Tensor, c: torch.Tensor, num_embeddings: int,
                          noise_std: float = 0.0, seed: int = 0, offset: int = 0,
                          backend: str = "auto") -> torch.Tensor:
    """An embedding table's clipped gradient sum, noise on every row of the table.

    Args:
        ids: int64 ids, [B, ...].
        G: the gradient of the looked-up rows, [B, ..., D].
        c: clip factor per sample, [B].
        num_embeddings: V, the table's rows.
        noise_std: std of the Gaussian noise (0: none).
        seed: Philox seed of the noise.
        offset: first noise counter.
        backend: one of BACKENDS.

    Returns:
        sum_b c_b g_b + noise, [V, D].
    """
    return call("embedding_clipped_sum", backend, ids, G, c, int(num_embeddings), float(noise_std), int(seed),
                int(offset))


def add_noise_(x: torch.Tensor, std: float, seed: int, offset: int, backend: str = "auto") -> torch.Tensor:
    """Add counter-based Gaussian noise to x in place.

    Args:
        x: the tensor to noise.
        std: the noise's std.
        seed: Philox seed.
        offset: counter of x's first element (row-major).
        backend: one of BACKENDS.

    Returns:
        x.
    """
    return call("add_noise_", backend, x, float(std), int(seed), int(offset))


def choose_strategy(T: int, d: int, p: int) -> str:
    """Cost model for a linear layer's weight norm: ghost costs ~T^2 (d + p) per sample, direct ~T d p.

    Args:
        T: tokens per sample; d: input features; p: output features.

    Returns:
        "ghost" when T (d + p) < d p, else "direct".
    """
    return "ghost" if T * (d + p) < d * p else "direct"


def linear_norm(A: torch.Tensor, G: torch.Tensor, with_bias: bool = True, strategy: str = "auto",
                backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Squared per-sample weight (and bias) gradient norms of a linear layer, by the strategy asked for.

    Args:
        A, G, with_bias, backend: as `ghost_norm`.
        strategy: "ghost", "direct", or "auto" (`choose_strategy` on the shapes).

    Returns:
        (weight norms [B], bias norms [B] or an empty tensor).
    """
    if strategy == "auto":
        strategy = choose_strategy(as_3d(A).shape[1], A.shape[-1], G.shape[-1])
    if strategy == "ghost":
        return ghost_norm(A, G, with_bias, backend)
    if strategy == "direct":
        return direct_norm(A, G, with_bias, backend)
    raise ValueError(f"unknown strategy {strategy!r}; choose auto, ghost or direct")
