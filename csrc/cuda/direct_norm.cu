// Direct norm of a linear layer's per-sample weight gradient: ||G_b^T A_b||_F^2.
//
// One block per (64 x 64 tile of the p x d gradient, sample b): the tile of g_b = G_b^T A_b
// is accumulated in registers over the T tokens of sample b, squared and summed, and the sum
// is added into out[b]. g_b is never written. Cost ~ T d p per sample, the same as the
// weight-gradient GEMM; the engine picks this when T (d + p) >= d p.
#include "launchers.cuh"
#include "tiles.cuh"

namespace dpkernels {
namespace cuda {
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

template <typename T>
void launch_direct_norm(const T* A, const T* G, acc_of<T>* out, int64_t B, int64_t n_tok, int64_t d, int64_t p,
                        bool tensor_cores, cudaStream_t stream) {
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

#define DPK_INSTANTIATE(T)                                                                                         \
  template void launch_direct_norm<T>(const T*, const T*, acc_of<T>*, int64_t, int64_t, int64_t, int64_t, bool, \
                                      cudaStream_t);
DPK_FOR_FLOATING(DPK_INSTANTIATE)
#undef DPK_INSTANTIATE

}  // namespace cuda
}  // namespace dpkernels
