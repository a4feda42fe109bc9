"""Counter-based Gaussian noise in Triton: the exact stream of `dpkernels.reference.philox_normal`.

Element with counter n (int64) is lane n % 4 of Philox4x32-10 of block (n // 4 as 64-bit
counter in words 0, 1; words 2, 3 = 0) under key (seed lo32, seed hi32), turned into normals by
Box-Muller: z0, z1 from lanes 0, 1; z2, z3 from lanes 2, 3. Each element computes its own block
(4x redundant Philox, but noise is a small, compute-cheap part of any kernel that uses it).
"""

from __future__ import annotations

import triton
import triton.language as tl

PHILOX_M0: tl.constexpr = 0xD2511F53
PHILOX_M1: tl.constexpr = 0xCD9E8D57
PHILOX_W0: tl.constexpr = 0x9E3779B9
PHILOX_W1: tl.constexpr = 0xBB67AE85
TWO_PI: tl.constexpr = 6.283185307179586
INV_2_32: tl.constexpr = 2.3283064365386963e-10  # 2^-32


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Ten Philox rounds on uint32 tensors (Random123's Philox4x32-10)."""
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
    """Standard normal (fp32) for int64 counters n >= 0; seed_lo, seed_hi are the key words."""
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
    u_r = xr.to(tl.float32) * INV_2_32 + 0.5 * INV_2_32  # (x + 0.5) * 2^-32, never 0
    u_a = xa.to(tl.float32) * INV_2_32 + 0.5 * INV_2_32
    r = tl.sqrt(-2.0 * tl.log(u_r))
    theta = TWO_PI * u_a
    return r * tl.where(lane % 2 == 0, tl.cos(theta), tl.sin(theta))
