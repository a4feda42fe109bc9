// Row-wise ops on per-sample tensors [B, ...] (ops sq_norms and clipped_rows_sum): squared norms, and the
// clipped sum over samples (+ noise). Memory bound: one pass over the input, fp32 (fp64) accumulation.
#include "launchers.cuh"
#include "noise.cuh"

namespace dpkernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kRowChunk = kThreads * 16;  // elements of one row per block in row_sq_norms

// out[b] += sum of squares of X[b, chunk]. Block (chunk, sample): long rows use many blocks.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    row_sq_norms_kernel(const T* __restrict__ X, acc_of<T>* __restrict__ out, int64_t B, int64_t n) {
  using acc_t = typename Elem<T>::acc_t;
  const int64_t begin = int64_t(blockIdx.x) * kRowChunk;
  const int64_t end = std::min<int64_t>(begin + kRowChunk, n);
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const T* row = X + b * n;
    acc_t s = acc_t(0);
    for (int64_t k = begin + threadIdx.x; k < end; k += kThreads) {
      const acc_t v = Elem<T>::to_acc(row[k]);
      s += v * v;
    }
    s = block_sum(s);
    if (threadIdx.x == 0) atomicAdd(out + b, s);
  }
}

// out[j] = sum_b c_b X[b, j] + noise_std * z(offset + j). Thread owns 4 consecutive columns:
// reads stay coalesced across the warp and one Philox block serves up to 4 outputs.
constexpr int kColsPerThread = 4;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    clipped_rows_sum_kernel(const T* __restrict__ X, const acc_of<T>* __restrict__ c,
                            acc_of<T>* __restrict__ out, int64_t B, int64_t n, double noise_std,
                            uint64_t seed, uint64_t offset) {
  using acc_t = typename Elem<T>::acc_t;
  const int64_t j0 = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * kColsPerThread;
  if (j0 >= n) return;
  const int cols = static_cast<int>(std::min<int64_t>(n - j0, kColsPerThread));
  acc_t s[kColsPerThread] = {};
  for (int64_t b = 0; b < B; ++b) {
    const acc_t cb = c[b];
    const T* row = X + b * n + j0;
#pragma unroll
    for (int k = 0; k < kColsPerThread; ++k) {
      if (k < cols) s[k] += cb * Elem<T>::to_acc(row[k]);
    }
  }
  NoiseCursor noise(seed);
#pragma unroll
  for (int k = 0; k < kColsPerThread; ++k) {
    if (k < cols) {
      acc_t v = s[k];
      if (noise_std != 0.0) v += acc_t(noise_std * noise(offset + uint64_t(j0 + k)));
      out[j0 + k] = v;
    }
  }
}

}  // namespace

template <typename T>
void launch_row_sq_norms(const T* X, acc_of<T>* out, int64_t B, int64_t n, cudaStream_t stream) {
  if (B == 0 || n == 0) return;
  const dim3 grid(static_cast<unsigned int>(tile::cdiv(n, kRowChunk)), sample_grid_dim(B));
  row_sq_norms_kernel<T><<<grid, kThreads, 0, stream>>>(X, out, B, n);
}

template <typename T>
void launch_clipped_rows_sum(const T* X, const acc_of<T>* c, acc_of<T>* out, int64_t B, int64_t n, double noise_std,
                             uint64_t seed, uint64_t offset, cudaStream_t stream) {
  if (n == 0) return;
  const unsigned int grid = static_cast<unsigned int>(tile::cdiv(n, int64_t(kThreads) * kColsPerThread));
  clipped_rows_sum_kernel<T><<<grid, kThreads, 0, stream>>>(X, c, out, B, n, noise_std, seed, offset);
}

#define DPK_INSTANTIATE(T)                                                                                          \
  template void launch_row_sq_norms<T>(const T*, acc_of<T>*, int64_t, int64_t, cudaStream_t);                       \
  template void launch_clipped_rows_sum<T>(const T*, const acc_of<T>*, acc_of<T>*, int64_t, int64_t, double,        \
                                           uint64_t, uint64_t, cudaStream_t);
DPK_FOR_FLOATING(DPK_INSTANTIATE)
#undef DPK_INSTANTIATE

}  // namespace cuda
}  // namespace dpkernels
