// Shared device plumbing of the CUDA kernels: element types and reductions.
// Kernel sources include only CUDA headers and csrc/include/dpkernels/*.h (no torch headers):
// torch's headers triple nvcc's front-end time, so they live in torch_ops.cu alone.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "dpkernels/philox.h"
#include "dpkernels/tile_math.h"

namespace dpkernels {
namespace cuda {

constexpr int kWarpSize = 32;

// ---------------------------------------------------------------------------------------
// Element types. torch builds CUDA sources with __CUDA_NO_HALF_CONVERSIONS__ and friends,
// so conversions are spelled with intrinsics. Elem<T>::acc_t is the accumulation type:
// float for fp32/fp16/bf16, double for fp64 (the op contract).
// ---------------------------------------------------------------------------------------
template <typename T>
struct Elem;

template <>
struct Elem<float> {
  using acc_t = float;
  static __device__ __forceinline__ float to_acc(float x) { return x; }
  static __device__ __forceinline__ float from_acc(float x) { return x; }
  static __device__ __forceinline__ float from_acc_rz(float x) { return x; }
  static __device__ __forceinline__ float zero() { return 0.f; }
};

template <>
struct Elem<double> {
  using acc_t = double;
  static __device__ __forceinline__ double to_acc(double x) { return x; }
  static __device__ __forceinline__ double from_acc(double x) { return x; }
  static __device__ __forceinline__ double from_acc_rz(double x) { return x; }
  static __device__ __forceinline__ double zero() { return 0.0; }
};

template <>
struct Elem<__half> {
  using acc_t = float;
  static __device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_acc(float x) { return __float2half_rn(x); }
  // Toward zero: a clip-scaled row c_b * G rounded back to half never grows past what was clipped.
  static __device__ __forceinline__ __half from_acc_rz(float x) { return __float2half_rz(x); }
  static __device__ __forceinline__ __half zero() { return __float2half_rn(0.f); }
};

template <>
struct Elem<__nv_bfloat16> {
  using acc_t = float;
  static __device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_acc(float x) { return __float2bfloat16_rn(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_acc_rz(float x) { return __float2bfloat16_rz(x); }
  static __device__ __forceinline__ __nv_bfloat16 zero() { return __float2bfloat16_rn(0.f); }
};

// Accumulation (and output) type of storage type T.
template <typename T>
using acc_of = typename Elem<T>::acc_t;

// ---------------------------------------------------------------------------------------
// Reductions. block_sum returns the total in thread 0 only; every thread must call it.
// ---------------------------------------------------------------------------------------
template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v) {
  __shared__ acc_t warp_partials[32];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int n_warps = (blockDim.x + kWarpSize - 1) / kWarpSize;
  v = warp_sum(v);
  if (lane == 0) warp_partials[warp] = v;
  __syncthreads();
  v = threadIdx.x < n_warps ? warp_partials[threadIdx.x] : acc_t(0);
  if (warp == 0) v = warp_sum(v);
  __syncthreads();  // warp_partials may be reused by the next call
  return v;
}

// Samples go on gridDim.y (at most 65535); kernels loop b over blockIdx.y + k * gridDim.y.
inline unsigned int sample_grid_dim(int64_t B) { return static_cast<unsigned int>(B < 65535 ? B : 65535); }

}  // namespace cuda
}  // namespace dpkernels
