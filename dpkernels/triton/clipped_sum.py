"""Fused clipped sum + noise of a linear layer: W = sum_{b,t} c_b G[b,t]^T A[b,t] + std * N(0, I).

One GEMM over the B*T reduction: c_b is folded into the load of G (rounded toward zero when G is
half precision, so a clipped contribution never grows), the bias sum_b c_bias_b sum_t G[b,t] is
accumulated by the programs of the first d tile from the G tiles they load anyway, and the Philox
noise is added in the epilogue before the single store. When the output has too few tiles to fill
the GPU, the reduction is split (split-K): each split writes an fp32 partial and one small pass
sums the partials and adds the noise, so noise is still added exactly once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dpkernels.conventions import round_up4
from dpkernels.triton._common import INTERPRET, check_offset, configs, fp32_dot_precision, seed_words
from dpkernels.triton.linear_norms import linear_inputs
from dpkernels.triton.philox import normal_at
from dpkernels.triton.rows import rows_sum_noise

# Every GPU config (the first is the safe default); tests run each of them against the reference.
GEMM_CONFIGS = [
    triton.Config({"BLOCK_P": bp, "BLOCK_D": bd, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bp, bd, bk, w, s in [(64, 64, 32, 4, 4), (128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (128, 128, 64, 8, 3)]
]


@triton.autotune(configs=configs(GEMM_CONFIGS, triton.Config({"BLOCK_P": 16, "BLOCK_D": 16, "BLOCK_K": 16})),
                 key=["T", "d", "p"])
@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "offset", "bias_offset"])
def _clipped_sum_kernel(
    a_ptr, g_ptr, c_ptr, cb_ptr, w_out_ptr, b_out_ptr,
    K, T, d, p, k_per_split, std, seed_lo, seed_hi, offset, bias_offset,
    HAS_BIAS: tl.constexpr, HAS_NOISE: tl.constexpr, PARTIAL: tl.constexpr, UPCAST: tl.constexpr, DOT: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    split = tl.program_id(1)
    n_d = tl.cdiv(d, BLOCK_D)
    pt = tile // n_d
    dt = tile % n_d
    pcols = pt * BLOCK_P + tl.arange(0, BLOCK_P)
    dcols = dt * BLOCK_D + tl.arange(0, BLOCK_D)
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)  # rows of the [B*T, .] views
        k_ok = ks < k_hi
        c = tl.load(c_ptr + ks // T, mask=k_ok, other=0.0)
        g = tl.load(g_ptr + ks[:, None] * p + pcols[None, :], mask=k_ok[:, None] & (pcols[None, :] < p), other=0.0)
        a = tl.load(a_ptr + ks[:, None] * d + dcols[None, :], mask=k_ok[:, None] & (dcols[None, :] < d), other=0.0)
        g32 = g.to(tl.float32)
        if HAS_BIAS:
            cb = tl.load(cb_ptr + ks // T, mask=k_ok, other=0.0)
            b_acc += tl.sum(g32 * cb[:, None], axis=0)
        gc = g32 * c[:, None]
        if g_ptr.dtype.element_ty != tl.float32:
            gc = gc.to(g_ptr.dtype.element_ty, fp_downcast_rounding="rtz")  # |c G| never rounds up
        if UPCAST:  # the interpreter computes bf16/fp16 dots wrongly
            gc = gc.to(tl.float32)
            a = a.to(tl.float32)
        acc = tl.dot(tl.trans(gc), a, acc, input_precision=DOT)
    out_idx = pcols[:, None].to(tl.int64) * d + dcols[None, :]
    out_ok = (pcols[:, None] < p) & (dcols[None, :] < d)
    # The first d tile owns the bias. A branch, not `mask & (dt == 0)`: Triton >= 3.9's interpreter
    # turns a vector & scalar-bool into an int32 mask and its store refuses it.
    owns_bias = dt == 0
    if PARTIAL:  # split-K: fp32 partials, the reduce pass adds the noise
        tl.store(w_out_ptr + split.to(tl.int64) * p * d + out_idx, acc, mask=out_ok)
        if HAS_BIAS and owns_bias:
            tl.store(b_out_ptr + split * p + pcols, b_acc, mask=pcols < p)
    else:
        if HAS_NOISE:
            acc += std * normal_at(offset.to(tl.int64) + out_idx, seed_lo, seed_hi)
        tl.store(w_out_ptr + out_idx, acc, mask=out_ok)
        if HAS_BIAS and owns_bias:
            if HAS_NOISE:
                b_acc += std * normal_at(bias_offset.to(tl.int64) + pcols, seed_lo, seed_hi)
            tl.store(b_out_ptr + pcols, b_acc, mask=pcols < p)


def default_splits(K: int, p: int, d: int, device: torch.device) -> int:
    """Split the B*T reduction when (p, d) has fewer 64x64 tiles than ~2 waves of SMs; keep each split >= 256 rows.
    A host heuristic, not a compile-time key (B never recompiles).

    Args:
        K: rows of the reduction (B * T); p, d: the output's shape; device: where it runs.

    Returns:
        The number of splits (1 on CPU and under the interpreter).
    """
    if INTERPRET or device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    tiles = triton.cdiv(p, 64) * triton.cdiv(d, 64)
    if tiles >= 2 * sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, tiles), K // 256, 64))


def clipped_sum(
    A: torch.Tensor, G: torch.Tensor, c: torch.Tensor, c_bias: torch.Tensor | None,
    noise_std: float, seed: int, offset: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear layer's clipped, noised gradient sum in one fused pass.

    Args:
        A: [B, (T,) d]; G: [B, (T,) p]; fp32/fp16/bf16.
        c: clip factor per sample, [B]; c_bias: the bias's, [B], or None (no bias).
        noise_std: std of the noise; seed: Philox seed.
        offset: weight noise counters offset + i; the bias's start at offset + round_up4(p*d).

    Returns:
        (sum_b c_b G_b^T A_b + noise [p, d] fp32, sum_b c_bias_b sum_t G_b[t] + noise [p] fp32 or an empty tensor).
    """
    return clipped_sum_split(A, G, c, c_bias, noise_std, seed, offset, splits=None)


