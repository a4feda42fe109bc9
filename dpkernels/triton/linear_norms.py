"""Per-sample squared gradient norms of a linear layer, weight and bias, without materialising
per-sample gradients. A [B, T, d] (or [B, d]), G [B, T, p] (or [B, p]); outputs fp32 [B].

ghost:  ||G_b^T A_b||^2 = sum_{t,t'} (A_b A_b^T)_{tt'} (G_b G_b^T)_{tt'}, flash-attention style:
        one program per (sample, row tile i) walks the column tiles j >= i (the Grams are
        symmetric: off-diagonal tiles count twice), forms both Gram tiles with tl.dot over d and
        p chunks and reduces their product on the fly; no T x T tensor is ever in memory.
direct: one program per (p, d) tile (grid axis x, up to 2^31 - 1 tiles) and sample (axis y, at
        most 65535: programs loop over the samples beyond) accumulates G_b^T A_b over T chunks in
        registers and keeps only the sum of its squares.
Per-program partial sums land in a small [B, tiles] buffer that torch sums (deterministic, no
atomics). The grids do not depend on the autotuned block sizes (programs past the end write 0),
so every entry is written on every launch and autotuning never sees stale partials.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dpkernels.conventions import as_3d
from dpkernels.triton._common import INTERPRET, check_dtype, configs, fp32_dot_precision

MIN_BLOCK = 16 if INTERPRET else 64  # the smallest block size of any config below
MAX_GRID_Y = 65535  # CUDA's limit on grid axes y and z (axis x allows 2^31 - 1)


@triton.jit
def gram_tile(base, rows_i, rows_j, T, n, UPCAST: tl.constexpr, DOT: tl.constexpr, BLOCK_T: tl.constexpr,
              BLOCK_K: tl.constexpr):
    """X[rows_i] @ X[rows_j]^T of one sample's X [T, n] (row-major at base).

    Args:
        base: pointer to the sample's X.
        rows_i, rows_j: the two row tiles (masked against T).
        T, n: X's rows and columns.
        UPCAST: load half inputs as fp32 (the interpreter computes bf16/fp16 dots wrongly).
        DOT: tl.dot's input_precision.
        BLOCK_T, BLOCK_K: tile rows, and columns per step.

    Returns:
        fp32 [BLOCK_T, BLOCK_T].
    """
    acc = tl.zeros([BLOCK_T, BLOCK_T], dtype=tl.float32)
    for k0 in range(0, n, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols[None, :] < n
        x_i = tl.load(base + rows_i[:, None] * n + cols[None, :], mask=(rows_i[:, None] < T) & col_ok, other=0.0)
        x_j = tl.load(base + rows_j[:, None] * n + cols[None, :], mask=(rows_j[:, None] < T) & col_ok, other=0.0)
        if UPCAST:  # the interpreter computes bf16/fp16 dots wrongly
            x_i = x_i.to(tl.float32)
            x_j = x_j.to(tl.float32)
        acc = tl.dot(x_i, tl.trans(x_j), acc, input_precision=DOT)
    return acc


# Every GPU config (the first is the safe default); tests run each of them against the reference.
GHOST_CONFIGS = [
    triton.Config({"BLOCK_T": bt, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bt, bk, w, s in [(64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 3), (128, 32, 8, 3)]
]


@triton.autotune(configs=configs(GHOST_CONFIGS, triton.Config({"BLOCK_T": 16, "BLOCK_K": 16})), key=["T", "d", "p"])
@triton.jit
def _ghost_norm_kernel(
    a_ptr, g_ptr, w_part_ptr, b_part_ptr, T, d, p, part_stride,
    WITH_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
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
        aa = gram_tile(a_base, rows_i, rows_j, T, d, UPCAST, DOT, BLOCK_T, BLOCK_K)
        gg = gram_tile(g_base, rows_i, rows_j, T, p, UPCAST, DOT, BLOCK_T, BLOCK_K)
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


DIRECT_CONFIGS = [
    triton.Config({"BLOCK_P": bp, "BLOCK_D": bd, "BLOCK_T": bt}, num_warps=w, num_stages=s)
    for bp, bd, bt, w, s in [(64, 64, 32, 4, 3), (128, 128, 32, 8, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3)]
]


@triton.autotune(configs=configs(DIRECT_CONFIGS, triton.Config({"BLOCK_P": 16, "BLOCK_D": 16, "BLOCK_T": 16})),
                 key=["T", "d", "p"])
@triton.jit(do_not_specialize=["B"])  # B changes with every Poisson batch: never a compile key
def _direct_norm_kernel(
    a_ptr, g_ptr, w_part_ptr, b_part_ptr, B, T, d, p, part_stride,
    WITH_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    tile = tl.program_id(0)  # axis x: a huge layer has more than 65535 tiles
    n_d = tl.cdiv(d, BLOCK_D)
    active = tile < tl.cdiv(p, BLOCK_P) * n_d  # programs past the last tile write 0
    pt = tile // n_d
    dt = tile % n_d
    pcols = pt * BLOCK_P + tl.arange(0, BLOCK_P)
    dcols = dt * BLOCK_D + tl.arange(0, BLOCK_D)
    first = tl.program_id(1).to(tl.int64)
    n_y = tl.num_programs(1)
    for s in range(tl.cdiv(B - first, n_y)):  # samples first, first + n_y, ... (B may exceed axis y)
        b = first + s * n_y
        a_base = a_ptr + b * T * d
        g_base = g_ptr + b * T * p
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
            acc = tl.dot(tl.trans(g), a, acc, input_precision=DOT)
        tl.store(w_part_ptr + b * part_stride + tile, tl.sum(acc * acc))
        if WITH_BIAS:  # one d tile per p tile owns the bias
            tl.store(b_part_ptr + b * part_stride + tile, tl.where(dt == 0, tl.sum(g_sum * g_sum), 0.0))


def linear_inputs(A: torch.Tensor, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked, contiguous token views of a linear layer's input and output gradient, in one dtype.

    Args:
        A: [B, (..,) d]; G: [B, (..,) p], with the same leading dims.

    Returns:
        (A [B, T, d], G [B, T, p]).
    """
    check_dtype(A, G)
    A3, G3 = as_3d(A), as_3d(G)
    if A3.shape[:2] != G3.shape[:2]:
        raise ValueError(f"A {tuple(A.shape)} and G {tuple(G.shape)} disagree on batch or token dims")
    dt = torch.promote_types(A3.dtype, G3.dtype)
    return A3.to(dt).contiguous(), G3.to(dt).contiguous()


