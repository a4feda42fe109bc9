// Helpers for the C++ CPU kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>

#include "dpkernels/checks.h"
#include "dpkernels/philox.h"

namespace dpkernels::cpu {

// Work grain for elementwise loops: big enough that thread start-up does not dominate.
constexpr int64_t kElementGrain = 1 << 14;

// Plain view of `n` elements at `ptr` as a [rows, cols] row-major tensor (no autograd
// metadata, no allocation): lets worker threads hand bounded pieces to at::mm_out.
inline at::Tensor view2d(void* ptr, int64_t rows, int64_t cols, int64_t ld, at::ScalarType dtype) {
  return at::from_blob(ptr, {rows, cols}, {ld, 1}, at::TensorOptions().dtype(dtype));
}

// Contiguous tensor with no autograd history, so worker threads never touch autograd state.
inline at::Tensor plain(const at::Tensor& t) { return t.detach().contiguous(); }

// out[i] += std * z(offset + i) for a contiguous tensor, with the stream of
// reference.philox_normal; rounding follows `x.add_(std * z.to(x.dtype))`.
void add_philox_noise(at::Tensor& out, double std, int64_t seed, int64_t offset);

}  // namespace dpkernels::cpu
