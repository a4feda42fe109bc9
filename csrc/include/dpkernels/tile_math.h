// Small per-tile helpers shared by the CUDA kernels and (where useful) the C++ CPU kernels,
// so that tile bookkeeping (which (t, t') tiles a ghost norm visits, their weights, where
// the noise counters of a tensor start) is the same arithmetic on every backend.
#pragma once

#include <cstdint>

#ifndef DPK_HOST_DEVICE
#if defined(__CUDACC__) || defined(__HIPCC__)
#define DPK_HOST_DEVICE __host__ __device__
#else
#define DPK_HOST_DEVICE
#endif
#endif

namespace dpkernels {
namespace tile {

// Ceil division for tile counts.
DPK_HOST_DEVICE inline int64_t cdiv(int64_t n, int64_t block) { return (n + block - 1) / block; }

// Noise counters are consumed in Philox blocks of 4: the bias noise of clipped_sum starts at
// offset + round_up4(p * d) so that weight and bias never share a Philox block.
DPK_HOST_DEVICE inline int64_t round_up4(int64_t n) { return (n + 3) / 4 * 4; }

// Counter of the bias noise of clipped_sum (see reference.clipped_sum).
DPK_HOST_DEVICE inline int64_t bias_noise_offset(int64_t offset, int64_t p, int64_t d) {
  return offset + round_up4(p * d);
}

// Ghost norms only visit the upper triangle of the (t, t') tile grid: the Gram matrices are
// symmetric, so the off-diagonal tile (i, j), i < j, stands for itself and (j, i).
DPK_HOST_DEVICE inline int64_t num_upper_tiles(int64_t n_tiles) { return n_tiles * (n_tiles + 1) / 2; }

// Linear index over the upper triangle (row by row) -> (i, j) with i <= j.
DPK_HOST_DEVICE inline void upper_tile_coords(int64_t linear, int64_t n_tiles, int64_t* i, int64_t* j) {
  int64_t row = 0;
  while (linear >= n_tiles - row) {  // row r holds n_tiles - r tiles; a few iterations at most
    linear -= n_tiles - row;
    ++row;
  }
  *i = row;
  *j = row + linear;
}

// Weight of tile (i, j) in sum_{t,t'} (A A^T)_{tt'} (G G^T)_{tt'} when only i <= j is visited.
template <typename acc_t>
DPK_HOST_DEVICE inline acc_t upper_tile_weight(int64_t i, int64_t j) {
  return i == j ? acc_t(1) : acc_t(2);
}

// Frobenius inner product of two equally laid-out tiles: sum_k x[k] * y[k].
// With x = a tile of A A^T and y = the same tile of G G^T this is the ghost-norm term.
template <typename acc_t>
DPK_HOST_DEVICE inline acc_t frobenius_dot(const acc_t* x, const acc_t* y, int64_t n) {
  acc_t s = acc_t(0);
  for (int64_t k = 0; k < n; ++k) s += x[k] * y[k];
  return s;
}

// Squared Frobenius norm of a tile: the direct-norm term of one (p, d) tile of G_b^T A_b.
template <typename acc_t>
DPK_HOST_DEVICE inline acc_t sum_squares(const acc_t* x, int64_t n) {
  return frobenius_dot(x, x, n);
}

}  // namespace tile
}  // namespace dpkernels
