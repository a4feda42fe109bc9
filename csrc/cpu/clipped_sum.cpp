// Fused clipped sum of a linear layer: W = sum_b c_b G_b^T A_b + noise, b = sum_b cb_b sum_t G_b[t] + noise.
//
// The weight part is ONE GEMM over the B*T reduction, done in bounded chunks of samples: the
// per-sample factor is folded into an upcast copy of the narrower operand (G, or A when d < p)
// and the chunk is accumulated into the acc-dtype output by BLAS (addmm). Noise from the
// Philox stream is added before returning; B = 0 gives pure noise.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "common.h"

namespace dpkernels::cpu {
namespace {

constexpr int64_t kChunkElems = 1 << 22;  // scratch elements per chunk (16 MB in fp32)

// dst[r, :] = factor[sample of row r] * src[r, :] (upcast to acc_t), rows [0, rows).
template <typename scalar_t, typename acc_t>
void scale_rows(const scalar_t* src, acc_t* dst, const acc_t* factor, int64_t rows, int64_t n, int64_t T) {
  at::parallel_for(0, rows, std::max<int64_t>(1, kElementGrain / std::max<int64_t>(n, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const acc_t f = factor[r / T];
      const scalar_t* s = src + r * n;
      acc_t* o = dst + r * n;
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) o[k] = f * static_cast<acc_t>(s[k]);
    }
  });
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> clipped_sum_typed(const at::Tensor& A, const at::Tensor& G, const at::Tensor& c,
                                                     const std::optional<at::Tensor>& c_bias, const LinearDims& s,
                                                     double noise_std, int64_t seed, int64_t offset) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t B = s.B, T = s.T, d = s.d, p = s.p, R = B * T;
  const auto opts = A.options().dtype(acc);
  at::Tensor W = at::zeros({p, d}, opts);
  at::Tensor bias = c_bias.has_value() ? at::zeros({p}, opts) : at::empty({0}, opts);
  const at::Tensor cf = plain(c.to(acc));

  if (R > 0 && p > 0 && d > 0) {
    const at::Tensor A2 = A.view({R, d}), G2 = G.view({R, p});
    const bool scale_a = d < p;  // fold c into the narrower operand
    const int64_t n_scaled = scale_a ? d : p, n_other = scale_a ? p : d;
    const bool upcast_other = A.scalar_type() != acc;
    const int64_t per_row = n_scaled + (upcast_other ? n_other : 0);
    const int64_t nb = std::max<int64_t>(1, kChunkElems / std::max<int64_t>(1, T * per_row));
    at::Tensor scratch_s = at::empty({std::min(nb, B) * T, n_scaled}, opts);
    at::Tensor scratch_o = upcast_other ? at::empty({std::min(nb, B) * T, n_other}, opts) : at::Tensor();
    for (int64_t b0 = 0; b0 < B; b0 += nb) {
      const int64_t rows = std::min(nb, B - b0) * T, r0 = b0 * T;
      const at::Tensor src_s = (scale_a ? A2 : G2).narrow(0, r0, rows);
      at::Tensor scaled = scratch_s.narrow(0, 0, rows);
      scale_rows<scalar_t, acc_t>(src_s.data_ptr<scalar_t>(), scaled.data_ptr<acc_t>(), cf.data_ptr<acc_t>() + b0,
                                  rows, n_scaled, T);
      at::Tensor other = (scale_a ? G2 : A2).narrow(0, r0, rows);
      if (upcast_other) other = scratch_o.narrow(0, 0, rows).copy_(other);
      const at::Tensor& Gc = scale_a ? other : scaled;
      const at::Tensor& Ac = scale_a ? scaled : other;
      W.addmm_(Gc.t(), Ac);  // BLAS: W += Gc^T Ac over this chunk's rows
    }
    if (c_bias.has_value()) {
      const at::Tensor cb = plain(c_bias->to(acc));
      const acc_t* cbp = cb.data_ptr<acc_t>();
      const scalar_t* Gp = G2.data_ptr<scalar_t>();
      acc_t* bp = bias.data_ptr<acc_t>();
      at::parallel_for(0, p, 64, [&](int64_t j0, int64_t j1) {  // threads own columns: no races
        for (int64_t r = 0; r < R; ++r) {
          const acc_t f = cbp[r / T];
          const scalar_t* row = Gp + r * p;
#pragma omp simd
          for (int64_t j = j0; j < j1; ++j) bp[j] += f * static_cast<acc_t>(row[j]);
        }
      });
    }
  }
  add_philox_noise(W, noise_std, seed, offset);
  if (c_bias.has_value()) {
    add_philox_noise(bias, noise_std, seed, offset + static_cast<int64_t>(round_up4(static_cast<uint64_t>(p * d))));
  }
  return {W, bias};
}

std::tuple<at::Tensor, at::Tensor> clipped_sum_cpu(const at::Tensor& A_, const at::Tensor& G_, const at::Tensor& c,
                                                   const std::optional<at::Tensor>& c_bias, double noise_std,
                                                   int64_t seed, int64_t offset) {
  const LinearDims s = check_linear(A_, G_, "clipped_sum");
  check_factors(c, s.B, "c", "clipped_sum");
  if (c_bias.has_value()) check_factors(*c_bias, s.B, "c_bias", "clipped_sum");
  check_noise_args(noise_std, seed, offset, "clipped_sum");
  at::Tensor A = plain(A_), G = plain(G_);
  if (A.scalar_type() != G.scalar_type()) {  // rare: both to the accumulation dtype
    const at::ScalarType acc = acc_type(A.scalar_type());
    A = A.to(acc);
    G = G.to(acc);
  }
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "clipped_sum", [&] {
    out = clipped_sum_typed<scalar_t>(A, G, c, c_bias, s, noise_std, seed, offset);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dpkernels, CPU, m) { m.impl("clipped_sum", TORCH_FN(clipped_sum_cpu)); }

}  // namespace dpkernels::cpu
