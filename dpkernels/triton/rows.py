"""Row-wise ops on per-sample tensors [B, ...]: squared norms of samples, clipped (weighted) sums of rows + noise.

`rows_sum_noise` is also the noise epilogue of add_noise_ (noise.py), the split-K reduce of clipped_sum and the
noise of the embedding table."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dpkernels.triton._common import INTERPRET, check_dtype, check_offset, seed_words
from dpkernels.triton.philox import normal_at

BLOCK_N = 256 if INTERPRET else 1024  # elements per program of the memory-bound kernels
CHUNK_N = 4 * BLOCK_N  # elements of one sample per program in sq_norms


@triton.jit(do_not_specialize=["S", "seed_lo", "seed_hi", "offset"])
def _rows_sum_noise_kernel(
    x_ptr, w_ptr, out_ptr, S, N, std, seed_lo, seed_hi, offset,
    HAS_W: tl.constexpr, HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr,
):
    """out[n] = sum_{s<S} w[s] * x[s, n] + std * normal(offset + n), x [S, N] contiguous.

    S = 0 gives pure noise, S = 1 with out = x is add_noise_, no w is a plain sum (split-K reduce).
    """
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    x_ptrs = x_ptr + cols
    for s in range(S):
        x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        if HAS_W:
            x = x * tl.load(w_ptr + s).to(tl.float32)
        acc += x
        x_ptrs += N  # pointer steps: no int32 row offset s * N to overflow
    if HAS_NOISE:
        acc += std * normal_at(offset.to(tl.int64) + cols, seed_lo, seed_hi)
    tl.store(out_ptr + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def rows_sum_noise(x: torch.Tensor | None, w: torch.Tensor | None, out: torch.Tensor, noise_std: float, seed: int,
                   offset: int) -> torch.Tensor:
    """out = sum_s w_s x[s] + noise_std * philox_normal(offset + j), one pass (the reduce every noised sum ends in).

    Args:
        x: [S, N] contiguous rows, or None (pure noise).
        w: [S] fp32 weights, or None (a plain sum).
        out: the contiguous output, N elements (any shape); written in place.
        noise_std: std of the noise (0: none).
        seed: Philox seed.
        offset: counter of out's first element.

    Returns:
        out.
    """
    N = out.numel()
    S = 0 if x is None else x.shape[0]
    if N == 0:
        return out
    lo, hi = seed_words(seed)
    x_arg = out if x is None else x
    w_arg = out if w is None else w
    _rows_sum_noise_kernel[(triton.cdiv(N, BLOCK_N),)](
        x_arg, w_arg, out, S, N, float(noise_std), lo, hi, check_offset(offset),
        HAS_W=w is not None, HAS_NOISE=noise_std != 0.0, BLOCK=BLOCK_N,
    )
    return out


@triton.jit
def _sq_norms_kernel(x_ptr, partial_ptr, N, n_chunks, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """partial[b, j] = sum of squares of x[b, j*CHUNK : (j+1)*CHUNK]."""
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, CHUNK, BLOCK):
        cols = j * CHUNK + start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + b * N + cols, mask=cols < N, other=0.0).to(tl.float32)
        acc += x * x
    tl.store(partial_ptr + b * n_chunks + j, tl.sum(acc, axis=0))


def sq_norms(X: torch.Tensor) -> torch.Tensor:
    """||X_b||^2 over all trailing dims.

    Args:
        X: [B, ...], fp32/fp16/bf16.

    Returns:
        [B] fp32.
    """
    check_dtype(X)
    B = X.shape[0]
    x = X.reshape(B, X.shape[1:].numel()).contiguous()  # explicit N: reshape(0, -1) is ambiguous
    N = x.shape[1]
    if B == 0 or N == 0:
        return torch.zeros(B, dtype=torch.float32, device=X.device)
    n_chunks = triton.cdiv(N, CHUNK_N)
    partial = torch.empty(B, n_chunks, dtype=torch.float32, device=X.device)
    _sq_norms_kernel[(B, n_chunks)](x, partial, N, n_chunks, CHUNK=CHUNK_N, BLOCK=BLOCK_N)
    return partial.sum(1)


def clipped_rows_sum(X: torch.Tensor, c: torch.Tensor, noise_std: float, seed: int, offset: int) -> torch.Tensor:
    """sum_b c_b X_b + noise.

    Args:
        X: [B, ...], fp32/fp16/bf16.
        c: clip factor per sample, [B].
        noise_std: std of the noise.
        seed: Philox seed.
        offset: first noise counter (row-major over X.shape[1:]).

    Returns:
        shape X.shape[1:], fp32.
    """
    check_dtype(X)
    B = X.shape[0]
    x = X.reshape(B, X.shape[1:].numel()).contiguous()
    out = torch.empty(X.shape[1:], dtype=torch.float32, device=X.device)
    w = c.to(device=X.device, dtype=torch.float32).contiguous()
    return rows_sum_noise(x if B else None, w if B else None, out, noise_std, seed, offset)
