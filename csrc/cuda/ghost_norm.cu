// Ghost (Gram) norm of a linear layer's per-sample weight gradient g_b = G_b^T A_b:
//
//   ||g_b||_F^2 = sum_{t,t'} (A_b A_b^T)_{tt'} (G_b G_b^T)_{tt'}
//
// One block per (tile (i, j) of the T x T grid with i <= j, sample b). It builds the 64 x 64
// tile (i, j) of both Gram matrices in registers (a K loop over d, then one over p), takes
// their Frobenius product and adds it into out[b], twice for i < j since both Grams are
// symmetric. Like flash attention, no T x T matrix ever exists in global memory.
// Cost ~ T^2 (d + p) per sample: the engine picks this when T (d + p) < d p.
#include "launchers.cuh"
#include "tiles.cuh"

namespace dpkernels {
namespace cuda {
namespace {

constexpr int kTileT = 64;  // tokens per side of a Gram tile

// ---------------------------------------------------------------------------------------
// SIMT path: fp32 and fp64 (exact accumulation in the op's dtype), and fp16/bf16 before sm_80.
// ---------------------------------------------------------------------------------------
constexpr int kSimtK = 16;
constexpr int kSimtLd = kTileT + 1;  // smem holds X^T; +1 keeps the transposing stores conflict-free

// acc += X[i0 : i0+64] X[j0 : j0+64]^T, X row-major [rows, n]; K loop over the n columns.
template <typename T, typename acc_t>
__device__ void simt_gram_tile(acc_t (&acc)[kTileT / kSimtSide][kTileT / kSimtSide], const T* __restrict__ X,
                               int64_t rows, int64_t n, int64_t i0, int64_t j0, acc_t* Xi, acc_t* Xj) {
  const bool diagonal = i0 == j0;  // the two operands are the same rows: load them once
  const int ni = static_cast<int>(std::min<int64_t>(rows - i0, kTileT));
  const int nj = static_cast<int>(std::min<int64_t>(rows - j0, kTileT));
  for (int64_t k0 = 0; k0 < n; k0 += kSimtK) {
    const int nk = static_cast<int>(std::min<int64_t>(n - k0, kSimtK));
    load_window<kTileT, kSimtK, kSimtLd, true>(Xi, ni, nk, acc_t(0),
                                               [&](int r, int c) { return Elem<T>::to_acc(X[(i0 + r) * n + k0 + c]); });
    if (!diagonal) {
      load_window<kTileT, kSimtK, kSimtLd, true>(
          Xj, nj, nk, acc_t(0), [&](int r, int c) { return Elem<T>::to_acc(X[(j0 + r) * n + k0 + c]); });
    }
    __syncthreads();
    simt_tile_mma<kTileT, kTileT, kSimtK, kSimtLd, kSimtLd>(acc, Xi, diagonal ? Xi : Xj);
    __syncthreads();
  }
}

template <typename T>
__global__ void __launch_bounds__(kSimtThreads)
    ghost_norm_simt_kernel(const T* __restrict__ A, const T* __restrict__ G, acc_of<T>* __restrict__ out,
                           int64_t B, int64_t n_tok, int64_t d, int64_t p, int64_t n_tiles) {
  using acc_t = typename Elem<T>::acc_t;
  constexpr int TM = kTileT / kSimtSide;
  __shared__ acc_t Xi[kSimtK * kSimtLd];
  __shared__ acc_t Xj[kSimtK * kSimtLd];

  int64_t ti, tj;
  tile::upper_tile_coords(blockIdx.x, n_tiles, &ti, &tj);
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    acc_t gram_a[TM][TM], gram_g[TM][TM];
    zero_acc(gram_a);
    zero_acc(gram_g);
    simt_gram_tile(gram_a, A + b * n_tok * d, n_tok, d, ti * kTileT, tj * kTileT, Xi, Xj);
    simt_gram_tile(gram_g, G + b * n_tok * p, n_tok, p, ti * kTileT, tj * kTileT, Xi, Xj);
    acc_t part = acc_t(0);
#pragma unroll
    for (int m = 0; m < TM; ++m) {
#pragma unroll
      for (int n = 0; n < TM; ++n) part += gram_a[m][n] * gram_g[m][n];
    }
    part = block_sum(part);
    if (threadIdx.x == 0) atomicAdd(out + b, tile::upper_tile_weight<acc_t>(ti, tj) * part);
  }
}

// ---------------------------------------------------------------------------------------
// Tensor-core path: fp16 / bf16 on sm_80+, fp32 accumulation.
// ---------------------------------------------------------------------------------------
constexpr int kTcK = 32;
constexpr int kTcLd = kTcK + 8;  // 16-bit elements: a multiple of 8 (wmma) that also staggers banks

// acc (this warp's 32 x 32 quadrant) += X[i0 : i0+64] X[j0 : j0+64]^T over the n columns of X.
template <typename T>
__device__ void tc_gram_tile(FragAcc (&acc)[kTcFrags][kTcFrags], const T* __restrict__ X, int64_t rows, int64_t n,
                             int64_t i0, int64_t j0, T* Xi, T* Xj) {
  const bool diagonal = i0 == j0;
  const int ni = static_cast<int>(std::min<int64_t>(rows - i0, kTileT));
  const int nj = static_cast<int>(std::min<int64_t>(rows - j0, kTileT));
  const int warp = threadIdx.x / kWarpSize;
  const int m0 = (warp / 2) * kTcWarpTile, n0 = (warp % 2) * kTcWarpTile;
  const bool vec = rows_16b_aligned(X, n);
  for (int64_t k0 = 0; k0 < n; k0 += kTcK) {
    const int nk = static_cast<int>(std::min<int64_t>(n - k0, kTcK));
    // Row-major copies [row][k]: Xi is the M x K operand (row_major), and the same storage
    // of Xj read as col_major is Xj^T, the K x N operand.
    load_rows_16bit<kTileT, kTcK, kTcLd>(Xi, X + i0 * n + k0, n, ni, nk, vec);
    if (!diagonal) load_rows_16bit<kTileT, kTcK, kTcLd>(Xj, X + j0 * n + k0, n, nj, nk, vec);
    __syncthreads();
    warp_tile_mma<kTcK, wmma::row_major, wmma::col_major>(acc, Xi, kTcLd, diagonal ? Xi : Xj, kTcLd, m0, n0);
    __syncthreads();
  }
}

template <typename T>
__global__ void __launch_bounds__(kTcThreads)
    ghost_norm_tc_kernel(const T* __restrict__ A, const T* __restrict__ G, float* __restrict__ out, int64_t B,
                         int64_t n_tok, int64_t d, int64_t p, int64_t n_tiles) {
#if DPK_TENSOR_CORES_COMPILED
  __shared__ __align__(32) T Xi[kTileT * kTcLd];
  __shared__ __align__(32) T Xj[kTileT * kTcLd];

  int64_t ti, tj;
  tile::upper_tile_coords(blockIdx.x, n_tiles, &ti, &tj);
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    FragAcc gram_a[kTcFrags][kTcFrags], gram_g[kTcFrags][kTcFrags];
    zero_frags(gram_a);
    zero_frags(gram_g);
    tc_gram_tile(gram_a, A + b * n_tok * d, n_tok, d, ti * kTileT, tj * kTileT, Xi, Xj);
    tc_gram_tile(gram_g, G + b * n_tok * p, n_tok, p, ti * kTileT, tj * kTileT, Xi, Xj);
    const float part = block_sum(frags_dot(gram_a, gram_g));
    if (threadIdx.x == 0) atomicAdd(out + b, tile::upper_tile_weight<float>(ti, tj) * part);
  }
#else
  __trap();
#endif
}

}  // namespace

