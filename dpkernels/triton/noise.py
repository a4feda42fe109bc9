"""add_noise_: counter-based Gaussian noise added in place (the rows kernel with one row, no weights)."""

from __future__ import annotations

import torch

from dpkernels.triton._common import check_dtype
from dpkernels.triton.rows import rows_sum_noise


def add_noise_(x: torch.Tensor, std: float, seed: int, offset: int) -> torch.Tensor:
    """x += std * philox_normal(offset + row-major index), in place (noise drawn in fp32).

    Args:
        x: the tensor to noise (fp32/fp16/bf16).
        std: the noise's std.
        seed: Philox seed, in [0, 2^63).
        offset: counter of x's first element (>= 0).

    Returns:
        x.
    """
    check_dtype(x)
    if std == 0.0 or x.numel() == 0:
        return x
    flat = x if x.is_contiguous() else x.contiguous()
    rows_sum_noise(flat.view(1, -1), None, flat.view(-1), std, seed, offset)
    if flat is not x:
        x.copy_(flat)
    return x