def clipped_sum_split(
    A: torch.Tensor, G: torch.Tensor, c: torch.Tensor, c_bias: torch.Tensor | None,
    noise_std: float, seed: int, offset: int, splits: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`clipped_sum` with the split-K count forced; tests use it on CPU.

    Args:
        A, G, c, c_bias, noise_std, seed, offset: as `clipped_sum`.
        splits: reduction splits (None: `default_splits`).

    Returns:
        As `clipped_sum`.
    """
    A3, G3 = linear_inputs(A, G)
    B, T, d = A3.shape
    p = G3.shape[2]
    K = B * T
    dev = A3.device
    lo, hi = seed_words(seed)
    check_offset(offset)
    bias_offset = offset + round_up4(p * d)
    has_bias = c_bias is not None
    w = torch.empty(p, d, dtype=torch.float32, device=dev)
    b = torch.empty(p if has_bias else 0, dtype=torch.float32, device=dev)
    c32 = c.to(device=dev, dtype=torch.float32).contiguous()
    cb32 = c_bias.to(device=dev, dtype=torch.float32).contiguous() if has_bias else c32
    if c32.shape != (B,) or cb32.shape != (B,):
        raise ValueError(f"c and c_bias must have shape ({B},)")
    if K == 0 or p * d == 0:  # empty Poisson batch (or empty layer): noise plus, for d = 0, the bias sum
        rows_sum_noise(None, None, w, noise_std, seed, offset)
        x = (G3.float() * cb32[:, None, None]).sum(1) if K and has_bias else None
        if has_bias:
            rows_sum_noise(x, None, b, noise_std, seed, bias_offset)
        return w, b
    splits = default_splits(K, p, d, dev) if splits is None else max(1, min(splits, K))
    k_per_split = triton.cdiv(K, splits)
    splits = triton.cdiv(K, k_per_split)  # no empty split
    partial = splits > 1
    w_out = torch.empty(splits, p, d, dtype=torch.float32, device=dev) if partial else w
    b_out = torch.zeros(splits, p, dtype=torch.float32, device=dev) if partial and has_bias else b
    upcast = INTERPRET and A3.dtype != torch.float32

    def grid(meta):
        return (triton.cdiv(p, meta["BLOCK_P"]) * triton.cdiv(d, meta["BLOCK_D"]), splits)

    _clipped_sum_kernel[grid](
        A3, G3, c32, cb32, w_out, b_out if has_bias else w_out,
        K, T, d, p, k_per_split, float(noise_std), lo, hi, offset, bias_offset,
        HAS_BIAS=has_bias, HAS_NOISE=noise_std != 0.0, PARTIAL=partial, UPCAST=upcast, DOT=fp32_dot_precision(),
    )
    if partial:
        rows_sum_noise(w_out.view(splits, -1), None, w.view(-1), noise_std, seed, offset)
        if has_bias:
            rows_sum_noise(b_out, None, b, noise_std, seed, bias_offset)
    return w, b
