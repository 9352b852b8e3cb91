// The CUDA-only pieces the reference kernels (attention_forward.cu, attention_backward.cu)
// share: which rows a block owns, the warp reductions, and the "weighted sum of tile rows"
// that every P V, P^T dO, dS K and dS^T Q product of Algorithms 1 and 2 reduces to when
// one warp owns one output row.
//
// Layout they all assume: a block of kRows warps owns kRows consecutive rows (queries in
// the forward and dQ kernels, keys in the dK/dV kernel) of one (batch, head); warp w owns
// row first + w; lane `lane` of a warp holds the columns d = lane + 32 c (c < kColsPerLane)
// of that row's float32 accumulator.
#pragma once

#include "attention_reference.cuh"

namespace flashtile_ref {

constexpr unsigned kFullMask = 0xffffffffu;

// The rows this thread's block and warp own. Blocks are numbered along one axis (grid.x):
// block x takes (batch, head) bh = x / tiles and rows [first, first + kRows) (counted from
// the sequence's start), so any B * H fits.
struct OwnedRows {
  int64_t bh, b, h;  // (batch, head), flattened and split
  int64_t first;     // the block's first row
  int warp, lane;    // this thread's warp and lane
  int64_t row;       // this warp's row: first + warp (may be past the last row)
};

// `n_rows` is the length of the owned dimension (Nq or Nk; varlen: the longest sequence's)
// and `heads` the number of heads the grid runs over (query heads, or K/V heads for dK/dV).
__device__ __forceinline__ OwnedRows owned_rows(int64_t n_rows, int64_t heads) {
  const int64_t tiles = ceil_div(n_rows, kRows);
  OwnedRows o;
  o.bh = blockIdx.x / tiles;
  o.first = (blockIdx.x % tiles) * kRows;
  o.b = o.bh / heads;
  o.h = o.bh % heads;
  o.warp = threadIdx.x / kTile;
  o.lane = threadIdx.x % kTile;
  o.row = o.first + o.warp;
  return o;
}

__device__ __forceinline__ float warp_max(float x) {
  for (int offset = kTile / 2; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, offset));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = kTile / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

// acc += sum_r w_r * tile[r, :] over the kTile rows of a shared-memory tile, where lane r
// holds w_r (`weight`): each lane's w is broadcast to the warp in turn, and every lane
// updates its own columns. Rows in a fixed order, so the sum is deterministic.
__device__ __forceinline__ void add_weighted_rows(float (&acc)[kColsPerLane], float weight, const float* tile,
                                                  int pitch, int head_dim, int lane) {
  for (int r = 0; r < kTile; ++r) {
    const float w = __shfl_sync(kFullMask, weight, r);
    for (int c = 0; c < kColsPerLane; ++c) {
      const int d = lane + c * kTile;
      if (d < head_dim) acc[c] += w * tile[r * pitch + d];
    }
  }
}

// row[d] = factor * acc[c] for this lane's columns d = lane + 32 c (a float32 output row).
__device__ __forceinline__ void store_row(float* row, const float (&acc)[kColsPerLane], float factor, int head_dim,
                                          int lane) {
  for (int c = 0; c < kColsPerLane; ++c) {
    const int d = lane + c * kTile;
    if (d < head_dim) row[d] = factor * acc[c];
  }
}

}  // namespace flashtile_ref
