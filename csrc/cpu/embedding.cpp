// Embedding tables: the per-sample gradient touches only the rows a sample looks up, and a
// row looked up twice gets the SUM of its output gradients. Norms group a sample's tokens by
// id (sort) and square the row sums; the clipped sum scatters c_b * G into the table, then
// noise goes over the whole table (untouched rows too: they are parameters as well).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "common.h"

namespace dpkernels::cpu {
namespace {

struct EmbDims {
  int64_t B, T, D;
};

EmbDims check_embedding(const at::Tensor& ids, const at::Tensor& G, const char* op) {
  TORCH_CHECK(ids.dim() >= 1, "dpkernels.", op, ": ids must be [B, T] (or [B]), got a 0-d tensor");
  TORCH_CHECK(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt, "dpkernels.", op,
              ": ids must be int64 (or int32), got ", ids.scalar_type());
  check_floating(G, "G", op);
  TORCH_CHECK(G.dim() == ids.dim() + 1, "dpkernels.", op, ": G must be ids.shape + [D] (ids ", ids.sizes(), ", G ",
              G.sizes(), ")");
  TORCH_CHECK(G.sizes().slice(0, ids.dim()) == ids.sizes(), "dpkernels.", op, ": G must be ids.shape + [D] (ids ",
              ids.sizes(), ", G ", G.sizes(), ")");
  const int64_t B = ids.size(0);
  return {B, B ? ids.numel() / B : 0, G.size(-1)};
}

void check_ids_range(const at::Tensor& ids, int64_t V, const char* op) {
  if (ids.numel() == 0) return;
  const int64_t lo = ids.min().item<int64_t>();
  TORCH_CHECK(lo >= 0, "dpkernels.", op, ": ids must be >= 0, got ", lo);
  if (V >= 0) {
    const int64_t hi = ids.max().item<int64_t>();
    TORCH_CHECK(hi < V, "dpkernels.", op, ": id ", hi, " out of range for num_embeddings = ", V);
  }
}

template <typename scalar_t>
void embedding_norm_typed(const int64_t* ids, const scalar_t* G, double* out, const EmbDims& s) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  at::parallel_for(0, s.B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> order(s.T);
    std::vector<acc_t> rowsum(s.D);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t* id = ids + b * s.T;
      std::iota(order.begin(), order.end(), int64_t(0));
      std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return id[x] < id[y]; });
      double total = 0.0;
      for (int64_t k = 0; k < s.T;) {  // one run of equal ids = one table row
        std::fill(rowsum.begin(), rowsum.end(), acc_t(0));
        int64_t e = k;
        for (; e < s.T && id[order[e]] == id[order[k]]; ++e) {
          const scalar_t* g = G + (b * s.T + order[e]) * s.D;
#pragma omp simd
          for (int64_t j = 0; j < s.D; ++j) rowsum[j] += static_cast<acc_t>(g[j]);
        }
        for (int64_t j = 0; j < s.D; ++j) total += static_cast<double>(rowsum[j]) * static_cast<double>(rowsum[j]);
        k = e;
      }
      out[b] = total;
    }
  });
}

at::Tensor embedding_norm_cpu(const at::Tensor& ids_, const at::Tensor& G_) {
  const EmbDims s = check_embedding(ids_, G_, "embedding_norm");
  check_ids_range(ids_, -1, "embedding_norm");
  const at::Tensor ids = plain(ids_.to(at::kLong)), G = plain(G_);
  const at::ScalarType acc = acc_type(G.scalar_type());
  at::Tensor out = at::empty({s.B}, G.options().dtype(at::kDouble));
  if (s.B > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, G.scalar_type(), "embedding_norm", [&] {
      embedding_norm_typed<scalar_t>(ids.data_ptr<int64_t>(), G.data_ptr<scalar_t>(), out.data_ptr<double>(), s);
    });
  }
  return out.to(acc);
}

template <typename scalar_t>
void embedding_scatter_typed(const int64_t* ids, const scalar_t* G, const at::Tensor& cf, at::Tensor& table,
                             const EmbDims& s) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const acc_t* cp = cf.data_ptr<acc_t>();
  acc_t* tp = table.data_ptr<acc_t>();
  const int64_t V = table.size(0);
  // threads own ranges of table rows: each scans all ids and adds the ones in its range
  at::parallel_for(0, V, 1, [&](int64_t v0, int64_t v1) {
    for (int64_t r = 0; r < s.B * s.T; ++r) {
      const int64_t v = ids[r];
      if (v < v0 || v >= v1) continue;
      const acc_t f = cp[r / s.T];
      const scalar_t* g = G + r * s.D;
      acc_t* row = tp + v * s.D;
#pragma omp simd
      for (int64_t j = 0; j < s.D; ++j) row[j] += f * static_cast<acc_t>(g[j]);
    }
  });
}

at::Tensor embedding_clipped_sum_cpu(const at::Tensor& ids_, const at::Tensor& G_, const at::Tensor& c,
                                     int64_t num_embeddings, double noise_std, int64_t seed, int64_t offset) {
  const EmbDims s = check_embedding(ids_, G_, "embedding_clipped_sum");
  TORCH_CHECK(num_embeddings >= 0, "dpkernels.embedding_clipped_sum: num_embeddings must be >= 0, got ",
              num_embeddings);
  check_ids_range(ids_, num_embeddings, "embedding_clipped_sum");
  check_factors(c, s.B, "c", "embedding_clipped_sum");
  check_noise_args(noise_std, seed, offset, "embedding_clipped_sum");
  const at::Tensor ids = plain(ids_.to(at::kLong)), G = plain(G_);
  const at::ScalarType acc = acc_type(G.scalar_type());
  at::Tensor table = at::zeros({num_embeddings, s.D}, G.options().dtype(acc));
  if (s.B * s.T > 0 && num_embeddings > 0) {
    const at::Tensor cf = plain(c.to(acc));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, G.scalar_type(), "embedding_clipped_sum", [&] {
      embedding_scatter_typed<scalar_t>(ids.data_ptr<int64_t>(), G.data_ptr<scalar_t>(), cf, table, s);
    });
  }
  add_philox_noise(table, noise_std, seed, offset);
  return table;
}

}  // namespace

TORCH_LIBRARY_IMPL(dpkernels, CPU, m) {
  m.impl("embedding_norm", TORCH_FN(embedding_norm_cpu));
  m.impl("embedding_clipped_sum", TORCH_FN(embedding_clipped_sum_cpu));
}

}  // namespace dpkernels::cpu
