// Counter-based Gaussian noise shared by the C++ CPU and the CUDA kernels.
//
// Element i of a noise tensor is the normal for counter n = offset + i: Philox4x32-10
// encrypts block (n / 4 as a 64-bit counter in words 0, 1; words 2, 3 = 0) under key
// (seed lo32, seed hi32), and lane n % 4 picks one of the four normals that the block's
// two Box-Muller pairs give. Box-Muller runs in double, exactly as
// dpkernels.reference.philox_normal, so every backend draws the same stream.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DPK_HOST_DEVICE __host__ __device__
#else
#define DPK_HOST_DEVICE
#endif

namespace dpkernels {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

DPK_HOST_DEVICE inline void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  lo = a * b;
  hi = __umulhi(a, b);
#else
  const uint64_t prod = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(prod >> 32);
  lo = static_cast<uint32_t>(prod);
#endif
}

// Philox4x32-10 of block (counter lo, counter hi, 0, 0) with key (seed lo, seed hi).
DPK_HOST_DEVICE inline void philox4x32_10(uint64_t counter, uint64_t seed, uint32_t out[4]) {
  uint32_t c0 = static_cast<uint32_t>(counter);
  uint32_t c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0u;
  uint32_t c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kPhiloxM0, c0, hi0, lo0);
    mulhilo32(kPhiloxM1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// uint32 -> (0, 1); never 0, so the log below is finite.
DPK_HOST_DEVICE inline double uint32_to_unit(uint32_t x) {
  return (static_cast<double>(x) + 0.5) * (1.0 / 4294967296.0);
}

// The four standard normals of Philox block `block`.
DPK_HOST_DEVICE inline void philox_normal4(uint64_t block, uint64_t seed, double z[4]) {
  uint32_t r[4];
  philox4x32_10(block, seed, r);
  const double two_pi = 2.0 * 3.14159265358979323846;
  const double u0 = uint32_to_unit(r[0]), u1 = uint32_to_unit(r[1]);
  const double u2 = uint32_to_unit(r[2]), u3 = uint32_to_unit(r[3]);
  const double r01 = sqrt(-2.0 * log(u0));
  const double r23 = sqrt(-2.0 * log(u2));
  z[0] = r01 * cos(two_pi * u1);
  z[1] = r01 * sin(two_pi * u1);
  z[2] = r23 * cos(two_pi * u3);
  z[3] = r23 * sin(two_pi * u3);
}

// The standard normal for counter n (one element; a loop over a tensor should call
// philox_normal4 once per block of four instead).
DPK_HOST_DEVICE inline double philox_normal(uint64_t n, uint64_t seed) {
  double z[4];
  philox_normal4(n >> 2, seed, z);
  return z[n & 3];
}

// Bias noise of a fused clipped sum starts at offset + round_up4(p * d).
DPK_HOST_DEVICE inline uint64_t round_up4(uint64_t n) { return (n + 3) / 4 * 4; }

// Flat clipping factor c = min(1, C / (||g|| + 1e-6)) from a squared norm.
template <typename T>
DPK_HOST_DEVICE inline T clip_factor(T sq_norm, T max_norm) {
  const T f = max_norm / (sqrt(sq_norm) + static_cast<T>(1e-6));
  return f < static_cast<T>(1) ? f : static_cast<T>(1);
}

}  // namespace dpkernels
