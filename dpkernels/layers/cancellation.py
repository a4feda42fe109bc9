"""Per-example norms that cannot be trusted, and the bound that replaces them.

A layer whose norm and clipped sum are computed separately (the ghost or direct norm, then one GEMM for the sum;
the embedding's Gram over ids, then a scatter) reads each example's norm off a sum over its tokens. When those
terms cancel (g_b = sum_t G_t a_t^T with the G_t nearly opposite), rounding leaves an error of about u * S_b^2 in
the squared norm, S_b = sum_t ||G_t|| ||a_t|| (u: the accumulation's unit roundoff): the computed norm can be 0,
negative or NaN while the true one is large, and a clipping factor of 1 would let the example through whole (a
crafted example reached 1000 C). S_b itself has no cancellation, and ||g_b|| <= S_b always (triangle inequality).
So where u * (S_b / n_b)^2 exceeds TRUSTED_ERROR, the example's squared norm is taken as S_b^2: its update is then
at most C whatever the rounding, in the norm and in the sum (c_b S_b <= C bounds what the GEMM adds for it). Real
data stays far inside: S_b / n_b is about sqrt(T) for unrelated tokens (<= 64 up to 4,096 tokens), and the bound
only clips a crafted or degenerate example harder than needed.
"""

from __future__ import annotations

import torch

TRUSTED_ERROR = 1e-3  # largest relative error of a squared norm taken as it is (u * (S / n)^2)


def unit_roundoff(dtype: torch.dtype) -> float:
    """u of the accumulation: float64 stays float64, every other input accumulates in float32.

    Args:
        dtype: the layer's input dtype.

    Returns:
        The unit roundoff of the dtype its norms accumulate in.
    """
    return 2.0**-53 if dtype == torch.float64 else 2.0**-24


def token_norms(x: torch.Tensor) -> torch.Tensor:
    """||x_t|| per example and token.

    Args:
        x: [n, T, f].

    Returns:
        [n, T], float32 (float64 for float64 input).
    """
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(x, dim=-1, dtype=dt)


def guard(sq: torch.Tensor, bound: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`sq` (computed squared norms, [n]) where they can be trusted, `bound`^2 (a cancellation-free upper bound of
    the norms) where not: u * bound^2 > TRUSTED_ERROR * sq, or `sq` not a number. A non-finite bound keeps `sq`
    (the step then refuses the non-finite norm).

    Args:
        sq: squared per-example norms as the kernels computed them.
        bound: S_b, an upper bound of each example's norm computed without cancellation.
        dtype: the dtype of the layer's inputs (its unit roundoff).

    Returns:
        The squared norms to clip by, [n], sq's dtype.
    """
    b2 = bound.to(sq.dtype).square()
    trusted = unit_roundoff(dtype) * b2 <= TRUSTED_ERROR * sq  # False for NaN and for sq <= 0 < b2
    return torch.where(trusted | ~torch.isfinite(b2), sq, b2)
