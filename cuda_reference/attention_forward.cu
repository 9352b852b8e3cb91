// The CUDA reference forward: FlashAttention-2, Algorithm 1 (Dao 2023), written for
// clarity, not speed. The per-row arithmetic is in attention_reference.cuh, shared with
// the host build (attention_host.cpp).
//
// Work split: one block per (batch, query head, tile of kRows = 8 queries); warp w of the
// block owns query row i = q0 + w. The block walks over the keys its queries can see
// (key_range: the window's, causal's, bounds), kTile = 32 at a time, reading the K/V head
// of its query head's group; in each step lane j of a warp handles key k0 + j for the
// score and the softmax, and column d = lane + 32 c of the output accumulator. In the
// varlen layout the grid is sized by the longest sequence, and the blocks past the end of
// a shorter one have nothing to do.
//
// Shared memory (float32, inputs converted when loaded):
//   q_rows  kRows x D            this block's queries (Alg. 1 line 4: load Q_i)
//   kv_tile kTile x pitch(D)     a K tile (line 6), then the V tile of the same keys
// K and V share one buffer, loaded one after the other, so that D = 256 fits in 41 KB.
#include "attention_cuda.h"
#include "attention_warp.cuh"

namespace flashtile_ref {
namespace {

template <typename T>
__global__ void __launch_bounds__(kThreads) forward_kernel(const ForwardArgs a) {
  extern __shared__ float smem[];
  const Problem& p = a.p;
  const int D = p.head_dim;
  const int pitch = tile_pitch(D);
  float* q_rows = smem;
  float* kv_tile = smem + kRows * D;

  // This block's (batch, query head) and queries q0..q0 + kRows - 1 of sequence b; this
  // warp's query row i (counted from the sequence's start).
  const OwnedRows own = owned_rows(p.n_q, p.heads_q);
  const int64_t b = own.b, h = own.h, q0 = own.first, i = own.row;
  const int warp = own.warp, lane = own.lane;
  const Sequence seq = sequence_of(b, p);
  const int64_t hk = kv_head(h, p);
  const bool row_in_range = i < seq.n_q;

  load_tile<T>(q_rows, D, a.q, a.q_st, b, h, seq.q_start + q0, kRows, seq.q_end, D, threadIdx.x, blockDim.x);
  const float* q_row = q_rows + warp * D;

  // Alg. 1 line 5: O~ = 0, l = 0, m = -inf. Every lane holds the same m and l (they are
  // computed from warp-wide reductions) and its own columns of O~.
  float m = -INFINITY, l = 0.0f;
  float acc[kColsPerLane];
  for (int c = 0; c < kColsPerLane; ++c) acc[c] = 0.0f;

  // Keys outside `keys` are masked for every query of the block: their tiles are skipped.
  // The range is the same for all threads, so the __syncthreads() below are reached by all.
  const Range keys = key_range(q0, q0 + kRows - 1, seq, p);
  for (int64_t k0 = keys.begin; k0 < keys.end; k0 += kTile) {  // Alg. 1 line 6: for j = 1..T_c
    __syncthreads();  // every warp is done with the previous V tile (and q_rows is written)
    load_tile<T>(kv_tile, pitch, a.k, a.k_st, b, hk, seq.k_start + k0, kTile, seq.k_end, D, threadIdx.x,
                 blockDim.x);
    __syncthreads();

    // Line 8: S_ij for this lane's key j.
    const int64_t j = k0 + lane;
    const float s = score(q_row, kv_tile + lane * pitch, D, visible(i, j, seq, p), p);
    // Lines 9-10: new running max, P~_ij, and l rescaled to the new max plus this tile's sum.
    const float m_new = softmax_new_max(m, warp_max(s));
    const float weight = softmax_weight(s, m_new);
    const float rescale = softmax_rescale(m, m_new);
    l = softmax_sum(l, rescale, warp_sum(weight));
    m = m_new;

    __syncthreads();  // every warp is done with the K tile
    load_tile<T>(kv_tile, pitch, a.v, a.v_st, b, hk, seq.k_start + k0, kTile, seq.k_end, D, threadIdx.x,
                 blockDim.x);
    __syncthreads();

    // Line 10: O~_i = diag(exp(m_old - m_new)) O~_i + P~_i V_j. Lane jj's weight is
    // broadcast to the warp; each lane updates its own columns.
    for (int c = 0; c < kColsPerLane; ++c) acc[c] *= rescale;
    add_weighted_rows(acc, weight, kv_tile, pitch, D, lane);
  }
  if (!row_in_range) return;  // past the last query: nothing to write (no barrier follows)

  // Lines 12-13: O_i = diag(l)^-1 O~_i and L_i = m + log(l), written as float32.
  const int64_t row = seq.q_start + i;
  store_row(a.out + q_output_offset(p, b, h, row), acc, output_factor(l), D, lane);
  if (lane == 0) a.lse[lse_index(p, b, h, row)] = log_sum_exp(m, l);
}

template <typename T>
cudaError_t launch_forward(const ForwardArgs& a, cudaStream_t stream) {
  const Problem& p = a.p;
  const int64_t blocks = p.batch * p.heads_q * ceil_div(p.n_q, kRows);
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const size_t smem = sizeof(float) * (size_t(kRows) * p.head_dim + size_t(kTile) * tile_pitch(p.head_dim));
  // Above 48 KB a kernel must opt in to more dynamic shared memory (41 KB at D = 256).
  cudaError_t err = cudaFuncSetAttribute(forward_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err != cudaSuccess) return err;
  forward_kernel<T><<<unsigned(blocks), kThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t forward_cuda(const ForwardArgs& args, cudaStream_t stream) {
  if (check_problem(args.p) != nullptr) return cudaErrorInvalidValue;
  return dispatch_dtype(args.dtype, cudaErrorInvalidValue, [&](auto type) {
    return launch_forward<typename decltype(type)::type>(args, stream);
  });
}

}  // namespace flashtile_ref
