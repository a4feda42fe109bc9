"""Public ops and backend choice.

Every op has a plain-torch reference in `dpkernels.reference` with the same
signature. Backends:
  "cpu"    C++ kernels of the compiled extension (`torch.ops.dpkernels.*` on CPU tensors)
  "cuda"   CUDA C++ kernels of the compiled extension (same ops, CUDA tensors)
  "triton" Triton kernels (`dpkernels.triton`), CUDA tensors (CPU under TRITON_INTERPRET=1)
  "torch"  the plain-torch reference
  "auto"   CPU tensors: "cpu", else "torch"; CUDA tensors: the fastest measured of
           "cuda" and "triton" for the op and shape (see `dpkernels.autobackend`),
           falling back cuda -> triton -> torch. The choice is logged once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from dpkernels import reference

log = logging.getLogger("dpkernels")

BACKENDS = ("auto", "cpu", "cuda", "triton", "torch")
OP_NAMES = (
    "ghost_norm",
    "direct_norm",
    "clipped_sum",
    "sq_norms",
    "clipped_rows_sum",
    "affine_grad_sample",
    "embedding_norm",
    "embedding_clipped_sum",
    "add_noise_",
)

try:
    from dpkernels import _C  # noqa: F401  (registers torch.ops.dpkernels.*)

    HAS_EXTENSION = True
except ImportError as e:  # pragma: no cover - only without a build
    HAS_EXTENSION = False
    _IMPORT_ERROR = e

_logged: set[tuple[str, str, str]] = set()


def extension_has(device_type: str) -> bool:
    """True if the compiled extension has kernels for this device type."""
    if not HAS_EXTENSION:
        return False
    return bool(torch.ops.dpkernels.has_backend(device_type))


def triton_available() -> bool:
    try:
        from dpkernels import triton as _t  # noqa: F401
    except ImportError:
        return False
    return True


def _implementation(name: str, backend: str) -> Callable:
    if backend == "torch":
        return getattr(reference, name)
    if backend in ("cpu", "cuda"):
        return getattr(torch.ops.dpkernels, name)
    if backend == "triton":
        from dpkernels import triton as dtriton

        return getattr(dtriton, name)
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")


def resolve(name: str, backend: str, x: torch.Tensor, args: tuple | None = None) -> str:
    """Map "auto" to a concrete backend for op `name` on tensors like `x` (the call's `args`, when
    given, let "auto" time the real shapes); check explicit choices."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    dev = x.device.type
    if backend == "auto":
        if dev == "cuda":
            from dpkernels.autobackend import fastest

            chosen = fastest(name, x, args)
        else:
            chosen = "cpu" if extension_has("cpu") else "torch"
    else:
        chosen = backend
        if chosen in ("cpu", "cuda") and not extension_has(chosen):
            raise RuntimeError(
                f"backend {chosen!r} asked for, but the dpkernels extension was built without it"
                + ("" if HAS_EXTENSION else f" (import failed: {_IMPORT_ERROR})")
            )
        if chosen in ("cpu", "cuda") and dev != chosen:
            raise RuntimeError(f"backend {chosen!r} cannot run on {dev} tensors")
    key = (name, dev, chosen)
    if key not in _logged:
        _logged.add(key)
        log.info("dpkernels: %s on %s uses backend %s", name, dev, chosen)
    return chosen


def call(name: str, backend: str, *args):
    """Run op `name` on `backend` (after resolving "auto" on the first tensor argument)."""
    x = next(a for a in args if isinstance(a, torch.Tensor))
    return _implementation(name, resolve(name, backend, x, args))(*args)


def ghost_norm(A: torch.Tensor, G: torch.Tensor, with_bias: bool = True, backend: str = "auto"):
    return call("ghost_norm", backend, A, G, with_bias)


def direct_norm(A: torch.Tensor, G: torch.Tensor, with_bias: bool = True, backend: str = "auto"):
    return call("direct_norm", backend, A, G, with_bias)


def clipped_sum(A, G, c, c_bias=None, noise_std: float = 0.0, seed: int = 0, offset: int = 0, backend: str = "auto"):
    return call("clipped_sum", backend, A, G, c, c_bias, float(noise_std), int(seed), int(offset))


def sq_norms(X: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    return call("sq_norms", backend, X)


def clipped_rows_sum(X, c, noise_std: float = 0.0, seed: int = 0, offset: int = 0, backend: str = "auto"):
    return call("clipped_rows_sum", backend, X, c, float(noise_std), int(seed), int(offset))


def affine_grad_sample(xhat: torch.Tensor, G: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    return call("affine_grad_sample", backend, xhat, G)


def embedding_norm(ids: torch.Tensor, G: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    return call("embedding_norm", backend, ids, G)


def embedding_clipped_sum(ids, G, c, num_embeddings: int, noise_std: float = 0.0, seed: int = 0, offset: int = 0,
                          backend: str = "auto"):
    return call("embedding_clipped_sum", backend, ids, G, c, int(num_embeddings), float(noise_std), int(seed),
                int(offset))


def add_noise_(x: torch.Tensor, std: float, seed: int, offset: int, backend: str = "auto") -> torch.Tensor:
    return call("add_noise_", backend, x, float(std), int(seed), int(offset))


def choose_strategy(T: int, d: int, p: int) -> str:
    """Cost model for a linear layer's weight norm: ghost costs ~T^2 (d + p) per sample,
    direct ~T d p; ghost wins when T (d + p) < d p."""
    return "ghost" if T * (d + p) < d * p else "direct"


def linear_norm(A, G, with_bias: bool = True, strategy: str = "auto", backend: str = "auto"):
    """Squared per-sample weight (and bias) gradient norms of a linear layer, [B] each."""
    if strategy == "auto":
        strategy = choose_strategy(reference.as_3d(A).shape[1], A.shape[-1], G.shape[-1])
    if strategy == "ghost":
        return ghost_norm(A, G, with_bias, backend)
    if strategy == "direct":
        return direct_norm(A, G, with_bias, backend)
    raise ValueError(f"unknown strategy {strategy!r}; choose auto, ghost or direct")