def direct_grid(B: int, n_tiles: int) -> tuple[int, int]:
    """The direct-norm launch grid: (p, d) tiles on axis x (limit 2^31 - 1), samples on axis y (capped at 65535).

    Args:
        B: samples; n_tiles: (p, d) tiles.

    Returns:
        (grid x, grid y).
    """
    return n_tiles, min(B, MAX_GRID_Y)


def _norms(A: torch.Tensor, G: torch.Tensor, with_bias: bool, direct: bool):
    A3, G3 = linear_inputs(A, G)
    B, T, d = A3.shape
    p = G3.shape[2]
    # partial-sum slots per sample: enough for the smallest blocks, so the grid is config-independent
    n_programs = triton.cdiv(p, MIN_BLOCK) * triton.cdiv(d, MIN_BLOCK) if direct else triton.cdiv(T, MIN_BLOCK)
    w_part = torch.zeros(B, max(n_programs, 1), dtype=torch.float32, device=A3.device)
    b_part = torch.zeros_like(w_part) if with_bias else w_part.new_empty(0)
    if B and n_programs:
        upcast = INTERPRET and A3.dtype != torch.float32
        b_arg = b_part if with_bias else w_part
        dot = fp32_dot_precision()
        if direct:
            _direct_norm_kernel[direct_grid(B, n_programs)](A3, G3, w_part, b_arg, B, T, d, p, n_programs,
                                                            WITH_BIAS=with_bias, UPCAST=upcast, DOT=dot)
        else:  # row tiles on axis y: T would need over 4M tokens to pass its limit
            _ghost_norm_kernel[(B, n_programs)](A3, G3, w_part, b_arg, T, d, p, n_programs,
                                                WITH_BIAS=with_bias, UPCAST=upcast, DOT=dot)
    return w_part.sum(1), (b_part.sum(1) if with_bias else w_part.new_empty(0))


def ghost_norm(A: torch.Tensor, G: torch.Tensor, with_bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared per-sample weight (and bias) gradient norms by the tiled Gram identity.

    Args:
        A: [B, (T,) d]; G: [B, (T,) p]; fp32/fp16/bf16.
        with_bias: also the bias norms.

    Returns:
        (weight norms [B] fp32, bias norms [B] fp32 or an empty tensor).
    """
    return _norms(A, G, with_bias, direct=False)


def direct_norm(A: torch.Tensor, G: torch.Tensor, with_bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared per-sample weight (and bias) gradient norms from register tiles of G_b^T A_b.

    Args:
        A: [B, (T,) d]; G: [B, (T,) p]; fp32/fp16/bf16.
        with_bias: also the bias norms.

    Returns:
        (weight norms [B] fp32, bias norms [B] fp32 or an empty tensor).
    """
    return _norms(A, G, with_bias, direct=True)
