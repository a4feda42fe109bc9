"""Rows of a physical batch -> examples (noise multiplicity).

With k diffusion noises per image, the k rows of one image are ONE example for
clipping: its tokens are concatenated, so its gradient (the mean over its rows)
is clipped once and the sensitivity stays C, not k*C.
"""

from __future__ import annotations

import torch


class Grouping:
    """Maps the `rows` rows of a batch to `n` examples.

    Args:
        ids: an integer example id per row, or None (every row is an example).
        rows: the rows of the batch.
    """

    def __init__(self, ids: torch.Tensor | None, rows: int):
        self.rows = rows
        self.inverse: torch.Tensor | None = None
        self.slots: torch.Tensor | None = None  # [n, k] row index per (example, copy), -1 = padding
        if ids is None:
            self.n, self.k, self.contiguous = rows, 1, True
            return
        if ids.dim() != 1 or ids.shape[0] != rows:
            raise ValueError(f"example ids must be a 1-D tensor with one id per row ({rows} rows), got {tuple(ids.shape)}")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"example ids must be integers, got {ids.dtype}")
        ids = ids.to("cpu")
        _, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
        self.n = int(counts.numel())
        self.k = int(counts.max()) if rows else 1
        self.inverse = inverse
        expected = torch.arange(self.n).repeat_interleave(self.k)
        self.contiguous = bool((counts == self.k).all()) and torch.equal(inverse, expected)
        if not self.contiguous:
            order = torch.argsort(inverse, stable=True)
            first = torch.cumsum(counts, 0) - counts
            pos = torch.arange(rows) - first[inverse[order]]
            slots = torch.full((self.n, self.k), -1, dtype=torch.long)
            slots[inverse[order], pos] = order
            self.slots = slots

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The tokens of an example's rows, concatenated (zero padded).

        Args:
            x: [rows, T, f].

        Returns:
            [n, k*T, f].
        """
        if self.k == 1 and self.slots is None:
            return x
        if self.contiguous:
            return x.reshape(self.n, self.k * x.shape[1], *x.shape[2:])
        slots = self.slots.to(x.device)
        out = x.new_zeros(self.n, self.k, *x.shape[1:])
        valid = slots >= 0
        out[valid] = x[slots[valid]]
        return out.reshape(self.n, self.k * x.shape[1], *x.shape[2:])

    def sum_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Per-example sum of per-row gradients.

        Args:
            x: [rows, ...].

        Returns:
            [n, ...].
        """
        if self.inverse is None:
            return x
        if self.contiguous:
            return x.reshape(self.n, self.k, *x.shape[1:]).sum(1)
        out = x.new_zeros(self.n, *x.shape[1:])
        return out.index_add_(0, self.inverse.to(x.device), x)
