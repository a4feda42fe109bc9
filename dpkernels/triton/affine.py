"""The per-sample gradient of a per-channel affine scale (LayerNorm / GroupNorm weight): sum_s xhat * G."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dpkernels.triton._common import check_dtype, configs

AFFINE_CONFIGS = [triton.Config({"BLOCK_R": 1, "BLOCK_S": 1024}, num_warps=4)]


@triton.autotune(configs=configs(AFFINE_CONFIGS, triton.Config({"BLOCK_R": 4, "BLOCK_S": 32})), key=["S"])
@triton.jit
def _affine_kernel(x_ptr, g_ptr, out_ptr, R, S, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """out[r] = sum_s x[r, s] * g[r, s] for rows r = (b, c) of [B*C, S]."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_R, BLOCK_S], dtype=tl.float32)
    for start in range(0, S, BLOCK_S):
        cols = start + tl.arange(0, BLOCK_S)
        mask = (rows[:, None] < R) & (cols[None, :] < S)
        idx = rows[:, None] * S + cols[None, :]
        x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        acc += x * g
    tl.store(out_ptr + rows, tl.sum(acc, axis=1), mask=rows < R)


def affine_grad_sample(xhat: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Per-sample gradient of a per-channel scale: sum over S of xhat * G.

    Args:
        xhat: the normalised input, [B, C, S], fp32/fp16/bf16.
        G: the gradient of the layer's output, same shape and dtype family.

    Returns:
        [B, C] fp32.
    """
    check_dtype(xhat, G)
    if xhat.shape != G.shape:
        raise ValueError(f"xhat {tuple(xhat.shape)} and G {tuple(G.shape)} must have the same shape")
    out = torch.empty(G.shape[:-1], dtype=torch.float32, device=G.device)
    R, S = out.numel(), G.shape[-1]
    if R == 0:
        return out
    if S == 0:
        return out.zero_()
    x, g = xhat.contiguous(), G.contiguous()
    _affine_kernel[lambda meta: (triton.cdiv(R, meta["BLOCK_R"]),)](x, g, out, R, S)
    return out
