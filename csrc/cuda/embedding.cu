// Embedding layers: the per-sample gradient of the table is sparse (the rows the sample's ids
// touch, repeated ids summed), so norms and clipped sums work on those rows directly.
#include <cassert>

#include "launchers.cuh"

namespace dpkernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kDimsPerLane = 4;  // registers per lane for one chunk of the D columns

// out[b] = sum over distinct ids v of sample b of ||sum_{t: ids[t] = v} G_b[t]||^2.
// One block per sample; warp w takes tokens t = w, w + 8, ... and skips t unless it is the
// first occurrence of its id, so each distinct row is summed (over all its tokens) exactly once.
// Cost O(T^2 / 32) id compares + O(T D) loads per sample: T is a context length, not huge.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    embedding_norm_kernel(const int64_t* __restrict__ ids, const T* __restrict__ G,
                          acc_of<T>* __restrict__ out, int64_t n_tok, int64_t D) {
  using acc_t = typename Elem<T>::acc_t;
  const int64_t b = blockIdx.x;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t* ids_b = ids + b * n_tok;
  const T* G_b = G + b * n_tok * D;
  acc_t total = acc_t(0);
  for (int64_t t = warp; t < n_tok; t += kWarps) {  // warp-uniform loop: t is the same on every lane
    const int64_t id = ids_b[t];
    bool seen = false;
    for (int64_t u = lane; u < t; u += kWarpSize) seen |= ids_b[u] == id;
    if (__any_sync(0xffffffffu, seen)) continue;
    for (int64_t k0 = 0; k0 < D; k0 += kWarpSize * kDimsPerLane) {
      acc_t row[kDimsPerLane] = {};
      for (int64_t u = t; u < n_tok; ++u) {
        if (ids_b[u] != id) continue;
#pragma unroll
        for (int v = 0; v < kDimsPerLane; ++v) {
          const int64_t k = k0 + lane + v * kWarpSize;
          if (k < D) row[v] += Elem<T>::to_acc(G_b[u * D + k]);
        }
      }
#pragma unroll
      for (int v = 0; v < kDimsPerLane; ++v) total += row[v] * row[v];
    }
  }
  total = block_sum(total);
  if (threadIdx.x == 0) out[b] = total;
}

// out[ids[r]] += c[r / T] * G[r] for every token row r (atomics: rows may repeat across samples).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    embedding_scatter_kernel(const int64_t* __restrict__ ids, const T* __restrict__ G,
                             const acc_of<T>* __restrict__ c, acc_of<T>* __restrict__ out,
                             int64_t n_rows, int64_t n_tok, int64_t D, int64_t V) {
  using acc_t = typename Elem<T>::acc_t;
  for (int64_t r = blockIdx.x; r < n_rows; r += gridDim.x) {
    const int64_t id = ids[r];
    assert(id >= 0 && id < V && "dpkernels.embedding_clipped_sum: id out of range");
    if (id < 0 || id >= V) continue;  // with device asserts compiled out, never write out of bounds
    const acc_t cb = c[r / n_tok];
    for (int64_t k = threadIdx.x; k < D; k += kThreads) atomicAdd(out + id * D + k, cb * Elem<T>::to_acc(G[r * D + k]));
  }
}

}  // namespace

template <typename T>
void launch_embedding_norm(const int64_t* ids, const T* G, acc_of<T>* out, int64_t B, int64_t n_tok, int64_t D,
                           cudaStream_t stream) {
  if (B == 0) return;
  embedding_norm_kernel<T><<<static_cast<unsigned int>(B), kThreads, 0, stream>>>(ids, G, out, n_tok, D);
}

template <typename T>
void launch_embedding_scatter(const int64_t* ids, const T* G, const acc_of<T>* c, acc_of<T>* out, int64_t B,
                              int64_t n_tok, int64_t D, int64_t V, cudaStream_t stream) {
  const int64_t n_rows = B * n_tok;
  if (n_rows == 0 || D == 0) return;
  const unsigned int grid = static_cast<unsigned int>(std::min<int64_t>(n_rows, 1 << 20));
  embedding_scatter_kernel<T><<<grid, kThreads, 0, stream>>>(ids, G, c, out, n_rows, n_tok, D, V);
}

#define DPK_INSTANTIATE(T)                                                                                        \
  template void launch_embedding_norm<T>(const int64_t*, const T*, acc_of<T>*, int64_t, int64_t, int64_t,         \
                                         cudaStream_t);                                                           \
  template void launch_embedding_scatter<T>(const int64_t*, const T*, const acc_of<T>*, acc_of<T>*, int64_t,      \
                                            int64_t, int64_t, int64_t, cudaStream_t);
DPK_FOR_FLOATING(DPK_INSTANTIATE)
#undef DPK_INSTANTIATE

}  // namespace cuda
}  // namespace dpkernels
