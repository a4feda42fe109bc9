"""Helpers for layers whose per-sample gradients are small enough to hold ([B, C]):
the norm layers' affine parameters. Norms and clipped sums go through the row ops."""

from __future__ import annotations

import torch

from dpkernels import ops
from dpkernels.layers.base import Record
from dpkernels.noise import NoiseSource


def add_rows(old: dict[str, torch.Tensor] | None, new: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-row gradients of two backward passes through one forward add (the gradient is linear in G).

    Args:
        old: what earlier passes gave, or None.
        new: this pass's, by parameter name.

    Returns:
        Their sum, by parameter name.
    """
    return new if old is None else {k: old[k] + v for k, v in new.items()}


def rows_sq_norms(grad_samples: dict[str, torch.Tensor], rec: Record, backend: str) -> dict[str, torch.Tensor]:
    """Keep the per-example gradients on the record for the clipped sum; return their squared norms.

    Args:
        grad_samples: per-example gradients by parameter name, [n, ...].
        rec: the call's record.
        backend: the ops' backend.

    Returns:
        {parameter name: [n]}.
    """
    rec.extra["grad_samples"] = grad_samples
    return {k: ops.sq_norms(v, backend=backend) for k, v in grad_samples.items()}


def rows_clipped_sums(grad_samples: dict[str, torch.Tensor], c: dict[str, torch.Tensor], noise_std: float,
                      noise: NoiseSource, backend: str) -> dict[str, torch.Tensor]:
    """Noisy clipped sums of per-example gradients that are small enough to hold.

    Args:
        grad_samples: per-example gradients by parameter name, [n, ...].
        c: clip factors per example, by parameter name.
        noise_std: std of the noise.
        noise: the noise counters (one take per parameter).
        backend: the ops' backend.

    Returns:
        {parameter name: its sum, shape [...]}.
    """
    out = {}
    for k, g in grad_samples.items():
        seed, offset = noise.take(g.shape[1:].numel())
        out[k] = ops.clipped_rows_sum(g, c[k], noise_std, seed, offset, backend=backend)
    return out
