// The CUDA reference backward: FlashAttention-2, Algorithm 2 (Dao 2023), written for
// clarity, not speed, and deterministic (no atomics: every output element is written by
// exactly one thread, after a fixed-order sum). Three kernels:
//
//   delta_kernel  D_i = rowsum(dO_i * O_i)                        (Alg. 2 line 4)
//   dkdv_kernel   one block per kRows keys of a K/V head, looping over the query heads of
//                 its group and their query tiles: dK_j, dV_j (the algorithm's outer loop
//                 over key blocks, lines 5-19, without dQ; GQA's sum over the group in a
//                 fixed order)
//   dq_kernel     one block per kRows queries, looping over key tiles: dQ_i
//                 (line 21's dQ_i, summed over j by the block that owns row i instead of
//                 by atomic adds from every key block)
//
// Both main kernels recompute P_ij = exp(S_ij - L_i) from the forward's L (line 11) and
// dS_ij = P_ij (dP_ij - D_i) (lines 13-14; with a softcap, times tanh's derivative), and
// visit only the tiles inside the window (key_range, query_range). O is the forward's float32 output (not the
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
  const int64_t thread = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;  // over B * Hq * Nq
  if (thread >= p.batch * p.heads_q * p.n_q) return;
  const int64_t i = thread % p.n_q, bh = thread / p.n_q;
  const int64_t b = bh / p.heads_q, h = bh % p.heads_q;
  const Sequence seq = sequence_of(b, p);
  if (i >= seq.n_q) return;  // varlen: past the end of a sequence shorter than the longest
  const int64_t row = seq.q_start + i;
  a.delta[lse_index(p, b, h, row)] = delta_row<T>(a.d_out, offset(a.do_st, b, h, row, 0), a.do_st.d,
                                                  a.out + q_output_offset(p, b, h, row), p.head_dim);
}

// Block = kRows keys of one K/V head, warp w owns key j = k0 + w and accumulates its dK_j
// and dV_j, lane by lane over the columns d = lane + 32 c. The block walks over the query
// heads of its group one after the other, and for each over the queries that see its keys
// (query_range), kTile at a time, lane r of each warp handling query q0 + r for P, dP and
// dS. The group's sum is this loop, in a fixed order, in registers: no other block writes
// these dK, dV rows, and no atomics.
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

  // This block's (batch, K/V head) and keys k0..k0 + kRows - 1 of sequence b; this warp's
  // key j (counted from the sequence's start).
  const OwnedRows own = owned_rows(p.n_k, p.heads_kv);
  const int64_t b = own.b, hk = own.h, k0 = own.first, j = own.row;
  const int warp = own.warp, lane = own.lane;
  const Sequence seq = sequence_of(b, p);

  load_tile<T>(k_rows, D, a.k, a.k_st, b, hk, seq.k_start + k0, kRows, seq.k_end, D, threadIdx.x, blockDim.x);
  load_tile<T>(v_rows, D, a.v, a.v_st, b, hk, seq.k_start + k0, kRows, seq.k_end, D, threadIdx.x, blockDim.x);
  const float* k_row = k_rows + warp * D;
  const float* v_row = v_rows + warp * D;

  // Line 7: dK_j = 0, dV_j = 0 (this lane's columns).
  float dk[kColsPerLane], dv[kColsPerLane];
  for (int c = 0; c < kColsPerLane; ++c) dk[c] = dv[c] = 0.0f;

  // Queries outside `queries` see none of this block's keys: their tiles are skipped. The
  // bounds are the same for all threads, so the __syncthreads() below are reached by all.
  const Range queries = query_range(k0, k0 + kRows - 1, seq, p);
  for (int64_t h = hk * group_size(p); h < (hk + 1) * group_size(p); ++h) {  // the group's query heads
    for (int64_t q0 = queries.begin; q0 < queries.end; q0 += kTile) {  // line 8: for i = 1..T_r
      __syncthreads();  // the previous Q tile is used up (and k_rows, v_rows are written)
      load_tile<T>(tile, pitch, a.q, a.q_st, b, h, seq.q_start + q0, kTile, seq.q_end, D, threadIdx.x, blockDim.x);
      if (threadIdx.x < kTile) {
        const int64_t i = q0 + threadIdx.x;
        const bool in_range = i < seq.n_q;
        tile_lse[threadIdx.x] = in_range ? a.lse[lse_index(p, b, h, seq.q_start + i)] : -INFINITY;
        tile_delta[threadIdx.x] = in_range ? a.delta[lse_index(p, b, h, seq.q_start + i)] : 0.0f;
      }
      __syncthreads();

      // Lines 10-11: S_ij and P_ij for query i = q0 + lane and this warp's key j.
      const int64_t i = q0 + lane;
      const float s = score(tile + lane * pitch, k_row, D, visible(i, j, seq, p), p);
      const float prob = prob_from_lse(s, tile_lse[lane]);

      __syncthreads();  // done with Q_i
      load_tile<T>(tile, pitch, a.d_out, a.do_st, b, h, seq.q_start + q0, kTile, seq.q_end, D, threadIdx.x,
                   blockDim.x);
      __syncthreads();

      // Line 13: dP_ij = dO_i . V_j; line 14: dS_ij = P_ij (dP_ij - D_i) (softcap: times dS/dX).
      const float dp = dot(tile + lane * pitch, v_row, D);
      const float ds = dscore(prob, dp, tile_delta[lane], s, p);
      // Line 12: dV_j += sum_i P_ij dO_i (lane r's P broadcast to the warp).
      add_weighted_rows(dv, prob, tile, pitch, D, lane);

      __syncthreads();  // done with dO_i
      load_tile<T>(tile, pitch, a.q, a.q_st, b, h, seq.q_start + q0, kTile, seq.q_end, D, threadIdx.x, blockDim.x);
      __syncthreads();

      // Line 17: dK_j += sum_i dS_ij Q_i (times the scale, applied once at the end).
      add_weighted_rows(dk, ds, tile, pitch, D, lane);
    }
  }
  if (j >= seq.n_k) return;

  // Line 19: write dK_j = scale * sum_i dS_ij Q_i and dV_j (float32).
  const int64_t row = seq.k_start + j;
  store_row(a.dk + kv_output_offset(p, b, hk, row), dk, p.scale, D, lane);
  store_row(a.dv + kv_output_offset(p, b, hk, row), dv, 1.0f, D, lane);
}

