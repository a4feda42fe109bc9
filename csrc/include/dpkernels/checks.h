// Input checks and shape arithmetic shared by the CPU, CUDA and Meta kernels.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace dpkernels {

// float64 stays float64; everything else accumulates (and is returned) in float32.
inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_floating(const at::Tensor& t, const char* name, const char* op) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16, "dpkernels.", op,
              ": ", name, " must be float32, float64, float16 or bfloat16, got ", s);
}

inline void check_noise_args(double noise_std, int64_t seed, int64_t offset, const char* op) {
  TORCH_CHECK(noise_std >= 0.0, "dpkernels.", op, ": noise_std must be >= 0, got ", noise_std);
  TORCH_CHECK(seed >= 0, "dpkernels.", op, ": seed must be a non-negative 64-bit int, got ", seed);
  TORCH_CHECK(offset >= 0, "dpkernels.", op, ": offset must be >= 0, got ", offset);
}

// A linear layer's input A [B, d] / [B, T, d] / [B, ..., d] and output gradient G with the
// same leading dims and its own last dim p, seen as [B, T, d] and [B, T, p].
struct LinearDims {
  int64_t B, T, d, p;
};

inline LinearDims check_linear(const at::Tensor& A, const at::Tensor& G, const char* op) {
  TORCH_CHECK(A.dim() >= 2, "dpkernels.", op, ": A must be [B, d] or [B, T, d], got shape ", A.sizes());
  TORCH_CHECK(G.dim() == A.dim(), "dpkernels.", op, ": G must have the same rank as A (A ", A.sizes(), ", G ",
              G.sizes(), ")");
  TORCH_CHECK(A.size(0) == G.size(0), "dpkernels.", op, ": A and G disagree on the batch size B (A ", A.sizes(),
              ", G ", G.sizes(), ")");
  int64_t T = 1;
  for (int64_t i = 1; i + 1 < A.dim(); ++i) {
    TORCH_CHECK(A.size(i) == G.size(i), "dpkernels.", op, ": A and G disagree on the token dims (A ", A.sizes(),
                ", G ", G.sizes(), ")");
    T *= A.size(i);
  }
  check_floating(A, "A", op);
  check_floating(G, "G", op);
  TORCH_CHECK(A.device() == G.device(), "dpkernels.", op, ": A and G must be on the same device");
  return {A.size(0), T, A.size(-1), G.size(-1)};
}

// Per-sample factors c: a float tensor with B entries.
inline void check_factors(const at::Tensor& c, int64_t B, const char* name, const char* op) {
  TORCH_CHECK(c.dim() == 1 && c.size(0) == B, "dpkernels.", op, ": ", name, " must have shape [B] = [", B,
              "], got ", c.sizes());
  TORCH_CHECK(c.is_floating_point(), "dpkernels.", op, ": ", name, " must be a float tensor, got ", c.scalar_type());
}

}  // namespace dpkernels
