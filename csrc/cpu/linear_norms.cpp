// Per-sample squared gradient norms of a linear layer, never materialising g_b = G_b^T A_b.
//
// ghost:  ||g_b||^2 = sum_{t,t'} (A_b A_b^T)_{tt'} (G_b G_b^T)_{tt'}, over tiles (i, j) of
//         tokens with i <= j (the Grams are symmetric: off-diagonal tiles count twice). Each
//         work item multiplies two bounded [tile, tile] Gram blocks in thread-local scratch
//         and reduces them at once: extra memory O(threads * tile^2), never B x T x T.
// direct: the [p, d] product G_b^T A_b tile by tile (p-tile x d-tile), squared sum taken
//         from thread-local scratch and the tile dropped.
// bias:   ||sum_t G_b[t]||^2, in the same pass (by the sample's first work item).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <utility>
#include <vector>

#include "common.h"

namespace dpkernels::cpu {
namespace {

constexpr int64_t kGhostTile = 256;   // tokens per Gram tile
constexpr int64_t kDirectTile = 256;  // rows/cols of the per-sample product per tile

// sum_i x[i] * y[i] with a double accumulator (n = one Gram tile: cheap next to the GEMMs).
template <typename acc_t>
double dot(const acc_t* x, const acc_t* y, int64_t n) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += static_cast<double>(x[i] * y[i]);
  return s;
}

// ||sum_t G[t]||^2 for one sample's G [T, p] (any float dtype), accumulated in acc_t.
template <typename scalar_t, typename acc_t>
acc_t bias_sq(const scalar_t* G, int64_t T, int64_t p, std::vector<acc_t>& colsum) {
  colsum.assign(p, acc_t(0));
  for (int64_t t = 0; t < T; ++t) {
    const scalar_t* row = G + t * p;
#pragma omp simd
    for (int64_t j = 0; j < p; ++j) colsum[j] += static_cast<acc_t>(row[j]);
  }
  double s = 0.0;
  for (int64_t j = 0; j < p; ++j) s += static_cast<double>(colsum[j]) * static_cast<double>(colsum[j]);
  return static_cast<acc_t>(s);
}

// Rows [r0, r0 + n) of a [rows, cols] matrix as an acc_t tensor: a view when the dtype already
// matches, else an upcast copy (bounded: one tile).
at::Tensor rows_acc(const at::Tensor& m, int64_t r0, int64_t n, at::ScalarType acc) {
  at::Tensor v = m.narrow(0, r0, n);
  return v.scalar_type() == acc ? v : v.to(acc);
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> ghost_typed(const at::Tensor& A, const at::Tensor& G, const LinearDims& s,
                                               bool with_bias) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t B = s.B, T = s.T, d = s.d, p = s.p;
  at::Tensor w = at::empty({B}, A.options().dtype(acc));
  at::Tensor bias = with_bias ? at::empty({B}, A.options().dtype(acc)) : at::empty({0}, A.options().dtype(acc));
  if (B == 0) return {w, bias};
  const at::Tensor A3 = A.view({B, T, d}), G3 = G.view({B, T, p});
  const scalar_t* Gp = G3.data_ptr<scalar_t>();
  acc_t* wp = w.data_ptr<acc_t>();
  acc_t* bp = with_bias ? bias.data_ptr<acc_t>() : nullptr;

  if (T == 1) {  // rank-one gradients: ||g_b||^2 = ||a_b||^2 ||g_b||^2, no GEMM needed
    const scalar_t* Ap = A3.data_ptr<scalar_t>();
    at::parallel_for(0, B, 64, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        double sa = 0.0, sg = 0.0;
        for (int64_t k = 0; k < d; ++k) sa += static_cast<double>(Ap[b * d + k]) * static_cast<double>(Ap[b * d + k]);
        for (int64_t k = 0; k < p; ++k) sg += static_cast<double>(Gp[b * p + k]) * static_cast<double>(Gp[b * p + k]);
        wp[b] = static_cast<acc_t>(sa * sg);
        if (bp) bp[b] = static_cast<acc_t>(sg);
      }
    });
    return {w, bias};
  }

  // work items: (sample, tile pair i <= j)
  const int64_t nt = (T + kGhostTile - 1) / kGhostTile;
  std::vector<std::pair<int64_t, int64_t>> pairs;
  for (int64_t i = 0; i < nt; ++i)
    for (int64_t j = i; j < nt; ++j) pairs.emplace_back(i, j);
  const int64_t np = static_cast<int64_t>(pairs.size());
  std::vector<double> partial(B * np);

  at::parallel_for(0, B * np, 1, [&](int64_t lo, int64_t hi) {
    at::Tensor aa = at::empty({kGhostTile * kGhostTile}, A.options().dtype(acc));
    at::Tensor gg = at::empty({kGhostTile * kGhostTile}, A.options().dtype(acc));
    std::vector<acc_t> colsum;
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t b = item / np;
      const auto [i, j] = pairs[item % np];
      const int64_t i0 = i * kGhostTile, ti = std::min(kGhostTile, T - i0);
      const int64_t j0 = j * kGhostTile, tj = std::min(kGhostTile, T - j0);
      const at::Tensor Ab = A3.select(0, b), Gb = G3.select(0, b);
      const at::Tensor Ai = rows_acc(Ab, i0, ti, acc), Gi = rows_acc(Gb, i0, ti, acc);
      const at::Tensor Aj = i == j ? Ai : rows_acc(Ab, j0, tj, acc);
      const at::Tensor Gj = i == j ? Gi : rows_acc(Gb, j0, tj, acc);
      at::Tensor aa_t = aa.narrow(0, 0, ti * tj).view({ti, tj});
      at::Tensor gg_t = gg.narrow(0, 0, ti * tj).view({ti, tj});
      at::mm_out(aa_t, Ai, Aj.t());
      at::mm_out(gg_t, Gi, Gj.t());
      const double sum = dot(aa_t.data_ptr<acc_t>(), gg_t.data_ptr<acc_t>(), ti * tj);
      partial[item] = i == j ? sum : 2.0 * sum;
      if (bp && item % np == 0) bp[b] = bias_sq<scalar_t, acc_t>(Gp + b * T * p, T, p, colsum);
    }
  });
  for (int64_t b = 0; b < B; ++b) {  // fixed order: results do not depend on the thread count
    double s = 0.0;
    for (int64_t k = 0; k < np; ++k) s += partial[b * np + k];
    wp[b] = static_cast<acc_t>(s);
  }
  return {w, bias};
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> direct_typed(const at::Tensor& A, const at::Tensor& G, const LinearDims& s,
                                                bool with_bias) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t B = s.B, T = s.T, d = s.d, p = s.p;
  at::Tensor w = at::empty({B}, A.options().dtype(acc));
  at::Tensor bias = with_bias ? at::empty({B}, A.options().dtype(acc)) : at::empty({0}, A.options().dtype(acc));
  if (B == 0) return {w, bias};
  const at::Tensor A3 = A.view({B, T, d}), G3 = G.view({B, T, p});
  const scalar_t* Gp = G3.data_ptr<scalar_t>();
  acc_t* wp = w.data_ptr<acc_t>();
  acc_t* bp = with_bias ? bias.data_ptr<acc_t>() : nullptr;

  // work items: (sample, p-tile, d-tile)
  const int64_t npt = (p + kDirectTile - 1) / kDirectTile, ndt = (d + kDirectTile - 1) / kDirectTile;
  const int64_t nper = npt * ndt;
  std::vector<double> partial(B * nper);
  at::parallel_for(0, B * nper, 1, [&](int64_t lo, int64_t hi) {
    at::Tensor tile = at::empty({kDirectTile * kDirectTile}, A.options().dtype(acc));
    std::vector<acc_t> colsum;
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t b = item / nper, pi = (item % nper) / ndt, di = item % ndt;
      const int64_t p0 = pi * kDirectTile, tp = std::min(kDirectTile, p - p0);
      const int64_t d0 = di * kDirectTile, td = std::min(kDirectTile, d - d0);
      at::Tensor Gt = G3.select(0, b).narrow(1, p0, tp);  // [T, tp]
      at::Tensor At = A3.select(0, b).narrow(1, d0, td);  // [T, td]
      if (Gt.scalar_type() != acc) Gt = Gt.to(acc);
      if (At.scalar_type() != acc) At = At.to(acc);
      at::Tensor g = tile.narrow(0, 0, tp * td).view({tp, td});
      at::mm_out(g, Gt.t(), At);
      const acc_t* gp = g.data_ptr<acc_t>();
      partial[item] = dot(gp, gp, tp * td);
      if (bp && item % nper == 0) bp[b] = bias_sq<scalar_t, acc_t>(Gp + b * T * p, T, p, colsum);
    }
  });
  for (int64_t b = 0; b < B; ++b) {
    double s2 = 0.0;
    for (int64_t k = 0; k < nper; ++k) s2 += partial[b * nper + k];
    wp[b] = static_cast<acc_t>(s2);
  }
  return {w, bias};
}