// Block = kRows queries, warp w owns query i = q0 + w and accumulates dQ_i over its
// columns; the block walks over the keys its queries see (key_range), kTile at a time,
// lane r handling key k0 + r, from the K/V head of its query head's group.
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

  // This block's (batch, query head) and queries q0..q0 + kRows - 1 of sequence b; this
  // warp's query i (counted from the sequence's start).
  const OwnedRows own = owned_rows(p.n_q, p.heads_q);
  const int64_t b = own.b, h = own.h, q0 = own.first, i = own.row;
  const int warp = own.warp, lane = own.lane;
  const Sequence seq = sequence_of(b, p);
  const int64_t hk = kv_head(h, p);
  const bool row_in_range = i < seq.n_q;

  load_tile<T>(q_rows, D, a.q, a.q_st, b, h, seq.q_start + q0, kRows, seq.q_end, D, threadIdx.x, blockDim.x);
  load_tile<T>(do_rows, D, a.d_out, a.do_st, b, h, seq.q_start + q0, kRows, seq.q_end, D, threadIdx.x,
               blockDim.x);
  const float* q_row = q_rows + warp * D;
  const float* do_row = do_rows + warp * D;
  const float lse = row_in_range ? a.lse[lse_index(p, b, h, seq.q_start + i)] : -INFINITY;
  const float delta = row_in_range ? a.delta[lse_index(p, b, h, seq.q_start + i)] : 0.0f;

  float dq[kColsPerLane];
  for (int c = 0; c < kColsPerLane; ++c) dq[c] = 0.0f;

  const Range keys = key_range(q0, q0 + kRows - 1, seq, p);
  for (int64_t k0 = keys.begin; k0 < keys.end; k0 += kTile) {
    __syncthreads();  // the previous K tile is used up (and q_rows, do_rows are written)
    load_tile<T>(tile, pitch, a.k, a.k_st, b, hk, seq.k_start + k0, kTile, seq.k_end, D, threadIdx.x, blockDim.x);
    __syncthreads();

    // Lines 10-11: S_ij, P_ij for this warp's query i and key j = k0 + lane.
    const int64_t j = k0 + lane;
    const float s = score(q_row, tile + lane * pitch, D, visible(i, j, seq, p), p);
    const float prob = prob_from_lse(s, lse);

    __syncthreads();  // done with K_j
    load_tile<T>(tile, pitch, a.v, a.v_st, b, hk, seq.k_start + k0, kTile, seq.k_end, D, threadIdx.x, blockDim.x);
    __syncthreads();

    // Lines 13-14: dP_ij = dO_i . V_j, dS_ij = P_ij (dP_ij - D_i) (softcap: times dS/dX).
    const float ds = dscore(prob, dot(do_row, tile + lane * pitch, D), delta, s, p);

    __syncthreads();  // done with V_j
    load_tile<T>(tile, pitch, a.k, a.k_st, b, hk, seq.k_start + k0, kTile, seq.k_end, D, threadIdx.x, blockDim.x);
    __syncthreads();

    // Line 15: dQ_i += sum_j dS_ij K_j (times the scale, applied once at the end).
    add_weighted_rows(dq, ds, tile, pitch, D, lane);
  }
  if (!row_in_range) return;

  // Line 21: write dQ_i = scale * sum_j dS_ij K_j (float32).
  store_row(a.dq + q_output_offset(p, b, h, seq.q_start + i), dq, p.scale, D, lane);
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
  const int64_t bh_q = p.batch * p.heads_q, bh_kv = p.batch * p.heads_kv;
  const size_t D = size_t(p.head_dim), tile = size_t(kTile) * tile_pitch(p.head_dim);
  cudaError_t err = launch(delta_kernel<T>, ceil_div(bh_q * p.n_q, kThreads), 0, stream, a);
  if (err != cudaSuccess) return err;
  err = launch(dkdv_kernel<T>, bh_kv * ceil_div(p.n_k, kRows), sizeof(float) * (2 * kRows * D + tile + 2 * kTile),
               stream, a);
  if (err != cudaSuccess) return err;
  return launch(dq_kernel<T>, bh_q * ceil_div(p.n_q, kRows), sizeof(float) * (2 * kRows * D + tile), stream, a);
}

}  // namespace

cudaError_t backward_cuda(const BackwardArgs& args, cudaStream_t stream) {
  if (check_problem(args.p) != nullptr) return cudaErrorInvalidValue;
  return dispatch_dtype(args.dtype, cudaErrorInvalidValue, [&](auto type) {
    return launch_backward<typename decltype(type)::type>(args, stream);
  });
}

}  // namespace flashtile_ref
