// Small per-tile helpers for the CUDA kernels that the C++ CPU kernels can share, so that tile
// bookkeeping (which (t, t') tiles a ghost norm visits, their weights, where the bias noise
// starts) is the same arithmetic on every backend.
#pragma once

#include <cstdint>

#include "dpkernels/philox.h"  // DPK_HOST_DEVICE, round_up4

namespace dpkernels {
namespace tile {

// Ceil division for tile counts.
DPK_HOST_DEVICE inline int64_t cdiv(int64_t n, int64_t block) { return (n + block - 1) / block; }

// First noise counter of the bias in clipped_sum (reference.clipped_sum): the weight uses
// offset .. offset + p*d - 1, and rounding up to a whole Philox block of 4 keeps the two apart.
DPK_HOST_DEVICE inline int64_t bias_noise_offset(int64_t offset, int64_t p, int64_t d) {
  return offset + static_cast<int64_t>(round_up4(static_cast<uint64_t>(p * d)));
}

// Ghost norms only visit the upper triangle of the (t, t') tile grid: the Gram matrices are
// symmetric, so the off-diagonal tile (i, j), i < j, stands for itself and (j, i).
DPK_HOST_DEVICE inline int64_t num_upper_tiles(int64_t n_tiles) { return n_tiles * (n_tiles + 1) / 2; }

// Linear index over the upper triangle (row by row) -> (i, j) with i <= j.
DPK_HOST_DEVICE inline void upper_tile_coords(int64_t linear, int64_t n_tiles, int64_t* i, int64_t* j) {
  int64_t row = 0;
  while (linear >= n_tiles - row) {  // row r holds n_tiles - r tiles; cheap next to one tile of work
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

}  // namespace tile
}  // namespace dpkernels
