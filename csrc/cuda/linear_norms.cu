// The per-sample gradient norms of a linear layer (ops ghost_norm and direct_norm; dpkernels/ops.py), and
// the norms of its bias, which both take.
//
// ghost_norm: the ghost (Gram) norm of a linear layer's per-sample weight gradient g_b = G_b^T A_b:
//
//   ||g_b||_F^2 = sum_{t,t'} (A_b A_b^T)_{tt'} (G_b G_b^T)_{tt'}
//
// One block per (tile (i, j) of the T x T grid with i <= j, sample b). It builds the 64 x 64
// tile (i, j) of both Gram matrices in registers (a K loop over d, then one over p), takes
// their Frobenius product and adds it into out[b], twice for i < j since both Grams are
// symmetric. Like flash attention, no T x T matrix ever exists in global memory.
// Cost ~ T^2 (d + p) per sample: the engine picks this when T (d + p) < d p.
//
// direct_norm: the direct norm of a linear layer's per-sample weight gradient: ||G_b^T A_b||_F^2.
//
// One block per (64 x 64 tile of the p x d gradient, sample b): the tile of g_b = G_b^T A_b
// is accumulated in registers over the T tokens of sample b, squared and summed, and the sum
// is added into out[b]. g_b is never written. Cost ~ T d p per sample, the same as the
// weight-gradient GEMM; the engine picks this when T (d + p) >= d p.
//
// Bias: its per-sample gradient is sum_t G_b[t], so its norm is a column sum of G.
// Each part has its own namespace: their tile constants share names.
#include "launchers.cuh"
#include "tiles.cuh"

