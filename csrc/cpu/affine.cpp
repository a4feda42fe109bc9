// Per-sample gradient of a per-channel scale (LayerNorm / GroupNorm weight):
// xhat, G [B, C, S] -> [B, C] = sum_s xhat * G. Rows (b, c) are independent dot products.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>

#include "common.h"

namespace dpkernels::cpu {
namespace {

template <typename scalar_t>
void affine_typed(const at::Tensor& xhat, const at::Tensor& G, at::Tensor& out, int64_t rows, int64_t S) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const scalar_t* xp = xhat.data_ptr<scalar_t>();
  const scalar_t* gp = G.data_ptr<scalar_t>();
  acc_t* op = out.data_ptr<acc_t>();
  at::parallel_for(0, rows, std::max<int64_t>(1, kElementGrain / std::max<int64_t>(S, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      double s = 0.0;
#pragma omp simd reduction(+ : s)
      for (int64_t k = 0; k < S; ++k) s += static_cast<double>(xp[r * S + k]) * static_cast<double>(gp[r * S + k]);
      op[r] = static_cast<acc_t>(s);
    }
  });
}

// Channel-last layout (LayerNorm passes [B, S, C] tensors viewed as [B, C, S]): per sample, stream
// the S rows of C channels once, accumulating C partial sums; no transposed copies are made.
template <typename scalar_t>
void affine_channel_last(const at::Tensor& xhat, const at::Tensor& G, at::Tensor& out, int64_t B, int64_t C,
                         int64_t S) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const scalar_t* xp = xhat.data_ptr<scalar_t>();
  const scalar_t* gp = G.data_ptr<scalar_t>();
  acc_t* op = out.data_ptr<acc_t>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      acc_t* o = op + b * C;
      std::fill(o, o + C, acc_t(0));
      for (int64_t k = 0; k < S; ++k) {
        const scalar_t* x = xp + (b * S + k) * C;
        const scalar_t* g = gp + (b * S + k) * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) o[c] += static_cast<acc_t>(x[c]) * static_cast<acc_t>(g[c]);
      }
    }
  });
}

// True when t [B, C, S] is the transpose of a contiguous [B, S, C] tensor.
bool is_channel_last(const at::Tensor& t) {
  return t.dim() == 3 && t.stride(1) == 1 && t.stride(2) == t.size(1) && t.stride(0) == t.size(1) * t.size(2);
}

at::Tensor affine_grad_sample_cpu(const at::Tensor& xhat_, const at::Tensor& G_) {
  TORCH_CHECK(xhat_.dim() >= 2, "dpkernels.affine_grad_sample: xhat must be [B, C, S], got shape ", xhat_.sizes());
  TORCH_CHECK(xhat_.sizes() == G_.sizes(), "dpkernels.affine_grad_sample: xhat and G must have the same shape (xhat ",
              xhat_.sizes(), ", G ", G_.sizes(), ")");
  check_floating(xhat_, "xhat", "affine_grad_sample");
  check_floating(G_, "G", "affine_grad_sample");
  const at::ScalarType acc = acc_type(G_.scalar_type());
  if (is_channel_last(xhat_) && is_channel_last(G_) && xhat_.scalar_type() == G_.scalar_type()) {
    const int64_t B = G_.size(0), C = G_.size(1), S = G_.size(2);
    at::Tensor out = at::empty({B, C}, G_.options().dtype(acc));
    if (B > 0 && C > 0) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, G_.scalar_type(), "affine_grad_sample",
                                      [&] { affine_channel_last<scalar_t>(xhat_.detach(), G_.detach(), out, B, C, S); });
    }
    return out;
  }
  at::Tensor G = plain(G_), xhat = plain(xhat_);
  if (xhat.scalar_type() != G.scalar_type()) {  // rare: both to the accumulation dtype
    G = G.to(acc);
    xhat = xhat.to(acc);
  }
  at::Tensor out = at::empty(G.sizes().slice(0, G.dim() - 1), G.options().dtype(acc));
  const int64_t S = G.size(-1), rows = out.numel();
  if (rows > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, G.scalar_type(), "affine_grad_sample",
                                    [&] { affine_typed<scalar_t>(xhat, G, out, rows, S); });
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dpkernels, CPU, m) { m.impl("affine_grad_sample", TORCH_FN(affine_grad_sample_cpu)); }

}  // namespace dpkernels::cpu
