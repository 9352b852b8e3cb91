// The CUDA reference backward: FlashAttention-2, Algorithm 2 (Dao 2023), written for
// clarity, not speed, and deterministic (no atomics: every output element is written by
// exactly one thread, after a fixed-order sum). Three kernels:
//
//   delta_kernel  D_i = rowsum(dO_i * O_i)                        (Alg. 2 line 4)
//   dkdv_kernel   one block per kRows keys, looping over query tiles: dK_j, dV_j
//                 (the algorithm's outer loop over key blocks, lines 5-19, without dQ)
//   dq_kernel     one block per kRows queries, looping over key tiles: dQ_i
//                 (line 21's dQ_i, summed over j by the block that owns row i instead of
//                 by atomic adds from every key block)
//
// Both main kernels recompute P_ij = exp(S_ij - L_i) from the forward's L (line 11) and
// dS_ij = P_ij (dP_ij - D_i) (lines 13-14). O is the forward's float32 output (not the
// copy rounded to the input dtype), so D_i carries no fp16/bf16 rounding.
// The per-row arithmetic is in attention_reference.cuh, shared with the host build.
#include "attention_cuda.h"
#include "attention_warp.cuh"

namespace flashtile_ref {
namespace {

// One thread per query row: D_i = rowsum(dO_i * O_i).
template <typename T>
__global__ void __launch_bounds__(kThreads) delta_kernel(const BackwardArgs a) {
  const Problem& p = a.p;
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;  // over B * H * Nq
  if (row >= p.batch * p.heads * p.n_q) return;
  const int64_t i = row % p.n_q, bh = row / p.n_q;
  const int64_t b = bh / p.heads, h = bh % p.heads;
  a.delta[row] = delta_row<T>(a.d_out, offset(a.do_st, b, h, i, 0), a.do_st.d,
                              a.out + offset(contiguous_strides(p, p.n_q), b, h, i, 0), p.head_dim);
}

// Block = kRows keys, warp w owns key j = k0 + w and accumulates its dK_j and dV_j, lane
// by lane over the columns d = lane + 32 c. The block walks over the queries kTile at a
// time, lane r of each warp handling query q0 + r for P, dP and dS.
// Shared memory: k_rows, v_rows (kRows x D), the block's keys and values (line 6); a
// kTile x pitch(D) tile holding Q_i, then dO_i, then Q_i again (line 8); L_i and D_i of
// the tile's queries.
template <typename T>
__global__ void __launch_bounds__(kThreads) dkdv_kernel(const BackwardArgs a) {
  extern __shared__ float smem[];
  const Problem& p = a.p;
  const int D = p.head_dim;
  const int pitch = tile_pitch(D);
  float* k_rows = smem;
  float* v_rows = k_rows + kRows * D;
  float* tile = v_rows + kRows * D;
  float* tile_lse = tile + kTile * pitch;
  float* tile_delta = tile_lse + kTile;

  // This block's (batch, head) and keys k0..k0 + kRows - 1; this warp's key j.
  const OwnedRows own = owned_rows(p.n_k, p.heads);
  const int64_t bh = own.bh, b = own.b, h = own.h, k0 = own.first, j = own.row;
  const int warp = own.warp, lane = own.lane;

  load_tile<T>(k_rows, D, a.k, a.k_st, b, h, k0, kRows, p.n_k, D, threadIdx.x, blockDim.x);
  load_tile<T>(v_rows, D, a.v, a.v_st, b, h, k0, kRows, p.n_k, D, threadIdx.x, blockDim.x);
  const float* k_row = k_rows + warp * D;
  const float* v_row = v_rows + warp * D;

  // Line 7: dK_j = 0, dV_j = 0 (this lane's columns).
  float dk[kColsPerLane], dv[kColsPerLane];
  for (int c = 0; c < kColsPerLane; ++c) dk[c] = dv[c] = 0.0f;

  // Queries before `begin` see none of this block's keys (causal): skip them.
  for (int64_t q0 = query_begin(k0, p); q0 < p.n_q; q0 += kTile) {  // line 8: for i = 1..T_r
    __syncthreads();  // the previous Q tile is used up (and k_rows, v_rows are written)
    load_tile<T>(tile, pitch, a.q, a.q_st, b, h, q0, kTile, p.n_q, D, threadIdx.x, blockDim.x);
    if (threadIdx.x < kTile) {
      const int64_t row = q0 + threadIdx.x;
      tile_lse[threadIdx.x] = row < p.n_q ? a.lse[bh * p.n_q + row] : -INFINITY;
      tile_delta[threadIdx.x] = row < p.n_q ? a.delta[bh * p.n_q + row] : 0.0f;
    }
    __syncthreads();

    // Lines 10-11: S_ij and P_ij for query i = q0 + lane and this warp's key j.
    const int64_t i = q0 + lane;
    const float s = score(tile + lane * pitch, k_row, D, visible(i, j, p), p.scale);
    const float prob = prob_from_lse(s, tile_lse[lane]);

    __syncthreads();  // done with Q_i
    load_tile<T>(tile, pitch, a.d_out, a.do_st, b, h, q0, kTile, p.n_q, D, threadIdx.x, blockDim.x);
    __syncthreads();

    // Line 13: dP_ij = dO_i . V_j; line 14: dS_ij = P_ij (dP_ij - D_i).
    const float dp = dot(tile + lane * pitch, v_row, D);
    const float ds = dscore(prob, dp, tile_delta[lane]);
    // Line 12: dV_j += sum_i P_ij dO_i (lane r's P broadcast to the warp).
    add_weighted_rows(dv, prob, tile, pitch, D, lane);

    __syncthreads();  // done with dO_i
    load_tile<T>(tile, pitch, a.q, a.q_st, b, h, q0, kTile, p.n_q, D, threadIdx.x, blockDim.x);
    __syncthreads();

    // Line 17: dK_j += sum_i dS_ij Q_i (times the scale, applied once at the end).
    add_weighted_rows(dk, ds, tile, pitch, D, lane);
  }
  if (j >= p.n_k) return;

  // Line 19: write dK_j = scale * sum_i dS_ij Q_i and dV_j (float32).
  const Strides st = contiguous_strides(p, p.n_k);
  store_row(a.dk + offset(st, b, h, j, 0), dk, p.scale, D, lane);
  store_row(a.dv + offset(st, b, h, j, 0), dv, 1.0f, D, lane);
}

// Block = kRows queries, warp w owns query i = q0 + w and accumulates dQ_i over its
// columns; the block walks over the keys kTile at a time, lane r handling key k0 + r.
// Shared memory: q_rows, do_rows (kRows x D), the block's Q_i and dO_i; a kTile x pitch(D)
// tile holding K_j, then V_j, then K_j again.
template <typename T>
__global__ void __launch_bounds__(kThreads) dq_kernel(const BackwardArgs a) {
  extern __shared__ float smem[];
  const Problem& p = a.p;
  const int D = p.head_dim;
  const int pitch = tile_pitch(D);
  float* q_rows = smem;
  float* do_rows = q_rows + kRows * D;
  float* tile = do_rows + kRows * D;

  // This block's (batch, head) and queries q0..q0 + kRows - 1; this warp's query i.
  const OwnedRows own = owned_rows(p.n_q, p.heads);
  const int64_t bh = own.bh, b = own.b, h = own.h, q0 = own.first, i = own.row;
  const int warp = own.warp, lane = own.lane;
  const bool row_in_range = i < p.n_q;

  load_tile<T>(q_rows, D, a.q, a.q_st, b, h, q0, kRows, p.n_q, D, threadIdx.x, blockDim.x);
  load_tile<T>(do_rows, D, a.d_out, a.do_st, b, h, q0, kRows, p.n_q, D, threadIdx.x, blockDim.x);
  const float* q_row = q_rows + warp * D;
  const float* do_row = do_rows + warp * D;
  const float lse = row_in_range ? a.lse[bh * p.n_q + i] : -INFINITY;
  const float delta = row_in_range ? a.delta[bh * p.n_q + i] : 0.0f;

  float dq[kColsPerLane];
  for (int c = 0; c < kColsPerLane; ++c) dq[c] = 0.0f;

  const int64_t end = block_key_end(q0, p);
  for (int64_t k0 = 0; k0 < end; k0 += kTile) {
    __syncthreads();  // the previous K tile is used up (and q_rows, do_rows are written)
    load_tile<T>(tile, pitch, a.k, a.k_st, b, h, k0, kTile, p.n_k, D, threadIdx.x, blockDim.x);
    __syncthreads();

    // Lines 10-11: S_ij, P_ij for this warp's query i and key j = k0 + lane.
    const int64_t j = k0 + lane;
    const float s = score(q_row, tile + lane * pitch, D, visible(i, j, p), p.scale);
    const float prob = prob_from_lse(s, lse);

    __syncthreads();  // done with K_j
    load_tile<T>(tile, pitch, a.v, a.v_st, b, h, k0, kTile, p.n_k, D, threadIdx.x, blockDim.x);
    __syncthreads();

    // Lines 13-14: dP_ij = dO_i . V_j, dS_ij = P_ij (dP_ij - D_i).
    const float ds = dscore(prob, dot(do_row, tile + lane * pitch, D), delta);

    __syncthreads();  // done with V_j
    load_tile<T>(tile, pitch, a.k, a.k_st, b, h, k0, kTile, p.n_k, D, threadIdx.x, blockDim.x);
    __syncthreads();

    // Line 15: dQ_i += sum_j dS_ij K_j (times the scale, applied once at the end).
    add_weighted_rows(dq, ds, tile, pitch, D, lane);
  }
  if (!row_in_range) return;

  // Line 21: write dQ_i = scale * sum_j dS_ij K_j (float32).
  store_row(a.dq + offset(contiguous_strides(p, p.n_q), b, h, i, 0), dq, p.scale, D, lane);
}

template <typename Kernel>
cudaError_t launch(Kernel kernel, int64_t blocks, size_t smem, cudaStream_t stream, const BackwardArgs& a) {
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  if (smem > 0) {
    // Above 48 KB a kernel must opt in to more dynamic shared memory (49.5 KB at D = 256;
    // sm_75 allows 64 KB).
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<unsigned(blocks), kThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward(const BackwardArgs& a, cudaStream_t stream) {
  const Problem& p = a.p;
  const int64_t bh = p.batch * p.heads;
  const size_t D = size_t(p.head_dim), tile = size_t(kTile) * tile_pitch(p.head_dim);
  cudaError_t err = launch(delta_kernel<T>, ceil_div(bh * p.n_q, kThreads), 0, stream, a);
  if (err != cudaSuccess) return err;
  err = launch(dkdv_kernel<T>, bh * ceil_div(p.n_k, kRows), sizeof(float) * (2 * kRows * D + tile + 2 * kTile),
               stream, a);
  if (err != cudaSuccess) return err;
  return launch(dq_kernel<T>, bh * ceil_div(p.n_q, kRows), sizeof(float) * (2 * kRows * D + tile), stream, a);
}

}  // namespace

cudaError_t backward_cuda(const BackwardArgs& args, cudaStream_t stream) {
  if (check_problem(args.p) != nullptr) return cudaErrorInvalidValue;
  return dispatch_dtype(args.dtype, cudaErrorInvalidValue, [&](auto type) {
    return launch_backward<typename decltype(type)::type>(args, stream);
  });
}

}  // namespace flashtile_ref
