// The per-sample gradient of a per-channel affine scale, LayerNorm / GroupNorm weight (op affine_grad_sample).
// Memory bound: one pass over the input, fp32 (fp64) accumulation.
#include "launchers.cuh"

namespace dpkernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// out[row] = sum_s xhat[row, s] * G[row, s]: one warp per row (b, channel).
constexpr int kWarpsPerBlock = kThreads / kWarpSize;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    affine_grad_sample_kernel(const T* __restrict__ xhat, const T* __restrict__ G,
                              acc_of<T>* __restrict__ out, int64_t rows, int64_t S) {
  using acc_t = typename Elem<T>::acc_t;
  const int lane = threadIdx.x % kWarpSize;
  for (int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize; row < rows;
       row += int64_t(gridDim.x) * kWarpsPerBlock) {
    acc_t s = acc_t(0);
    for (int64_t k = lane; k < S; k += kWarpSize) s += Elem<T>::to_acc(xhat[row * S + k]) * Elem<T>::to_acc(G[row * S + k]);
    s = warp_sum(s);
    if (lane == 0) out[row] = s;
  }
}

}  // namespace

template <typename T>
void launch_affine_grad_sample(const T* xhat, const T* G, acc_of<T>* out, int64_t rows, int64_t S,
                               cudaStream_t stream) {
  if (rows == 0) return;
  const unsigned int grid = static_cast<unsigned int>(std::min<int64_t>(tile::cdiv(rows, kWarpsPerBlock), 65535));
  affine_grad_sample_kernel<T><<<grid, kThreads, 0, stream>>>(xhat, G, out, rows, S);
}

#define DPK_INSTANTIATE(T)                                                                                          \
  template void launch_affine_grad_sample<T>(const T*, const T*, acc_of<T>*, int64_t, int64_t, cudaStream_t);
DPK_FOR_FLOATING(DPK_INSTANTIATE)
#undef DPK_INSTANTIATE

}  // namespace cuda
}  // namespace dpkernels
