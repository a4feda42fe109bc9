// Building blocks of the tiled kernels: copying a window of a row-major matrix into shared
// memory (masked, zero-filled), a SIMT register-blocked tile product for fp32/fp64, and a
// warp-level tensor-core (wmma) tile product for fp16/bf16.
//
// Zero fill is what makes ragged shapes free: padded rows/columns contribute 0 to every Gram
// entry, every product and every squared sum, so no epilogue needs a mask except the store.
#pragma once

#include <mma.h>

#include <type_traits>

#include "common.cuh"

namespace dpkernels {
namespace cuda {

// ---------------------------------------------------------------------------------------
// Global -> shared.
// Copies the R x C window whose element (r, c) is fetch(r, c) into smem with row stride LDS:
// smem[r * LDS + c], or smem[c * LDS + r] if kTranspose. Entries with r >= n_rows or
// c >= n_cols are zero. Consecutive threads take consecutive c, so reads of a row-major
// source (c contiguous) coalesce.
// ---------------------------------------------------------------------------------------
template <int R, int C, int LDS, bool kTranspose, typename Tout, typename Fetch>
__device__ __forceinline__ void load_window(Tout* smem, int n_rows, int n_cols, Tout zero, Fetch fetch) {
  for (int e = threadIdx.x; e < R * C; e += blockDim.x) {
    const int r = e / C, c = e % C;
    const Tout v = (r < n_rows && c < n_cols) ? fetch(r, c) : zero;
    if (kTranspose) {
      smem[c * LDS + r] = v;
    } else {
      smem[r * LDS + c] = v;
    }
  }
}

// Tensor-core operands (16-bit): copies the R x C window src[r * ld + c] into smem[r * LDS + c],
// zero outside n_rows x n_cols, optionally scaling row r by row_scale[r] (rounded back to T).
// With vec_ok (every row of the source starts 16-byte aligned: ld % 8 == 0 and an aligned base)
// each thread moves 8 elements with one 16-byte load; ragged edges fall back to scalars.
template <int R, int C, int LDS, typename T>
__device__ __forceinline__ void load_rows_16bit(T* smem, const T* __restrict__ src, int64_t ld, int n_rows,
                                                int n_cols, bool vec_ok, const float* row_scale = nullptr) {
  static_assert(sizeof(T) == 2, "tensor-core operands are fp16 / bf16");
  constexpr int kVec = 8;
  static_assert(C % kVec == 0 && LDS % kVec == 0, "16-byte aligned shared-memory rows");
  auto fetch = [&](int r, int c) -> T {
    const T x = src[r * ld + c];
    return row_scale ? Elem<T>::from_acc_rz(row_scale[r] * Elem<T>::to_acc(x)) : x;
  };
  if (!vec_ok) {
    load_window<R, C, LDS, false>(smem, n_rows, n_cols, Elem<T>::zero(), fetch);
    return;
  }
  for (int e = threadIdx.x; e < R * C / kVec; e += blockDim.x) {
    const int r = e / (C / kVec), c = (e % (C / kVec)) * kVec;
    T* dst = smem + r * LDS + c;
    if (r < n_rows && c + kVec <= n_cols) {
      uint4 v = *reinterpret_cast<const uint4*>(src + r * ld + c);
      if (row_scale) {
        T* h = reinterpret_cast<T*>(&v);
#pragma unroll
        for (int k = 0; k < kVec; ++k) h[k] = Elem<T>::from_acc_rz(row_scale[r] * Elem<T>::to_acc(h[k]));
      }
      *reinterpret_cast<uint4*>(dst) = v;
    } else {
#pragma unroll
      for (int k = 0; k < kVec; ++k) dst[k] = (r < n_rows && c + k < n_cols) ? fetch(r, c + k) : Elem<T>::zero();
    }
  }
}

// Rows of a row-major matrix with leading dimension ld start 16-byte aligned.
template <typename T>
__device__ __forceinline__ bool rows_16b_aligned(const T* base, int64_t ld) {
  return (ld * int64_t(sizeof(T))) % 16 == 0 && reinterpret_cast<uintptr_t>(base) % 16 == 0;
}

// ---------------------------------------------------------------------------------------
// SIMT tile product (fp32 / fp64, and the fallback for fp16/bf16 before sm_80).
// 256 threads as 16 x 16; thread (ty, tx) owns rows ty + 16 m and columns tx + 16 n of the
// BM x BN tile (strided ownership: a warp reads 16 consecutive smem words, no conflicts).
// acc[m][n] += sum_k X[k][row] * Y[k][col] with X [BK][LDX], Y [BK][LDY] in shared memory.
// ---------------------------------------------------------------------------------------
constexpr int kSimtThreads = 256;
constexpr int kSimtSide = 16;

template <int BM, int BN, int BK, int LDX, int LDY, typename acc_t>
__device__ __forceinline__ void simt_tile_mma(acc_t (&acc)[BM / kSimtSide][BN / kSimtSide], const acc_t* X,
                                              const acc_t* Y) {
  constexpr int TM = BM / kSimtSide, TN = BN / kSimtSide;
  const int ty = threadIdx.x / kSimtSide, tx = threadIdx.x % kSimtSide;
#pragma unroll 4
  for (int k = 0; k < BK; ++k) {
    acc_t x[TM], y[TN];
#pragma unroll
    for (int m = 0; m < TM; ++m) x[m] = X[k * LDX + ty + m * kSimtSide];
#pragma unroll
    for (int n = 0; n < TN; ++n) y[n] = Y[k * LDY + tx + n * kSimtSide];
#pragma unroll
    for (int m = 0; m < TM; ++m) {
#pragma unroll
      for (int n = 0; n < TN; ++n) acc[m][n] += x[m] * y[n];
    }
  }
}

template <int TM, int TN, typename acc_t>
__device__ __forceinline__ void zero_acc(acc_t (&acc)[TM][TN]) {
#pragma unroll
  for (int m = 0; m < TM; ++m) {
#pragma unroll
    for (int n = 0; n < TN; ++n) acc[m][n] = acc_t(0);
  }
}

// ---------------------------------------------------------------------------------------
// Tensor cores (wmma 16x16x16, fp32 accumulate). A block of 4 warps computes a 64 x 64 tile;
// warp w owns the 32 x 32 quadrant (w / 2, w % 2) as 2 x 2 fragments.
// Operands live in shared memory in whichever layout the global loads made natural:
// the fragment layouts (row_major / col_major) absorb the transposes.
// ---------------------------------------------------------------------------------------
namespace wmma = nvcuda::wmma;

constexpr int kMmaTile = 16;
constexpr int kTcThreads = 128;  // 4 warps
constexpr int kTcWarpTile = 32;  // each warp: 32 x 32 of the 64 x 64 block tile
constexpr int kTcFrags = kTcWarpTile / kMmaTile;

using FragAcc = wmma::fragment<wmma::accumulator, kMmaTile, kMmaTile, kMmaTile, float>;

template <typename T, typename Layout>
using FragA = wmma::fragment<wmma::matrix_a, kMmaTile, kMmaTile, kMmaTile, T, Layout>;

template <typename T, typename Layout>
using FragB = wmma::fragment<wmma::matrix_b, kMmaTile, kMmaTile, kMmaTile, T, Layout>;

// Offset of logical element (row, col) of a matrix stored with leading dimension ld.
template <typename Layout>
__device__ __forceinline__ int layout_offset(int row, int col, int ld) {
  if constexpr (std::is_same_v<Layout, wmma::row_major>) {
    return row * ld + col;
  } else {
    return col * ld + row;
  }
}

// acc[fm][fn] += Amat[m0 + 16 fm, 0:BK] * Bmat[0:BK, n0 + 16 fn] for this warp's fragments.
// Amat is M x K in LayoutA at sa (leading dim lda); Bmat is K x N in LayoutB at sb.
template <int BK, typename LayoutA, typename LayoutB, typename T>
__device__ __forceinline__ void warp_tile_mma(FragAcc (&acc)[kTcFrags][kTcFrags], const T* sa, int lda, const T* sb,
                                              int ldb, int m0, int n0) {
#pragma unroll
  for (int kk = 0; kk < BK; kk += kMmaTile) {
    FragA<T, LayoutA> a[kTcFrags];
    FragB<T, LayoutB> b[kTcFrags];
#pragma unroll
    for (int f = 0; f < kTcFrags; ++f) {
      wmma::load_matrix_sync(a[f], sa + layout_offset<LayoutA>(m0 + f * kMmaTile, kk, lda), lda);
      wmma::load_matrix_sync(b[f], sb + layout_offset<LayoutB>(kk, n0 + f * kMmaTile, ldb), ldb);
    }
#pragma unroll
    for (int fm = 0; fm < kTcFrags; ++fm) {
#pragma unroll
      for (int fn = 0; fn < kTcFrags; ++fn) wmma::mma_sync(acc[fm][fn], a[fm], b[fn], acc[fm][fn]);
    }
  }
}

__device__ __forceinline__ void zero_frags(FragAcc (&acc)[kTcFrags][kTcFrags]) {
#pragma unroll
  for (int fm = 0; fm < kTcFrags; ++fm) {
#pragma unroll
    for (int fn = 0; fn < kTcFrags; ++fn) wmma::fill_fragment(acc[fm][fn], 0.f);
  }
}

// sum over this thread's accumulator elements of x * y. Accumulator fragments of the same type
// map element e to the same (row, col) whatever that mapping is, so this is a Frobenius product.
__device__ __forceinline__ float frags_dot(const FragAcc (&x)[kTcFrags][kTcFrags],
                                           const FragAcc (&y)[kTcFrags][kTcFrags]) {
  float s = 0.f;
#pragma unroll
  for (int fm = 0; fm < kTcFrags; ++fm) {
#pragma unroll
    for (int fn = 0; fn < kTcFrags; ++fn) {
#pragma unroll
      for (int e = 0; e < FragAcc::num_elements; ++e) s += x[fm][fn].x[e] * y[fm][fn].x[e];
    }
  }
  return s;
}

// Tensor-core kernels need sm_80 for bf16; their bodies compile to a trap on older targets
// (the host never launches them there: see has_sm80_tensor_cores).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define DPK_TENSOR_CORES_COMPILED 1
#else
#define DPK_TENSOR_CORES_COMPILED 0
#endif

}  // namespace cuda
}  // namespace dpkernels
