"""What every backend agrees on besides the math: token views, the accumulation dtype, the noise-counter layout.

A leaf (it imports torch alone): the reference, the Triton host code, the layers and the optimizer read these, so
that no copy of them can drift.
"""

from __future__ import annotations

import math

import torch


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype sums over `t` accumulate in: float64 stays float64; everything else accumulates in float32.

    Args:
        t: an input or parameter tensor.

    Returns:
        torch.float64 for a float64 `t`, else torch.float32.
    """
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def as_3d(x: torch.Tensor) -> torch.Tensor:
    """A layer input or output gradient as [B, T, n] tokens: a 2-D input is one token per sample.

    Args:
        x: [B, n], [B, T, n] or [B, ..., n] (B may be 0).

    Returns:
        [B, 1, n], x itself, or [B, prod(...), n] (a view where possible).
    """
    if x.dim() == 2:
        return x.unsqueeze(1)
    if x.dim() == 3:
        return x
    return x.reshape(x.shape[0], math.prod(x.shape[1:-1]), x.shape[-1])


def round_up4(n: int) -> int:
    """Noise counters a tensor of `n` elements consumes: one Philox block gives four normals, and every tensor's
    noise starts at a block boundary (the bias of a clipped sum starts at offset + round_up4(p * d)).

    Args:
        n: number of elements.

    Returns:
        n rounded up to a multiple of 4.
    """
    return (n + 3) // 4 * 4
