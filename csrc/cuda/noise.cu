// Counter-based Gaussian noise added in place (op add_noise_): the Philox stream of dpkernels/philox.h.
#include "launchers.cuh"

namespace dpkernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// x[i] += std * z(offset + i): one thread per Philox block (up to 4 elements).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    add_noise_kernel(T* __restrict__ x, int64_t numel, double std, uint64_t seed, uint64_t offset) {
  using acc_t = acc_of<T>;
  const uint64_t first_block = offset >> 2;
  const uint64_t end_block = (offset + uint64_t(numel) + 3) >> 2;
  for (uint64_t blk = first_block + uint64_t(blockIdx.x) * kThreads + threadIdx.x; blk < end_block;
       blk += uint64_t(gridDim.x) * kThreads) {
    double z[4];
    philox_normal4(blk, seed, z);
#pragma unroll
    for (int lane = 0; lane < 4; ++lane) {
      const int64_t i = int64_t(blk * 4 + lane) - int64_t(offset);  // element whose counter is this lane
      if (i >= 0 && i < numel) x[i] = Elem<T>::from_acc(Elem<T>::to_acc(x[i]) + acc_t(std * z[lane]));
    }
  }
}

}  // namespace

template <typename T>
void launch_add_noise(T* x, int64_t numel, double std, uint64_t seed, uint64_t offset, cudaStream_t stream) {
  if (numel == 0 || std == 0.0) return;
  const int64_t n_blocks = int64_t((offset + uint64_t(numel) + 3) >> 2) - int64_t(offset >> 2);
  const unsigned int grid = static_cast<unsigned int>(std::min<int64_t>(tile::cdiv(n_blocks, kThreads), 65535));
  add_noise_kernel<T><<<grid, kThreads, 0, stream>>>(x, numel, std, seed, offset);
}

#define DPK_INSTANTIATE(T)                                                                                          \
  template void launch_add_noise<T>(T*, int64_t, double, uint64_t, uint64_t, cudaStream_t);
DPK_FOR_FLOATING(DPK_INSTANTIATE)
#undef DPK_INSTANTIATE

}  // namespace cuda
}  // namespace dpkernels
