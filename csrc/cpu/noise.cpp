// Gaussian noise from the Philox stream: the epilogue of every clipped sum, and add_noise_.
#include <ATen/OpMathType.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "common.h"

namespace dpkernels::cpu {

// Box-Muller for a batch of Philox blocks, written so the compiler vectorises it: libm's log,
// sin and cos are scalar calls, so they are replaced by branch-free polynomials in double
// (|error| ~1e-16 relative for log, ~1e-15 absolute for sin/cos: the reference's own argument
// 2*pi*u carries that much rounding), far below float32 rounding of the noise.
constexpr int kBatch = 64;  // Philox blocks per batch (256 normals)

// A small unsigned integer (< 2^52) as a double, by bits: vectorises where int64 -> double does not.
static inline double small_u64_to_double(uint64_t v) {
  const uint64_t bits = 0x4330000000000000ull | v;  // 2^52 + v
  double d;
  std::memcpy(&d, &bits, sizeof d);
  return d - 4503599627370496.0;
}

static inline double log_unit(double u) {  // log(u) for a normal double u > 0
  uint64_t bits;
  std::memcpy(&bits, &u, sizeof bits);
  const uint64_t mbits = (bits & 0x000FFFFFFFFFFFFFull) | 0x3FF0000000000000ull;
  double m;
  std::memcpy(&m, &mbits, sizeof m);  // u = m * 2^e, m in [1, 2)
  // centre m on 1 (m in [sqrt(1/2), sqrt(2))); the sign bit of a wrapped difference, not a
  // comparison, so the compiler emits no branch and vectorises the loop
  constexpr uint64_t kSqrt2Bits = 0x3FF6A09E667F3BCDull;
  const double big = small_u64_to_double((kSqrt2Bits - mbits) >> 63);
  m *= 1.0 - 0.5 * big;
  const double k = small_u64_to_double(bits >> 52) - 1023.0 + big;
  const double f = m - 1.0;
  const double s = f / (2.0 + f);  // log(m) = 2 atanh(s), |s| < 0.172
  const double z = s * s;
  // sum_j z^j / (2j + 1), j <= 12 (written out: inner loops would stop the vectoriser)
  double poly = 1.0 / 25;
  poly = poly * z + 1.0 / 23;
  poly = poly * z + 1.0 / 21;
  poly = poly * z + 1.0 / 19;
  poly = poly * z + 1.0 / 17;
  poly = poly * z + 1.0 / 15;
  poly = poly * z + 1.0 / 13;
  poly = poly * z + 1.0 / 11;
  poly = poly * z + 1.0 / 9;
  poly = poly * z + 1.0 / 7;
  poly = poly * z + 1.0 / 5;
  poly = poly * z + 1.0 / 3;
  poly = poly * z + 1.0;
  return k * 0.6931471805599453094 + 2.0 * s * poly;
}

// Taylor coefficients (-1)^j / (2j+1)! and (-1)^j / (2j)!, j = 0..9: enough for |t| <= pi/4.
constexpr double kSin[10] = {1.0, -1.0 / 6, 1.0 / 120, -1.0 / 5040, 1.0 / 362880, -1.0 / 39916800,
                             1.0 / 6227020800.0, -1.0 / 1307674368000.0, 1.0 / 355687428096000.0,
                             -1.0 / 121645100408832000.0};
constexpr double kCos[10] = {1.0, -1.0 / 2, 1.0 / 24, -1.0 / 720, 1.0 / 40320, -1.0 / 3628800,
                             1.0 / 479001600.0, -1.0 / 87178291200.0, 1.0 / 20922789888000.0,
                             -1.0 / 6402373705728000.0};

// cos(2 pi u), sin(2 pi u) for u = (x + 0.5) 2^-32: the quadrant q = round(4u) comes exactly
// from the bits of x, the rest t = 2 pi (u - q/4), |t| <= pi/4, by Taylor.
static inline void sincos_2pi(uint64_t x, double& c_out, double& s_out) {
  const uint64_t q = (x + (1ull << 29)) >> 30;  // floor(4u + 1/2), 0..4
  const double u = (small_u64_to_double(x) + 0.5) * (1.0 / 4294967296.0);
  const double t = 6.283185307179586477 * (u - 0.25 * small_u64_to_double(q));
  const double t2 = t * t;
  double sp = kSin[9], cp = kCos[9];  // Horner, written out for the vectoriser
  sp = sp * t2 + kSin[8];
  cp = cp * t2 + kCos[8];
  sp = sp * t2 + kSin[7];
  cp = cp * t2 + kCos[7];
  sp = sp * t2 + kSin[6];
  cp = cp * t2 + kCos[6];
  sp = sp * t2 + kSin[5];
  cp = cp * t2 + kCos[5];
  sp = sp * t2 + kSin[4];
  cp = cp * t2 + kCos[4];
  sp = sp * t2 + kSin[3];
  cp = cp * t2 + kCos[3];
  sp = sp * t2 + kSin[2];
  cp = cp * t2 + kCos[2];
  sp = sp * t2 + kSin[1];
  cp = cp * t2 + kCos[1];
  sp = sp * t2 + kSin[0];
  cp = cp * t2 + kCos[0];
  const double sv = t * sp, cv = cp;
  // cos/sin(t + q pi/2), branch-free (vectorises): odd q swap cos and sin; q = 1, 2 negate
  // cos; q = 2, 3 negate sin (q = 4 is q = 0)
  const double swap = small_u64_to_double(q & 1);
  const double neg_c = small_u64_to_double(((q + 1) >> 1) & 1);
  const double neg_s = small_u64_to_double((q >> 1) & 1);
  c_out = (cv * (1.0 - swap) + sv * swap) * (1.0 - 2.0 * neg_c);
  s_out = (sv * (1.0 - swap) + cv * swap) * (1.0 - 2.0 * neg_s);
}

// z[4 * k + lane] = the normals of Philox blocks first .. first + n - 1 (n <= kBatch).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
static void normals_batch(uint64_t first, int n, uint64_t seed, double* z) {
  uint64_t x0[kBatch], x1[kBatch], x2[kBatch], x3[kBatch];
  for (int k = 0; k < n; ++k) {
    uint32_t r[4];
    philox4x32_10(first + static_cast<uint64_t>(k), seed, r);
    x0[k] = r[0];
    x1[k] = r[1];
    x2[k] = r[2];
    x3[k] = r[3];
  }
#pragma omp simd
  for (int k = 0; k < n; ++k) {
    const double r01 = std::sqrt(-2.0 * log_unit((small_u64_to_double(x0[k]) + 0.5) * (1.0 / 4294967296.0)));
    const double r23 = std::sqrt(-2.0 * log_unit((small_u64_to_double(x2[k]) + 0.5) * (1.0 / 4294967296.0)));
    double c1, s1, c3, s3;
    sincos_2pi(x1[k], c1, s1);
    sincos_2pi(x3[k], c3, s3);
    z[4 * k + 0] = r01 * c1;
    z[4 * k + 1] = r01 * s1;
    z[4 * k + 2] = r23 * c3;
    z[4 * k + 3] = r23 * s3;
  }
}

template <typename scalar_t>
static void add_noise_typed(scalar_t* x, int64_t n, double std, uint64_t seed, uint64_t offset) {
  using op_t = at::opmath_type<scalar_t>;
  const op_t s = static_cast<op_t>(std);
  const uint64_t first = offset / 4;
  const uint64_t last = (offset + static_cast<uint64_t>(n) - 1) / 4;  // inclusive
  const int64_t nbatches = static_cast<int64_t>((last - first) / kBatch + 1);
  at::parallel_for(0, nbatches, kElementGrain / (4 * kBatch), [&](int64_t lo, int64_t hi) {
    double z[4 * kBatch];
    for (int64_t bi = lo; bi < hi; ++bi) {
      const uint64_t b0 = first + static_cast<uint64_t>(bi) * kBatch;
      const int nb = static_cast<int>(std::min<uint64_t>(kBatch, last + 1 - b0));
      normals_batch(b0, nb, seed, z);
      // counters [c0, c1) of this batch that fall inside the tensor
      const uint64_t c0 = std::max(b0 * 4, offset), c1 = std::min((b0 + nb) * 4, offset + static_cast<uint64_t>(n));
      for (uint64_t ctr = c0; ctr < c1; ++ctr) {
        scalar_t& v = x[ctr - offset];
        // same roundings as the reference: z to the tensor's dtype, times std, then added
        const scalar_t noise = static_cast<scalar_t>(s * static_cast<op_t>(static_cast<scalar_t>(z[ctr - b0 * 4])));
        v = static_cast<scalar_t>(static_cast<op_t>(v) + static_cast<op_t>(noise));
      }
    }
  });
}

void add_philox_noise(at::Tensor& out, double std, int64_t seed, int64_t offset) {
  TORCH_INTERNAL_ASSERT(out.is_contiguous());
  if (std == 0.0 || out.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "add_philox_noise", [&] {
    add_noise_typed<scalar_t>(out.data_ptr<scalar_t>(), out.numel(), std, static_cast<uint64_t>(seed),
                              static_cast<uint64_t>(offset));
  });
}

static at::Tensor add_noise_cpu(at::Tensor x, double std, int64_t seed, int64_t offset) {
  check_floating(x, "x", "add_noise_");
  check_noise_args(std, seed, offset, "add_noise_");
  if (x.is_contiguous()) {
    at::Tensor y = x.detach();
    add_philox_noise(y, std, seed, offset);
  } else {  // counters follow the row-major order of the logical shape
    at::Tensor y = x.detach().contiguous();
    add_philox_noise(y, std, seed, offset);
    x.detach().copy_(y);
  }
  return x;
}

TORCH_LIBRARY_IMPL(dpkernels, CPU, m) { m.impl("add_noise_", TORCH_FN(add_noise_cpu)); }

}  // namespace dpkernels::cpu
