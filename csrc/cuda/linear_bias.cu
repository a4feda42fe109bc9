// Bias of a linear layer: its per-sample gradient is sum_t G_b[t], so the norm and the clipped
// sum (+ noise) are column sums of G. Memory bound; fp32 (fp64) accumulation.
#include "launchers.cuh"

namespace dpkernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// out[b] += ||sum_t G_b[t]||^2. Block (column chunk, sample): thread j sums column j over the
// T tokens (coalesced across the warp), squares it, and the block adds its columns' share.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    bias_sq_norms_kernel(const T* __restrict__ G, acc_of<T>* __restrict__ out, int64_t B, int64_t n_tok,
                         int64_t p) {
  using acc_t = typename Elem<T>::acc_t;
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    acc_t s = acc_t(0);
    if (j < p) {
      const T* col = G + b * n_tok * p + j;
      for (int64_t t = 0; t < n_tok; ++t) s += Elem<T>::to_acc(col[t * p]);
    }
    const acc_t part = block_sum(s * s);
    if (threadIdx.x == 0) atomicAdd(out + b, part);
  }
}

// out[j] = sum_r c[r / T] G[r, j] + noise_std * z(offset + j) over the B*T rows r.
// Block: 32 columns x 8 row groups; the row groups meet in shared memory, then one thread per
// column adds the noise and stores.
constexpr int kBiasCols = 32;
constexpr int kBiasRowGroups = kThreads / kBiasCols;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    clipped_bias_sum_kernel(const T* __restrict__ G, const acc_of<T>* __restrict__ c,
                            acc_of<T>* __restrict__ out, int64_t n_rows, int64_t n_tok, int64_t p,
                            double noise_std, uint64_t seed, uint64_t offset) {
  using acc_t = typename Elem<T>::acc_t;
  __shared__ acc_t partial[kBiasRowGroups][kBiasCols + 1];
  const int tx = threadIdx.x % kBiasCols, ty = threadIdx.x / kBiasCols;
  const int64_t j = int64_t(blockIdx.x) * kBiasCols + tx;
  acc_t s = acc_t(0);
  if (j < p) {
    for (int64_t r = ty; r < n_rows; r += kBiasRowGroups) s += c[r / n_tok] * Elem<T>::to_acc(G[r * p + j]);
  }
  partial[ty][tx] = s;
  __syncthreads();
  if (ty == 0 && j < p) {
    for (int g = 1; g < kBiasRowGroups; ++g) s += partial[g][tx];
    if (noise_std != 0.0) s += acc_t(noise_std * philox_normal(offset + uint64_t(j), seed));
    out[j] = s;
  }
}

}  // namespace

template <typename T>
void launch_bias_sq_norms(const T* G, acc_of<T>* out, int64_t B, int64_t n_tok, int64_t p, cudaStream_t stream) {
  if (B == 0 || p == 0) return;
  const dim3 grid(static_cast<unsigned int>(tile::cdiv(p, kThreads)), sample_grid_dim(B));
  bias_sq_norms_kernel<T><<<grid, kThreads, 0, stream>>>(G, out, B, n_tok, p);
}

template <typename T>
void launch_clipped_bias_sum(const T* G, const acc_of<T>* c, acc_of<T>* out, int64_t B, int64_t n_tok, int64_t p,
                             double noise_std, uint64_t seed, uint64_t offset, cudaStream_t stream) {
  if (p == 0) return;
  const unsigned int grid = static_cast<unsigned int>(tile::cdiv(p, kBiasCols));
  clipped_bias_sum_kernel<T><<<grid, kThreads, 0, stream>>>(G, c, out, B * n_tok, n_tok, p, noise_std, seed, offset);
}

#define DPK_INSTANTIATE(T)                                                                                   \
  template void launch_bias_sq_norms<T>(const T*, acc_of<T>*, int64_t, int64_t, int64_t, cudaStream_t);      \
  template void launch_clipped_bias_sum<T>(const T*, const acc_of<T>*, acc_of<T>*, int64_t, int64_t, int64_t, \
                                           double, uint64_t, uint64_t, cudaStream_t);
DPK_FOR_FLOATING(DPK_INSTANTIATE)
#undef DPK_INSTANTIATE

}  // namespace cuda
}  // namespace dpkernels