namespace dpkernels {
namespace cuda {

// =======================================================================================
// ghost_norm
// =======================================================================================
namespace ghost {
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
}  // namespace ghost

template <typename T>
void launch_ghost_norm(const T* A, const T* G, acc_of<T>* out, int64_t B, int64_t n_tok, int64_t d, int64_t p,
                       bool tensor_cores, cudaStream_t stream) {
  using namespace ghost;
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

// =======================================================================================
// direct_norm
// =======================================================================================
namespace direct {
namespace {

constexpr int kTileP = 64;  // gradient rows (output features) per block
constexpr int kTileD = 64;  // gradient columns (input features) per block

// ---------------------------------------------------------------------------------------
// SIMT path: fp32 / fp64, and fp16/bf16 before sm_80.
// smem holds token-major windows Gs[t][p], As[t][d]: exactly the k-major operands
// simt_tile_mma wants, loaded straight from the row-major [T, p] / [T, d] inputs.
// ---------------------------------------------------------------------------------------
constexpr int kSimtK = 16;
constexpr int kSimtLdP = kTileP + 4;
constexpr int kSimtLdD = kTileD + 4;

template <typename T>
__global__ void __launch_bounds__(kSimtThreads)
    direct_norm_simt_kernel(const T* __restrict__ A, const T* __restrict__ G, acc_of<T>* __restrict__ out,
                            int64_t B, int64_t n_tok, int64_t d, int64_t p, int64_t tiles_d) {
  using acc_t = typename Elem<T>::acc_t;
  constexpr int TM = kTileP / kSimtSide, TN = kTileD / kSimtSide;
  __shared__ acc_t Gs[kSimtK * kSimtLdP];
  __shared__ acc_t As[kSimtK * kSimtLdD];

  const int64_t p0 = (blockIdx.x / tiles_d) * kTileP, d0 = (blockIdx.x % tiles_d) * kTileD;
  const int np = static_cast<int>(std::min<int64_t>(p - p0, kTileP));
  const int nd = static_cast<int>(std::min<int64_t>(d - d0, kTileD));
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const T* Ab = A + b * n_tok * d;
    const T* Gb = G + b * n_tok * p;
    acc_t acc[TM][TN];
    zero_acc(acc);
    for (int64_t t0 = 0; t0 < n_tok; t0 += kSimtK) {
      const int nt = static_cast<int>(std::min<int64_t>(n_tok - t0, kSimtK));
      load_window<kSimtK, kTileP, kSimtLdP, false>(
          Gs, nt, np, acc_t(0), [&](int r, int c) { return Elem<T>::to_acc(Gb[(t0 + r) * p + p0 + c]); });
      load_window<kSimtK, kTileD, kSimtLdD, false>(
          As, nt, nd, acc_t(0), [&](int r, int c) { return Elem<T>::to_acc(Ab[(t0 + r) * d + d0 + c]); });
      __syncthreads();
      simt_tile_mma<kTileP, kTileD, kSimtK, kSimtLdP, kSimtLdD>(acc, Gs, As);
      __syncthreads();
    }
    acc_t part = acc_t(0);
#pragma unroll
    for (int m = 0; m < TM; ++m) {
#pragma unroll
      for (int n = 0; n < TN; ++n) part += acc[m][n] * acc[m][n];
    }
    part = block_sum(part);
    if (threadIdx.x == 0) atomicAdd(out + b, part);
  }
}

// ---------------------------------------------------------------------------------------
// Tensor-core path: fp16 / bf16 on sm_80+. Gs[t][p] read as col_major is the p x t operand
// G_b^T; As[t][d] read as row_major is the t x d operand A_b.
// ---------------------------------------------------------------------------------------
constexpr int kTcK = 32;
constexpr int kTcLdP = kTileP + 8;
constexpr int kTcLdD = kTileD + 8;

template <typename T>
__global__ void __launch_bounds__(kTcThreads)
    direct_norm_tc_kernel(const T* __restrict__ A, const T* __restrict__ G, float* __restrict__ out, int64_t B,
                          int64_t n_tok, int64_t d, int64_t p, int64_t tiles_d) {
#if DPK_TENSOR_CORES_COMPILED
  __shared__ __align__(32) T Gs[kTcK * kTcLdP];
  __shared__ __align__(32) T As[kTcK * kTcLdD];

  const int64_t p0 = (blockIdx.x / tiles_d) * kTileP, d0 = (blockIdx.x % tiles_d) * kTileD;
  const int np = static_cast<int>(std::min<int64_t>(p - p0, kTileP));
  const int nd = static_cast<int>(std::min<int64_t>(d - d0, kTileD));
  const int warp = threadIdx.x / kWarpSize;
  const int m0 = (warp / 2) * kTcWarpTile, n0 = (warp % 2) * kTcWarpTile;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const T* Ab = A + b * n_tok * d;
    const T* Gb = G + b * n_tok * p;
    const bool vec_g = rows_16b_aligned(Gb, p), vec_a = rows_16b_aligned(Ab, d);
    FragAcc acc[kTcFrags][kTcFrags];
    zero_frags(acc);
    for (int64_t t0 = 0; t0 < n_tok; t0 += kTcK) {
      const int nt = static_cast<int>(std::min<int64_t>(n_tok - t0, kTcK));
      load_rows_16bit<kTcK, kTileP, kTcLdP>(Gs, Gb + t0 * p + p0, p, nt, np, vec_g);
      load_rows_16bit<kTcK, kTileD, kTcLdD>(As, Ab + t0 * d + d0, d, nt, nd, vec_a);
      __syncthreads();
      warp_tile_mma<kTcK, wmma::col_major, wmma::row_major>(acc, Gs, kTcLdP, As, kTcLdD, m0, n0);
      __syncthreads();
    }
    const float part = block_sum(frags_dot(acc, acc));
    if (threadIdx.x == 0) atomicAdd(out + b, part);
  }
#else
  __trap();
#endif
}

}  // namespace
}  // namespace direct

template <typename T>
void launch_direct_norm(const T* A, const T* G, acc_of<T>* out, int64_t B, int64_t n_tok, int64_t d, int64_t p,
                        bool tensor_cores, cudaStream_t stream) {
  using namespace direct;
  if (B == 0 || n_tok == 0 || d == 0 || p == 0) return;
  const int64_t tiles_d = tile::cdiv(d, kTileD);
  const dim3 grid(static_cast<unsigned int>(tile::cdiv(p, kTileP) * tiles_d), sample_grid_dim(B));
  if constexpr (std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>) {
    if (tensor_cores) {
      direct_norm_tc_kernel<T><<<grid, kTcThreads, 0, stream>>>(A, G, out, B, n_tok, d, p, tiles_d);
      return;
    }
  }
  direct_norm_simt_kernel<T><<<grid, kSimtThreads, 0, stream>>>(A, G, out, B, n_tok, d, p, tiles_d);
}

// =======================================================================================
// the bias norm (ghost_norm and direct_norm with_bias)
// =======================================================================================
namespace bias {
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

}  // namespace
}  // namespace bias

template <typename T>
void launch_bias_sq_norms(const T* G, acc_of<T>* out, int64_t B, int64_t n_tok, int64_t p, cudaStream_t stream) {
  using namespace bias;
  if (B == 0 || p == 0) return;
  const dim3 grid(static_cast<unsigned int>(tile::cdiv(p, kThreads)), sample_grid_dim(B));
  bias_sq_norms_kernel<T><<<grid, kThreads, 0, stream>>>(G, out, B, n_tok, p);
}

#define DPK_INSTANTIATE(T)                                                                                         \
  template void launch_ghost_norm<T>(const T*, const T*, acc_of<T>*, int64_t, int64_t, int64_t, int64_t, bool,    \
                                     cudaStream_t);                                                               \
  template void launch_direct_norm<T>(const T*, const T*, acc_of<T>*, int64_t, int64_t, int64_t, int64_t, bool,   \
                                      cudaStream_t);                                                              \
  template void launch_bias_sq_norms<T>(const T*, acc_of<T>*, int64_t, int64_t, int64_t, cudaStream_t);
DPK_FOR_FLOATING(DPK_INSTANTIATE)
#undef DPK_INSTANTIATE

}  // namespace cuda
}  // namespace dpkernels
