// Device-side access to the contract's Gaussian stream (dpkernels/philox.h).
#pragma once

#include <cstdint>

#include "dpkernels/philox.h"

namespace dpkernels {
namespace cuda {

// Reads normals for increasing counters. One Philox block yields four normals; a thread that
// walks consecutive counters computes each block once instead of once per element.
struct NoiseCursor {
  uint64_t seed;
  uint64_t block = ~0ull;
  double z[4];

  __device__ explicit NoiseCursor(uint64_t s) : seed(s) {}

  __device__ __forceinline__ double operator()(uint64_t n) {
    if ((n >> 2) != block) {
      block = n >> 2;
      philox_normal4(block, seed, z);
    }
    return z[n & 3];
  }
};

}  // namespace cuda
}  // namespace dpkernels