// Mixed input dtypes are rare (both come from one layer): bring both to the accumulation dtype.
std::pair<at::Tensor, at::Tensor> same_dtype(const at::Tensor& A, const at::Tensor& G) {
  if (A.scalar_type() == G.scalar_type()) return {plain(A), plain(G)};
  const at::ScalarType acc = acc_type(A.scalar_type());
  return {plain(A.to(acc)), plain(G.to(acc))};
}

std::tuple<at::Tensor, at::Tensor> ghost_norm_cpu(const at::Tensor& A_, const at::Tensor& G_, bool with_bias) {
  const LinearDims s = check_linear(A_, G_, "ghost_norm");
  auto [A, G] = same_dtype(A_, G_);
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "ghost_norm",
                                  [&] { out = ghost_typed<scalar_t>(A, G, s, with_bias); });
  return out;
}

std::tuple<at::Tensor, at::Tensor> direct_norm_cpu(const at::Tensor& A_, const at::Tensor& G_, bool with_bias) {
  const LinearDims s = check_linear(A_, G_, "direct_norm");
  auto [A, G] = same_dtype(A_, G_);
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "direct_norm",
                                  [&] { out = direct_typed<scalar_t>(A, G, s, with_bias); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dpkernels, CPU, m) {
  m.impl("ghost_norm", TORCH_FN(ghost_norm_cpu));
  m.impl("direct_norm", TORCH_FN(direct_norm_cpu));
}

}  // namespace dpkernels::cpu