template <typename T>
void launch_ghost_norm(const T* A, const T* G, acc_of<T>* out, int64_t B, int64_t n_tok, int64_t d, int64_t p,
                       bool tensor_cores, cudaStream_t stream) {
  if (B == 0 || n_tok == 0) return;
  const int64_t n_tiles = tile::cdiv(n_tok, kTileT);
  const dim3 grid(static_cast<unsigned int>(tile::num_upper_tiles(n_tiles)), sample_grid_dim(B));
  if constexpr (std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>) {
    if (tensor_cores) {
      ghost_norm_tc_kernel<T><<<grid, kTcThreads, 0, stream>>>(A, G, out, B, n_tok, d, p, n_tiles);
      return;
    }
  }
  ghost_norm_simt_kernel<T><<<grid, kSimtThreads, 0, stream>>>(A, G, out, B, n_tok, d, p, n_tiles);
}

#define DPK_INSTANTIATE(T)                                                                                        \
  template void launch_ghost_norm<T>(const T*, const T*, acc_of<T>*, int64_t, int64_t, int64_t, int64_t, bool, \
                                     cudaStream_t);
DPK_FOR_FLOATING(DPK_INSTANTIATE)
#undef DPK_INSTANTIATE

}  // namespace cuda
}  // namespace dpkernels
