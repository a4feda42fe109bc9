"""Counter-based Gaussian noise in Triton: the exact stream of `dpkernels.reference.philox_normal`.

Element with counter n (int64) is lane n % 4 of Philox4x32-10 of block (n // 4 as 64-bit
counter in words 0, 1; words 2, 3 = 0) under key (seed lo32, seed hi32), turned into normals by
Box-Muller: z0, z1 from lanes 0, 1; z2, z3 from lanes 2, 3. Each element computes its own block
(4x redundant Philox, but noise is a small, compute-cheap part of any kernel that uses it).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

from dpkernels.triton._common import INTERPRET

# Kernels may only read globals that are tl.constexpr instances.
PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)
TWO_PI = tl.constexpr(6.283185307179586)
INV_2_32 = tl.constexpr(2.3283064365386963e-10)  # 2^-32
# On the GPU, libdevice's correctly rounded-ish logf/sinf/cosf, not the .approx instructions: near
# u = 1, log's absolute error would dominate sqrt(-2 ln u). The interpreter has no libdevice.
USE_LIBDEVICE = tl.constexpr(not INTERPRET)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Ten Philox rounds on uint32 tensors (Random123's Philox4x32-10).

    Args:
        c0, c1, c2, c3: the counter words; k0, k1: the key words.

    Returns:
        The four output words.
    """
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, PHILOX_M0)
        lo0 = c0 * PHILOX_M0  # uint32 wraps: the low word of the 64-bit product
        hi1 = tl.umulhi(c2, PHILOX_M1)
        lo1 = c2 * PHILOX_M1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + PHILOX_W0
        k1 = k1 + PHILOX_W1
    return c0, c1, c2, c3


@triton.jit
def normal_at(n, seed_lo, seed_hi):
    """Standard normal (fp32) for int64 counters n >= 0: the stream of `dpkernels.reference.philox_normal`.

    Args:
        n: int64 counters; seed_lo, seed_hi: the key words.

    Returns:
        fp32 normals shaped like n.
    """
    block = n // 4
    lane = n % 4
    c0 = block.to(tl.uint32)  # truncation keeps the low word
    c1 = (block >> 32).to(tl.uint32)
    zero = tl.zeros_like(c0)
    k0 = (zero + seed_lo.to(tl.uint32))
    k1 = (zero + seed_hi.to(tl.uint32))
    x0, x1, x2, x3 = philox4x32_10(c0, c1, zero, zero, k0, k1)
    # lanes 0, 1 use the pair (x0, x1); lanes 2, 3 the pair (x2, x3)
    xr = tl.where(lane < 2, x0, x2)
    xa = tl.where(lane < 2, x1, x3)
    # ln u with u = (x + 0.5) 2^-32. For u >= 1/2 the fp32 u is too coarse near 1 (and there
    # sqrt(-2 ln u) magnifies the error), so use v = 1 - u, exact in fp32, and Kahan's
    # log1p(-v) = ln(w) * (-v) / (w - 1) with w = 1 - v; for u < 1/2, ln u directly.
    u_r = xr.to(tl.float32) * INV_2_32 + 0.5 * INV_2_32
    v_r = (xr ^ 0xFFFFFFFF).to(tl.float32) * INV_2_32 + 0.5 * INV_2_32  # (2^32 - 1 - x + 0.5) 2^-32
    w_r = 1.0 - v_r
    upper = xr >= 0x80000000
    u_a = xa.to(tl.float32) * INV_2_32 + 0.5 * INV_2_32
    theta = TWO_PI * u_a
    if USE_LIBDEVICE:
        ln_w = libdevice.log(tl.where(upper, w_r, u_r))
        trig = tl.where(lane % 2 == 0, libdevice.cos(theta), libdevice.sin(theta))
    else:
        ln_w = tl.log(tl.where(upper, w_r, u_r))
        trig = tl.where(lane % 2 == 0, tl.cos(theta), tl.sin(theta))
    w_minus_1 = tl.where(upper & (w_r != 1.0), w_r - 1.0, -1.0)  # the divisor, safe in unused lanes
    ln_u = tl.where(upper, tl.where(w_r == 1.0, -v_r, tl.div_rn(ln_w * (-v_r), w_minus_1)), ln_w)
    r = tl.sqrt_rn(-2.0 * ln_u)
    return r * trig
