"""Embedding layer: per-sample squared norm of the table gradient and its clipped sum + noise.

The per-sample gradient of a table is sum_t onehot(ids[b,t]) G[b,t] (repeated ids summed), so
||g_b||^2 = sum_{t,t'} [ids_t == ids_t'] <G_t, G_t'>: a ghost norm whose A-Gram is the id match
mask. It is tiled exactly like the linear ghost norm, with no table-sized tensor per sample.
The clipped sum scatters c_b G[b,t] into a noise-initialised [V, D] table with fp32 atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dpkernels.triton._common import INTERPRET, check_dtype, configs, fp32_dot_precision
from dpkernels.triton.linear_norms import gram_tile
from dpkernels.triton.rows import rows_sum_noise

MIN_BLOCK_T = 16 if INTERPRET else 32


NORM_CONFIGS = [  # every GPU config; BLOCK_T >= MIN_BLOCK_T
    triton.Config({"BLOCK_T": bt, "BLOCK_K": bk}, num_warps=w, num_stages=3)
    for bt, bk, w in [(32, 64, 4), (64, 64, 4), (128, 64, 8)]
]


@triton.autotune(configs=configs(NORM_CONFIGS, triton.Config({"BLOCK_T": 16, "BLOCK_K": 16})), key=["T", "D"])
@triton.jit
def _embedding_norm_kernel(ids_ptr, g_ptr, part_ptr, T, D, part_stride, UPCAST: tl.constexpr, DOT: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1)
    n_tiles = tl.cdiv(T, BLOCK_T)  # programs with i >= n_tiles do no work and write 0
    g_base = g_ptr + b * T * D
    rows_i = i * BLOCK_T + tl.arange(0, BLOCK_T)
    ids_i = tl.load(ids_ptr + b * T + rows_i, mask=rows_i < T, other=-1)
    acc = tl.zeros([BLOCK_T, BLOCK_T], dtype=tl.float32)
    for j in range(i, n_tiles):
        rows_j = j * BLOCK_T + tl.arange(0, BLOCK_T)
        ids_j = tl.load(ids_ptr + b * T + rows_j, mask=rows_j < T, other=-2)
        gg = gram_tile(g_base, rows_i, rows_j, T, D, UPCAST, DOT, BLOCK_T, BLOCK_K)
        same = ids_i[:, None] == ids_j[None, :]
        acc += tl.where(j == i, 1.0, 2.0) * tl.where(same, gg, 0.0)
    tl.store(part_ptr + b * part_stride + i, tl.sum(acc))


def _inputs(ids: torch.Tensor, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ids -> contiguous int64 [B, T]; G -> contiguous [B, T, D]."""
    check_dtype(G)
    B, D = G.shape[0], G.shape[-1]
    T = G[0].numel() // D if B and D else (G.shape[1:-1].numel() if G.dim() > 2 else 1)
    if ids.numel() != B * T:
        raise ValueError(f"ids {tuple(ids.shape)} and G {tuple(G.shape)} disagree on tokens")
    return ids.reshape(B, T).to(torch.int64).contiguous(), G.reshape(B, T, D).contiguous()


def embedding_norm(ids: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """||per-sample embedding gradient||^2 (repeated ids summed first).

    Args:
        ids: int ids, [B, ...].
        G: the gradient of the looked-up rows, [B, ..., D], fp32/fp16/bf16.

    Returns:
        [B] fp32.
    """
    ids2, G3 = _inputs(ids, G)
    B, T, D = G3.shape
    n_programs = triton.cdiv(T, MIN_BLOCK_T)
    part = torch.zeros(B, max(n_programs, 1), dtype=torch.float32, device=G.device)
    if B and n_programs and D:
        upcast = INTERPRET and G3.dtype != torch.float32
        _embedding_norm_kernel[(B, n_programs)](ids2, G3, part, T, D, n_programs, UPCAST=upcast,
                                                DOT=fp32_dot_precision())
    return part.sum(1)


@triton.jit
def _scatter_kernel(ids_ptr, g_ptr, c_ptr, out_ptr, R, T, D, V, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[ids[r]] += c[r // T] * G[r] for rows r of [B*T, D]; out-of-range ids are skipped."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < R
    ids = tl.load(ids_ptr + rows, mask=row_ok, other=-1)
    row_ok = row_ok & (ids >= 0) & (ids < V)
    c = tl.load(c_ptr + rows // T, mask=row_ok, other=0.0)
    mask = row_ok[:, None] & (cols[None, :] < D)
    g = tl.load(g_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.atomic_add(out_ptr + ids[:, None] * D + cols[None, :], g * c[:, None], mask=mask)


def embedding_clipped_sum(ids: torch.Tensor, G: torch.Tensor, c: torch.Tensor, num_embeddings: int,
                          noise_std: float, seed: int, offset: int) -> torch.Tensor:
    """sum_b c_b (per-sample table gradient) + noise on the whole [V, D] table, fp32.

    Rows with ids outside [0, V) are ignored (the caller's embedding forward would have failed).

    Args:
        ids: int ids, [B, ...].
        G: the gradient of the looked-up rows, [B, ..., D], fp32/fp16/bf16.
        c: clip factor per sample, [B].
        num_embeddings: V.
        noise_std: std of the noise.
        seed: Philox seed.
        offset: first noise counter (row-major over [V, D]).

    Returns:
        [V, D] fp32.
    """
    ids2, G3 = _inputs(ids, G)
    B, T, D = G3.shape
    out = torch.empty(num_embeddings, D, dtype=torch.float32, device=G.device)
    rows_sum_noise(None, None, out, noise_std, seed, offset)  # the table starts as pure noise
    R = B * T
    if R and D:
        c32 = c.to(device=G.device, dtype=torch.float32).contiguous()
        block_r, block_d = (16, 16) if INTERPRET else (32, 128)
        grid = (triton.cdiv(R, block_r), triton.cdiv(D, block_d))
        _scatter_kernel[grid](ids2, G3, c32, out, R, T, D, num_embeddings, BLOCK_R=block_r, BLOCK_D=block_d)
    return out
