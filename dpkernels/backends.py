"""The backends, the ops they implement, and which function is op `name` on backend `b`.

A leaf of the dispatch: `dpkernels.ops` (the public ops, the backend choice) and `dpkernels.autobackend` (timing
the GPU backends) both import it, and it imports neither.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dpkernels import reference

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
    IMPORT_ERROR: ImportError | None = None
except ImportError as e:  # pragma: no cover - only without a build
    HAS_EXTENSION = False
    IMPORT_ERROR = e


def extension_has(device_type: str) -> bool:
    """Whether the compiled extension has kernels for a device type.

    Args:
        device_type: "cpu" or "cuda".

    Returns:
        True if `torch.ops.dpkernels.*` has kernels for it (False without the extension).
    """
    if not HAS_EXTENSION:
        return False
    return bool(torch.ops.dpkernels.has_backend(device_type))


def triton_available() -> bool:
    """Whether the Triton backend imports (triton installed, and a GPU or TRITON_INTERPRET=1).

    Returns:
        True if `dpkernels.triton` imports.
    """
    try:
        from dpkernels import triton as _t  # noqa: F401
    except ImportError:
        return False
    return True


def implementation(name: str, backend: str) -> Callable:
    """The function that is op `name` on a concrete backend (no checks of the tensors it will get).

    Args:
        name: one of OP_NAMES.
        backend: "cpu", "cuda", "triton" or "torch" (not "auto": resolve it first, `dpkernels.ops.resolve`).

    Returns:
        The backend's callable, with the signature of `dpkernels.reference.<name>`.
    """
    if backend == "torch":
        return getattr(reference, name)
    if backend in ("cpu", "cuda"):
        return getattr(torch.ops.dpkernels, name)
    if backend == "triton":
        from dpkernels import triton as dtriton

        return getattr(dtriton, name)
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
