// Fused clipped sum + noise of a linear layer's weight gradient:
//
//   W = sum_b c_b G_b^T A_b + noise_std * Z,   Z[i, j] = z(offset + i * d + j)
//
// One GEMM over the B*T reduction: block (tile of W) walks all rows r of the flattened
// [B*T, p] / [B*T, d] inputs, scaling row r of G by c[r / T] as it is loaded (so clipped
// per-sample gradients never exist), and adds the Philox noise in the epilogue before the one
// store of W. The bias (sum_b c_bias_b sum_t G_b[t] + noise from offset + round_up4(p d)) is a
// small column-sum kernel (namespace bias, at the end).
#include "launchers.cuh"
#include "noise.cuh"
#include "tiles.cuh"

namespace dpkernels {
namespace cuda {
namespace {

constexpr int kTileP = 64;
constexpr int kTileD = 64;

// Clip factors of the rows [r0, r0 + n) of the flattened batch, computed once per K step.
template <typename acc_t>
__device__ __forceinline__ void load_row_scales(acc_t* scale, const acc_t* __restrict__ c, int64_t r0, int n,
                                                int64_t n_tok) {
  for (int r = threadIdx.x; r < n; r += blockDim.x) scale[r] = c[(r0 + r) / n_tok];
}

// Epilogue: out[p0 + r, d0 + col] = C[r][col] + noise_std * z(offset + (p0 + r) * d + d0 + col),
// masked to the p x d output. Each thread takes runs of 4 consecutive columns, so one Philox
// block (4 normals) serves up to 4 elements.
template <int LDC, typename acc_t>
__device__ void store_tile_with_noise(const acc_t* C, acc_t* __restrict__ out, int64_t p, int64_t d, int64_t p0,
                                      int64_t d0, double noise_std, uint64_t seed, uint64_t offset) {
  constexpr int kRun = 4;
  constexpr int kRunsPerRow = kTileD / kRun;
  for (int e = threadIdx.x; e < kTileP * kRunsPerRow; e += blockDim.x) {
    const int r = e / kRunsPerRow, c0 = (e % kRunsPerRow) * kRun;
    const int64_t i = p0 + r;
    if (i >= p) continue;
    NoiseCursor noise(seed);
#pragma unroll
    for (int col = c0; col < c0 + kRun; ++col) {
      const int64_t j = d0 + col;
      if (j >= d) break;
      acc_t v = C[r * LDC + col];
      if (noise_std != 0.0) v += acc_t(noise_std * noise(offset + uint64_t(i * d + j)));
      out[i * d + j] = v;
    }
  }
}

// ---------------------------------------------------------------------------------------
// SIMT path: fp32 / fp64, and fp16/bf16 before sm_80.
// ---------------------------------------------------------------------------------------
constexpr int kSimtK = 16;
constexpr int kSimtLdP = kTileP + 4;
constexpr int kSimtLdD = kTileD + 4;
constexpr int kSimtLdC = kTileD + 1;

template <typename acc_t>
constexpr int simt_smem_bytes() {
  constexpr int operands = kSimtK * (kSimtLdP + kSimtLdD) * int(sizeof(acc_t));
  constexpr int epilogue = kTileP * kSimtLdC * int(sizeof(acc_t));
  return operands > epilogue ? operands : epilogue;
}

template <typename T>
__global__ void __launch_bounds__(kSimtThreads)
    clipped_sum_simt_kernel(const T* __restrict__ A, const T* __restrict__ G,
                            const acc_of<T>* __restrict__ c, acc_of<T>* __restrict__ out,
                            int64_t n_rows, int64_t n_tok, int64_t d, int64_t p, int64_t tiles_d, double noise_std,
                            uint64_t seed, uint64_t offset) {
  using acc_t = typename Elem<T>::acc_t;
  constexpr int TM = kTileP / kSimtSide, TN = kTileD / kSimtSide;
  // The operand windows and the epilogue tile are never live at once: they share storage.
  __shared__ __align__(16) unsigned char smem[simt_smem_bytes<acc_t>()];
  __shared__ acc_t row_scale[kSimtK];
  acc_t* Gs = reinterpret_cast<acc_t*>(smem);
  acc_t* As = Gs + kSimtK * kSimtLdP;
  acc_t* Cs = reinterpret_cast<acc_t*>(smem);

  const int64_t p0 = (blockIdx.x / tiles_d) * kTileP, d0 = (blockIdx.x % tiles_d) * kTileD;
  const int np = static_cast<int>(std::min<int64_t>(p - p0, kTileP));
  const int nd = static_cast<int>(std::min<int64_t>(d - d0, kTileD));
  acc_t acc[TM][TN];
  zero_acc(acc);
  for (int64_t r0 = 0; r0 < n_rows; r0 += kSimtK) {
    const int nr = static_cast<int>(std::min<int64_t>(n_rows - r0, kSimtK));
    load_row_scales(row_scale, c, r0, nr, n_tok);
    __syncthreads();
    load_window<kSimtK, kTileP, kSimtLdP, false>(
        Gs, nr, np, acc_t(0), [&](int r, int col) { return row_scale[r] * Elem<T>::to_acc(G[(r0 + r) * p + p0 + col]); });
    load_window<kSimtK, kTileD, kSimtLdD, false>(
        As, nr, nd, acc_t(0), [&](int r, int col) { return Elem<T>::to_acc(A[(r0 + r) * d + d0 + col]); });
    __syncthreads();
    simt_tile_mma<kTileP, kTileD, kSimtK, kSimtLdP, kSimtLdD>(acc, Gs, As);
    __syncthreads();
  }
  const int ty = threadIdx.x / kSimtSide, tx = threadIdx.x % kSimtSide;
#pragma unroll
  for (int m = 0; m < TM; ++m) {
#pragma unroll
    for (int n = 0; n < TN; ++n) Cs[(ty + m * kSimtSide) * kSimtLdC + tx + n * kSimtSide] = acc[m][n];
  }
  __syncthreads();
  store_tile_with_noise<kSimtLdC>(Cs, out, p, d, p0, d0, noise_std, seed, offset);
}

// ---------------------------------------------------------------------------------------
// Tensor-core path: fp16 / bf16 on sm_80+. c_b * G is rounded back to the input dtype for
// the mma (|c_b| <= 1 in DP-SGD, so no overflow); accumulation stays fp32.
// ---------------------------------------------------------------------------------------
constexpr int kTcK = 32;
constexpr int kTcLdP = kTileP + 8;
constexpr int kTcLdD = kTileD + 8;
constexpr int kTcLdC = kTileD + 4;  // fp32 tile: wmma needs a multiple of 4 floats

template <typename T>
constexpr int tc_smem_bytes() {
  constexpr int operands = kTcK * (kTcLdP + kTcLdD) * int(sizeof(T));
  constexpr int epilogue = kTileP * kTcLdC * int(sizeof(float));
  return operands > epilogue ? operands : epilogue;
}

template <typename T>
__global__ void __launch_bounds__(kTcThreads)
    clipped_sum_tc_kernel(const T* __restrict__ A, const T* __restrict__ G, const float* __restrict__ c,
                          float* __restrict__ out, int64_t n_rows, int64_t n_tok, int64_t d, int64_t p,
                          int64_t tiles_d, double noise_std, uint64_t seed, uint64_t offset) {
#if DPK_TENSOR_CORES_COMPILED
  __shared__ __align__(32) unsigned char smem[tc_smem_bytes<T>()];
  __shared__ float row_scale[kTcK];
  T* Gs = reinterpret_cast<T*>(smem);
  T* As = Gs + kTcK * kTcLdP;  // kTcK * kTcLdP * 2 bytes is a multiple of 32: stays aligned
  float* Cs = reinterpret_cast<float*>(smem);

  const int64_t p0 = (blockIdx.x / tiles_d) * kTileP, d0 = (blockIdx.x % tiles_d) * kTileD;
  const int np = static_cast<int>(std::min<int64_t>(p - p0, kTileP));
  const int nd = static_cast<int>(std::min<int64_t>(d - d0, kTileD));
  const int warp = threadIdx.x / kWarpSize;
  const int m0 = (warp / 2) * kTcWarpTile, n0 = (warp % 2) * kTcWarpTile;
  const bool vec_g = rows_16b_aligned(G, p), vec_a = rows_16b_aligned(A, d);
  FragAcc acc[kTcFrags][kTcFrags];
  zero_frags(acc);
  for (int64_t r0 = 0; r0 < n_rows; r0 += kTcK) {
    const int nr = static_cast<int>(std::min<int64_t>(n_rows - r0, kTcK));
    load_row_scales(row_scale, c, r0, nr, n_tok);
    __syncthreads();
    load_rows_16bit<kTcK, kTileP, kTcLdP>(Gs, G + r0 * p + p0, p, nr, np, vec_g, row_scale);
    load_rows_16bit<kTcK, kTileD, kTcLdD>(As, A + r0 * d + d0, d, nr, nd, vec_a);
    __syncthreads();
    // Gs[r][p] read col_major is (c G)^T (p x r); As[r][d] read row_major is A (r x d).
    warp_tile_mma<kTcK, wmma::col_major, wmma::row_major>(acc, Gs, kTcLdP, As, kTcLdD, m0, n0);
    __syncthreads();
  }
#pragma unroll
  for (int fm = 0; fm < kTcFrags; ++fm) {
#pragma unroll
    for (int fn = 0; fn < kTcFrags; ++fn) {
      float* dst = Cs + (m0 + fm * kMmaTile) * kTcLdC + n0 + fn * kMmaTile;
      wmma::store_matrix_sync(dst, acc[fm][fn], kTcLdC, wmma::mem_row_major);
    }
  }
  __syncthreads();
  store_tile_with_noise<kTcLdC>(Cs, out, p, d, p0, d0, noise_std, seed, offset);
#else
  __trap();
#endif
}

}  // namespace

template <typename T>
void launch_clipped_sum(const T* A, const T* G, const acc_of<T>* c, acc_of<T>* out, int64_t B, int64_t n_tok,
                        int64_t d, int64_t p, double noise_std, uint64_t seed, uint64_t offset, bool tensor_cores,
                        cudaStream_t stream) {
  // B = 0 (an empty Poisson batch) still launches: the K loop is empty and W is pure noise.
  if (d == 0 || p == 0) return;
  const int64_t tiles_d = tile::cdiv(d, kTileD);
  const unsigned int grid = static_cast<unsigned int>(tile::cdiv(p, kTileP) * tiles_d);
  const int64_t n_rows = B * n_tok;
  if constexpr (std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>) {
    if (tensor_cores) {
      clipped_sum_tc_kernel<T><<<grid, kTcThreads, 0, stream>>>(A, G, c, out, n_rows, n_tok, d, p, tiles_d,
                                                                noise_std, seed, offset);
      return;
    }
  }
  clipped_sum_simt_kernel<T><<<grid, kSimtThreads, 0, stream>>>(A, G, c, out, n_rows, n_tok, d, p, tiles_d,
                                                                noise_std, seed, offset);
}

// =======================================================================================
// the clipped bias sum (clipped_sum with c_bias)
// =======================================================================================
namespace bias {
namespace {

constexpr int kThreads = 256;

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
}  // namespace bias

template <typename T>
void launch_clipped_bias_sum(const T* G, const acc_of<T>* c, acc_of<T>* out, int64_t B, int64_t n_tok, int64_t p,
                             double noise_std, uint64_t seed, uint64_t offset, cudaStream_t stream) {
  using namespace bias;
  if (p == 0) return;
  const unsigned int grid = static_cast<unsigned int>(tile::cdiv(p, kBiasCols));
  clipped_bias_sum_kernel<T><<<grid, kThreads, 0, stream>>>(G, c, out, B * n_tok, n_tok, p, noise_std, seed, offset);
}

#define DPK_INSTANTIATE(T)                                                                                     \
  template void launch_clipped_sum<T>(const T*, const T*, const acc_of<T>*, acc_of<T>*, int64_t, int64_t,    \
                                      int64_t, int64_t, double, uint64_t, uint64_t, bool, cudaStream_t);     \
  template void launch_clipped_bias_sum<T>(const T*, const acc_of<T>*, acc_of<T>*, int64_t, int64_t, int64_t, \
                                           double, uint64_t, uint64_t, cudaStream_t);
DPK_FOR_FLOATING(DPK_INSTANTIATE)
#undef DPK_INSTANTIATE

}  // namespace cuda
}  // namespace dpkernels
