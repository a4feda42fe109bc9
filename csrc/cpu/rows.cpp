// Per-sample parameters that are plain rows (e.g. norm-layer affine grads already formed per
// sample): squared norms ||X_b||^2, and the clipped sum sum_b c_b X_b + noise.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common.h"

namespace dpkernels::cpu {
namespace {

constexpr int64_t kRowChunk = 1 << 16;  // elements of one sample per work item

template <typename scalar_t>
at::Tensor sq_norms_typed(const at::Tensor& X, int64_t B, int64_t N) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  at::Tensor out = at::empty({B}, X.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  if (B == 0) return out;
  const int64_t nc = std::max<int64_t>(1, (N + kRowChunk - 1) / kRowChunk);
  std::vector<double> partial(B * nc, 0.0);
  const scalar_t* xp = X.data_ptr<scalar_t>();
  at::parallel_for(0, B * nc, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t b = item / nc, k0 = (item % nc) * kRowChunk, k1 = std::min(N, k0 + kRowChunk);
      const scalar_t* row = xp + b * N;
      double s = 0.0;
#pragma omp simd reduction(+ : s)
      for (int64_t k = k0; k < k1; ++k) {
        const double v = static_cast<double>(row[k]);
        s += v * v;
      }
      partial[item] = s;
    }
  });
  acc_t* op = out.data_ptr<acc_t>();
  for (int64_t b = 0; b < B; ++b) {
    double s = 0.0;
    for (int64_t k = 0; k < nc; ++k) s += partial[b * nc + k];
    op[b] = static_cast<acc_t>(s);
  }
  return out;
}

at::Tensor sq_norms_cpu(const at::Tensor& X_) {
  TORCH_CHECK(X_.dim() >= 1, "dpkernels.sq_norms: X must be [B, ...], got a 0-d tensor");
  check_floating(X_, "X", "sq_norms");
  const at::Tensor X = plain(X_);
  const int64_t B = X.size(0), N = B ? X.numel() / B : 0;
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, X.scalar_type(), "sq_norms",
                                  [&] { out = sq_norms_typed<scalar_t>(X, B, N); });
  return out;
}

template <typename scalar_t>
void clipped_rows_typed(const at::Tensor& X, const at::Tensor& cf, at::Tensor& out, int64_t B, int64_t N) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const scalar_t* xp = X.data_ptr<scalar_t>();
  const acc_t* cp = cf.data_ptr<acc_t>();
  acc_t* op = out.data_ptr<acc_t>();
  // threads own column ranges of the output: no races, every sample streamed once per range
  at::parallel_for(0, N, 1024, [&](int64_t k0, int64_t k1) {
    for (int64_t b = 0; b < B; ++b) {
      const acc_t f = cp[b];
      const scalar_t* row = xp + b * N;
#pragma omp simd
      for (int64_t k = k0; k < k1; ++k) op[k] += f * static_cast<acc_t>(row[k]);
    }
  });
}

at::Tensor clipped_rows_sum_cpu(const at::Tensor& X_, const at::Tensor& c, double noise_std, int64_t seed,
                                int64_t offset) {
  TORCH_CHECK(X_.dim() >= 1, "dpkernels.clipped_rows_sum: X must be [B, ...], got a 0-d tensor");
  check_floating(X_, "X", "clipped_rows_sum");
  check_factors(c, X_.size(0), "c", "clipped_rows_sum");
  check_noise_args(noise_std, seed, offset, "clipped_rows_sum");
  const at::Tensor X = plain(X_);
  const at::ScalarType acc = acc_type(X.scalar_type());
  at::Tensor out = at::zeros(X.sizes().slice(1), X.options().dtype(acc));
  const int64_t B = X.size(0), N = out.numel();
  if (B > 0 && N > 0) {
    const at::Tensor cf = plain(c.to(acc));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, X.scalar_type(), "clipped_rows_sum",
                                    [&] { clipped_rows_typed<scalar_t>(X, cf, out, B, N); });
  }
  add_philox_noise(out, noise_std, seed, offset);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dpkernels, CPU, m) {
  m.impl("sq_norms", TORCH_FN(sq_norms_cpu));
  m.impl("clipped_rows_sum", TORCH_FN(clipped_rows_sum_cpu));
}

}  // namespace dpkernels::cpu
