"""Per-sample squared gradient norms of a linear layer, weight and bias, without materialising
per-sample gradients. A [B, T, d] (or [B, d]), G [B, T, p] (or [B, p]); outputs fp32 [B].

ghost:  ||G_b^T A_b||^2 = sum_{t,t'} (A_b A_b^T)_{tt'} (G_b G_b^T)_{tt'}, flash-attention style:
        one program per (sample, row tile i) walks the column tiles j >= i (the Grams are
        symmetric: off-diagonal tiles count twice), forms both Gram tiles with tl.dot over d and
        p chunks and reduces their product on the fly; no T x T tensor is ever in memory.
direct: one program per (sample, (p, d) tile) accumulates G_b^T A_b over T chunks in registers
        and keeps only the sum of its squares.
Per-program partial sums land in a small [B, tiles] buffer that torch sums (deterministic, no
atomics). The grids do not depend on the autotuned block sizes (programs past the end write 0),
so every entry is written on every launch and autotuning never sees stale partials.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dpkernels.triton._common import INTERPRET, check_dtype, configs

MIN_BLOCK = 16 if INTERPRET else 64  # the smallest block size of any config below


@triton.jit
def gram_tile(base, rows_i, rows_j, T, n, UPCAST: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """X[rows_i] @ X[rows_j]^T of one sample's X [T, n] (row-major at base), fp32 [BLOCK_T, BLOCK_T]."""
    acc = tl.zeros([BLOCK_T, BLOCK_T], dtype=tl.float32)
    for k0 in range(0, n, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols[None, :] < n
        x_i = tl.load(base + rows_i[:, None] * n + cols[None, :], mask=(rows_i[:, None] < T) & col_ok, other=0.0)
        x_j = tl.load(base + rows_j[:, None] * n + cols[None, :], mask=(rows_j[:, None] < T) & col_ok, other=0.0)
        if UPCAST:  # the interpreter computes bf16/fp16 dots wrongly
            x_i = x_i.to(tl.float32)
            x_j = x_j.to(tl.float32)
        acc = tl.dot(x_i, tl.trans(x_j), acc, input_precision="ieee")
    return acc


def _ghost_configs() -> list[triton.Config]:
    full = [
        triton.Config({"BLOCK_T": bt, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bt, bk, w, s in [(64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 3), (128, 32, 8, 3)]
    ]
    return configs(full, triton.Config({"BLOCK_T": 16, "BLOCK_K": 16}))


@triton.autotune(configs=_ghost_configs(), key=["T", "d", "p"])
@triton.jit
def _ghost_norm_kernel(
    a_ptr, g_ptr, w_part_ptr, b_part_ptr, T, d, p, part_stride,
    WITH_BIAS: tl.constexpr, UPCAST: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1)
    n_tiles = tl.cdiv(T, BLOCK_T)  # programs with i >= n_tiles do no work and write 0
    a_base = a_ptr + b * T * d
    g_base = g_ptr + b * T * p
    rows_i = i * BLOCK_T + tl.arange(0, BLOCK_T)
    acc = tl.zeros([BLOCK_T, BLOCK_T], dtype=tl.float32)
    for j in range(i, n_tiles):
        rows_j = j * BLOCK_T + tl.arange(0, BLOCK_T)
        aa = gram_tile(a_base, rows_i, rows_j, T, d, UPCAST, BLOCK_T, BLOCK_K)
        gg = gram_tile(g_base, rows_i, rows_j, T, p, UPCAST, BLOCK_T, BLOCK_K)
        acc += tl.where(j == i, 1.0, 2.0) * (aa * gg)  # tile (j, i) is the transpose of (i, j)
    tl.store(w_part_ptr + b * part_stride + i, tl.sum(acc))
    if WITH_BIAS:
        # ||sum_t G_b[t]||^2, done by the last row tile: it has the least Gram work
        last = i == n_tiles - 1
        bias = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, tl.where(last, p, 0), BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_sum = tl.zeros([BLOCK_K], dtype=tl.float32)
            for t0 in range(0, T, BLOCK_T):
                rows = t0 + tl.arange(0, BLOCK_T)
                g = tl.load(g_base + rows[:, None] * p + cols[None, :],
                            mask=(rows[:, None] < T) & (cols[None, :] < p), other=0.0)
                col_sum += tl.sum(g.to(tl.float32), axis=0)
            bias += col_sum * col_sum
        tl.store(b_part_ptr + b * part_stride + i, tl.sum(bias))


def _direct_configs() -> list[triton.Config]:
    full = [
        triton.Config({"BLOCK_P": bp, "BLOCK_D": bd, "BLOCK_T": bt}, num_warps=w, num_stages=s)
        for bp, bd, bt, w, s in [(64, 64, 32, 4, 3), (128, 128, 32, 8, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3)]
    ]
    return configs(full, triton.Config({"BLOCK_P": 16, "BLOCK_D": 16, "BLOCK_T": 16}))


@triton.autotune(configs=_direct_configs(), key=["T", "d", "p"])
@triton.jit
def _direct_norm_kernel(
    a_ptr, g_ptr, w_part_ptr, b_part_ptr, T, d, p, part_stride,
    WITH_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    n_d = tl.cdiv(d, BLOCK_D)
    active = tile < tl.cdiv(p, BLOCK_P) * n_d  # programs past the last tile write 0
    pt = tile // n_d
    dt = tile % n_d
    a_base = a_ptr + b * T * d
    g_base = g_ptr + b * T * p
    pcols = pt * BLOCK_P + tl.arange(0, BLOCK_P)
    dcols = dt * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    g_sum = tl.zeros([BLOCK_P], dtype=tl.float32)
    for t0 in range(0, tl.where(active, T, 0), BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        row_ok = rows[:, None] < T
        g = tl.load(g_base + rows[:, None] * p + pcols[None, :], mask=row_ok & (pcols[None, :] < p), other=0.0)
        a = tl.load(a_base + rows[:, None] * d + dcols[None, :], mask=row_ok & (dcols[None, :] < d), other=0.0)
        if WITH_BIAS:
            g_sum += tl.sum(g.to(tl.float32), axis=0)
        if UPCAST:
            g = g.to(tl.float32)
            a = a.to(tl.float32)
        acc = tl.dot(tl.trans(g), a, acc, input_precision="ieee")
    tl.store(w_part_ptr + b * part_stride + tile, tl.sum(acc * acc))
    if WITH_BIAS:  # one d tile per p tile owns the bias
        tl.store(b_part_ptr + b * part_stride + tile, tl.where(dt == 0, tl.sum(g_sum * g_sum), 0.0))


def as_3d(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 2:
        return x.unsqueeze(1)
    return x if x.dim() == 3 else x.reshape(x.shape[0], x.shape[1:-1].numel(), x.shape[-1])  # B may be 0


def linear_inputs(A: torch.Tensor, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked, contiguous [B, T, d] and [B, T, p] of one dtype."""
    check_dtype(A, G)
    A3, G3 = as_3d(A), as_3d(G)
    if A3.shape[:2] != G3.shape[:2]:
        raise ValueError(f"A {tuple(A.shape)} and G {tuple(G.shape)} disagree on batch or token dims")
    dt = torch.promote_types(A3.dtype, G3.dtype)
    return A3.to(dt).contiguous(), G3.to(dt).contiguous()


def _norms(kernel, A: torch.Tensor, G: torch.Tensor, with_bias: bool, n_programs: int):
    A3, G3 = linear_inputs(A, G)
    B = A3.shape[0]
    w_part = torch.zeros(B, max(n_programs, 1), dtype=torch.float32, device=A3.device)
    b_part = torch.zeros_like(w_part) if with_bias else w_part.new_empty(0)
    if B and n_programs:
        T, d, p = A3.shape[1], A3.shape[2], G3.shape[2]
        upcast = INTERPRET and A3.dtype != torch.float32
        kernel[(B, n_programs)](A3, G3, w_part, b_part if with_bias else w_part, T, d, p, n_programs,
                                WITH_BIAS=with_bias, UPCAST=upcast)
    return w_part.sum(1), (b_part.sum(1) if with_bias else w_part.new_empty(0))


def ghost_norm(A: torch.Tensor, G: torch.Tensor, with_bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared per-sample weight (and bias) gradient norms by the tiled Gram identity, fp32 [B]."""
    T = as_3d(A).shape[1]
    return _norms(_ghost_norm_kernel, A, G, with_bias, triton.cdiv(T, MIN_BLOCK))


def direct_norm(A: torch.Tensor, G: torch.Tensor, with_bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared per-sample weight (and bias) gradient norms from register tiles of G_b^T A_b, fp32 [B]."""
    d, p = A.shape[-1], G.shape[-1]
    return _norms(_direct_norm_kernel, A, G, with_bias, triton.cdiv(p, MIN_BLOCK) * triton.cdiv(d, MIN_BLOCK))
