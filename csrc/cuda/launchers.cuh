// Host launchers of the CUDA kernels, one template per kernel family, explicitly instantiated
// for the four storage types (float, double, __half, __nv_bfloat16) in the kernel's .cu file,
// named as the op's file on every backend (the table in dpkernels/ops.py).
// Plain pointers, contiguous row-major buffers, the caller's stream; outputs are acc_of<T>
// (float, or double for double). torch_ops.cu checks inputs, allocates, calls these and checks
// the launch. `tensor_cores`: the device is sm_80+ (fp16/bf16 then take the wmma kernels).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"

namespace dpkernels {
namespace cuda {

// --- linear_norms.cu ---
// out[b] += ||G_b^T A_b||_F^2 by Gram tiles (out zero-initialised). A [B, T, d], G [B, T, p].
template <typename T>
void launch_ghost_norm(const T* A, const T* G, acc_of<T>* out, int64_t B, int64_t n_tok, int64_t d, int64_t p,
                       bool tensor_cores, cudaStream_t stream);

// out[b] += ||G_b^T A_b||_F^2 by (p, d) tiles of the product (out zero-initialised).
template <typename T>
void launch_direct_norm(const T* A, const T* G, acc_of<T>* out, int64_t B, int64_t n_tok, int64_t d, int64_t p,
                        bool tensor_cores, cudaStream_t stream);

// out[b] += ||sum_t G_b[t]||^2 (out zero-initialised). G [B, T, p].
template <typename T>
void launch_bias_sq_norms(const T* G, acc_of<T>* out, int64_t B, int64_t n_tok, int64_t p, cudaStream_t stream);

// --- clipped_sum.cu ---
// out [p, d] = sum_b c_b G_b^T A_b + noise_std * z(offset + i d + j). c [B].
template <typename T>
void launch_clipped_sum(const T* A, const T* G, const acc_of<T>* c, acc_of<T>* out, int64_t B, int64_t n_tok,
                        int64_t d, int64_t p, double noise_std, uint64_t seed, uint64_t offset, bool tensor_cores,
                        cudaStream_t stream);

// out [p] = sum_b c_b sum_t G_b[t] + noise_std * z(offset + j).
template <typename T>
void launch_clipped_bias_sum(const T* G, const acc_of<T>* c, acc_of<T>* out, int64_t B, int64_t n_tok, int64_t p,
                             double noise_std, uint64_t seed, uint64_t offset, cudaStream_t stream);

// --- rows.cu ---
// out[b] += ||X_b||^2 (out zero-initialised). X [B, n].
template <typename T>
void launch_row_sq_norms(const T* X, acc_of<T>* out, int64_t B, int64_t n, cudaStream_t stream);

// out [n] = sum_b c_b X_b + noise_std * z(offset + j). X [B, n].
template <typename T>
void launch_clipped_rows_sum(const T* X, const acc_of<T>* c, acc_of<T>* out, int64_t B, int64_t n, double noise_std,
                             uint64_t seed, uint64_t offset, cudaStream_t stream);

// --- affine.cu ---
// out [rows] = sum_s xhat[row, s] G[row, s]. xhat, G [rows, S].
template <typename T>
void launch_affine_grad_sample(const T* xhat, const T* G, acc_of<T>* out, int64_t rows, int64_t S,
                               cudaStream_t stream);

// --- noise.cu ---
// x[i] += std * z(offset + i), in place, x contiguous with numel elements.
template <typename T>
void launch_add_noise(T* x, int64_t numel, double std, uint64_t seed, uint64_t offset, cudaStream_t stream);

// --- embedding.cu ---
// out[b] = ||per-sample embedding gradient||^2 (repeated ids summed). ids [B, T], G [B, T, D].
template <typename T>
void launch_embedding_norm(const int64_t* ids, const T* G, acc_of<T>* out, int64_t B, int64_t n_tok, int64_t D,
                           cudaStream_t stream);

// out [V, D] += c_b G_b[t] at row ids[b, t], for all b, t (atomics).
template <typename T>
void launch_embedding_scatter(const int64_t* ids, const T* G, const acc_of<T>* c, acc_of<T>* out, int64_t B,
                              int64_t n_tok, int64_t D, int64_t V, cudaStream_t stream);

// Explicit instantiations: DPK_FOR_FLOATING(MACRO) expands MACRO(T) for each storage type.
#define DPK_FOR_FLOATING(MACRO) \
  MACRO(float)                  \
  MACRO(double)                 \
  MACRO(__half)                 \
  MACRO(__nv_bfloat16)

}  // namespace cuda
}  // namespace dpkernels
