// The host (CPU) build of the CUDA reference: the same algorithm as attention_forward.cu
// and attention_backward.cu, with the same tiles, loop bounds and per-row functions from
// attention_reference.cuh, run by plain loops. What a block's warps do in parallel is a
// loop over r (the block's rows) here, and what the 32 lanes of a warp do is a loop over
// the tile's rows. Reductions over a tile are sequential sums here and butterfly sums on
// the GPU, so the two builds agree to float32 rounding, not bit for bit.
//
// Each function below does the work of one kernel for one (batch, head): the blocks of
// that (batch, head) one after the other (one thread: the host build serves small test
// shapes). Rows are absolute (the sequence's start included, see Sequence), so the dense
// and the varlen layouts share every line.
#include <vector>

#include "attention_reference.cuh"

namespace flashtile_ref {
namespace {

// forward_kernel for query head h of batch b: O and L of every query (Alg. 1).
template <typename T>
void forward_head(const ForwardArgs& a, int64_t b, int64_t h) {
  const Problem& p = a.p;
  const int D = p.head_dim, pitch = tile_pitch(D);
  const Sequence seq = sequence_of(b, p);
  const int64_t hk = kv_head(h, p);
  std::vector<float> q_rows(kRows * D), kv_tile(kTile * pitch);
  float s[kRows][kTile], weight[kRows][kTile];
  float m[kRows], l[kRows];
  std::vector<float> acc(kRows * D);

  for (int64_t q0 = 0; q0 < seq.n_q; q0 += kRows) {  // the CUDA kernel's blocks
    load_tile<T>(q_rows.data(), D, a.q, a.q_st, b, h, seq.q_start + q0, kRows, seq.q_end, D, 0, 1);
    for (int r = 0; r < kRows; ++r) { m[r] = -INFINITY; l[r] = 0.0f; }  // Alg. 1 line 5
    for (float& x : acc) x = 0.0f;
    const Range keys = key_range(q0, q0 + kRows - 1, seq, p);
    for (int64_t k0 = keys.begin; k0 < keys.end; k0 += kTile) {  // line 6, visible tiles only
      load_tile<T>(kv_tile.data(), pitch, a.k, a.k_st, b, hk, seq.k_start + k0, kTile, seq.k_end, D, 0, 1);
      float rescale[kRows];
      for (int r = 0; r < kRows; ++r) {
        const int64_t i = q0 + r;
        float tile_max = -INFINITY, tile_sum = 0.0f;
        for (int j = 0; j < kTile; ++j) {  // line 8: S_ij
          s[r][j] = score(&q_rows[r * D], &kv_tile[j * pitch], D, visible(i, k0 + j, seq, p), p);
          tile_max = fmaxf(tile_max, s[r][j]);
        }
        const float m_new = softmax_new_max(m[r], tile_max);  // lines 9-10
        for (int j = 0; j < kTile; ++j) {
          weight[r][j] = softmax_weight(s[r][j], m_new);
          tile_sum += weight[r][j];
        }
        rescale[r] = softmax_rescale(m[r], m_new);
        l[r] = softmax_sum(l[r], rescale[r], tile_sum);
        m[r] = m_new;
      }
      load_tile<T>(kv_tile.data(), pitch, a.v, a.v_st, b, hk, seq.k_start + k0, kTile, seq.k_end, D, 0, 1);
      for (int r = 0; r < kRows; ++r) {  // line 10: O~_i = diag(rescale) O~_i + P~_i V_j
        float* o = &acc[r * D];
        for (int d = 0; d < D; ++d) o[d] *= rescale[r];
        for (int j = 0; j < kTile; ++j)
          for (int d = 0; d < D; ++d) o[d] += weight[r][j] * kv_tile[j * pitch + d];
      }
    }
    for (int r = 0; r < kRows && q0 + r < seq.n_q; ++r) {  // lines 12-13
      const int64_t row = seq.q_start + q0 + r;
      const float factor = output_factor(l[r]);
      float* out_row = a.out + q_output_offset(p, b, h, row);
      for (int d = 0; d < D; ++d) out_row[d] = acc[r * D + d] * factor;
      a.lse[lse_index(p, b, h, row)] = log_sum_exp(m[r], l[r]);
    }
  }
}

// delta_kernel for query head h of batch b: D_i = rowsum(dO_i * O_i) (Alg. 2 line 4).
template <typename T>
void delta_head(const BackwardArgs& a, int64_t b, int64_t h) {
  const Problem& p = a.p;
  const Sequence seq = sequence_of(b, p);
  for (int64_t row = seq.q_start; row < seq.q_end; ++row)
    a.delta[lse_index(p, b, h, row)] = delta_row<T>(a.d_out, offset(a.do_st, b, h, row, 0), a.do_st.d,
                                                    a.out + q_output_offset(p, b, h, row), p.head_dim);
}

// dkdv_kernel for K/V head hk of batch b: kRows keys at a time (k_rows, v_rows), summing
// over the group's query heads in order, and over each one's query tiles.
template <typename T>
void dkdv_head(const BackwardArgs& a, int64_t b, int64_t hk) {
  const Problem& p = a.p;
  const int D = p.head_dim, pitch = tile_pitch(D);
  const Sequence seq = sequence_of(b, p);
  std::vector<float> k_rows(kRows * D), v_rows(kRows * D), tile(kTile * pitch);
  std::vector<float> dk(kRows * D), dv(kRows * D);
  float s[kRows][kTile], prob[kRows][kTile], ds[kRows][kTile];

  for (int64_t k0 = 0; k0 < seq.n_k; k0 += kRows) {  // the CUDA kernel's blocks
    load_tile<T>(k_rows.data(), D, a.k, a.k_st, b, hk, seq.k_start + k0, kRows, seq.k_end, D, 0, 1);
    load_tile<T>(v_rows.data(), D, a.v, a.v_st, b, hk, seq.k_start + k0, kRows, seq.k_end, D, 0, 1);
    for (float& x : dk) x = 0.0f;  // line 7
    for (float& x : dv) x = 0.0f;
    const Range queries = query_range(k0, k0 + kRows - 1, seq, p);
    for (int64_t h = hk * group_size(p); h < (hk + 1) * group_size(p); ++h) {  // the group's query heads
      for (int64_t q0 = queries.begin; q0 < queries.end; q0 += kTile) {  // line 8, visible tiles only
        load_tile<T>(tile.data(), pitch, a.q, a.q_st, b, h, seq.q_start + q0, kTile, seq.q_end, D, 0, 1);
        for (int r = 0; r < kRows; ++r)
          for (int t = 0; t < kTile; ++t) {  // lines 10-11: S_ij, P_ij
            const int64_t i = q0 + t;
            const float lse = i < seq.n_q ? a.lse[lse_index(p, b, h, seq.q_start + i)] : -INFINITY;
            s[r][t] = score(&tile[t * pitch], &k_rows[r * D], D, visible(i, k0 + r, seq, p), p);
            prob[r][t] = prob_from_lse(s[r][t], lse);
          }
        load_tile<T>(tile.data(), pitch, a.d_out, a.do_st, b, h, seq.q_start + q0, kTile, seq.q_end, D, 0, 1);
        for (int r = 0; r < kRows; ++r)
          for (int t = 0; t < kTile; ++t) {  // lines 13-14: dP_ij, dS_ij
            const int64_t i = q0 + t;
            const float delta = i < seq.n_q ? a.delta[lse_index(p, b, h, seq.q_start + i)] : 0.0f;
            ds[r][t] = dscore(prob[r][t], dot(&tile[t * pitch], &v_rows[r * D], D), delta, s[r][t], p);
          }
        for (int r = 0; r < kRows; ++r)  // line 12: dV_j += sum_i P_ij dO_i
          for (int t = 0; t < kTile; ++t)
            for (int d = 0; d < D; ++d) dv[r * D + d] += prob[r][t] * tile[t * pitch + d];
        load_tile<T>(tile.data(), pitch, a.q, a.q_st, b, h, seq.q_start + q0, kTile, seq.q_end, D, 0, 1);
        for (int r = 0; r < kRows; ++r)  // line 17: dK_j += sum_i dS_ij Q_i
          for (int t = 0; t < kTile; ++t)
            for (int d = 0; d < D; ++d) dk[r * D + d] += ds[r][t] * tile[t * pitch + d];
      }
    }
    for (int r = 0; r < kRows && k0 + r < seq.n_k; ++r) {  // line 19
      const int64_t row = seq.k_start + k0 + r;
      float* dk_row = a.dk + kv_output_offset(p, b, hk, row);
      float* dv_row = a.dv + kv_output_offset(p, b, hk, row);
      for (int d = 0; d < D; ++d) {
        dk_row[d] = p.scale * dk[r * D + d];
        dv_row[d] = dv[r * D + d];
      }
    }
  }
}

// dq_kernel for query head h of batch b: kRows queries at a time (q_rows, do_rows), over
// the key tiles they see.
template <typename T>
void dq_head(const BackwardArgs& a, int64_t b, int64_t h) {
  const Problem& p = a.p;
  const int D = p.head_dim, pitch = tile_pitch(D);
  const Sequence seq = sequence_of(b, p);
  const int64_t hk = kv_head(h, p);
  std::vector<float> q_rows(kRows * D), do_rows(kRows * D), tile(kTile * pitch), dq(kRows * D);
  float s[kRows][kTile], prob[kRows][kTile], ds[kRows][kTile];

  for (int64_t q0 = 0; q0 < seq.n_q; q0 += kRows) {  // the CUDA kernel's blocks
    load_tile<T>(q_rows.data(), D, a.q, a.q_st, b, h, seq.q_start + q0, kRows, seq.q_end, D, 0, 1);
    load_tile<T>(do_rows.data(), D, a.d_out, a.do_st, b, h, seq.q_start + q0, kRows, seq.q_end, D, 0, 1);
    for (float& x : dq) x = 0.0f;
    const Range keys = key_range(q0, q0 + kRows - 1, seq, p);
    for (int64_t k0 = keys.begin; k0 < keys.end; k0 += kTile) {
      load_tile<T>(tile.data(), pitch, a.k, a.k_st, b, hk, seq.k_start + k0, kTile, seq.k_end, D, 0, 1);
      for (int r = 0; r < kRows; ++r) {
        const int64_t i = q0 + r;
        const float lse = i < seq.n_q ? a.lse[lse_index(p, b, h, seq.q_start + i)] : -INFINITY;
        for (int t = 0; t < kTile; ++t) {  // lines 10-11
          s[r][t] = score(&q_rows[r * D], &tile[t * pitch], D, visible(i, k0 + t, seq, p), p);
          prob[r][t] = prob_from_lse(s[r][t], lse);
        }
      }
      load_tile<T>(tile.data(), pitch, a.v, a.v_st, b, hk, seq.k_start + k0, kTile, seq.k_end, D, 0, 1);
      for (int r = 0; r < kRows; ++r) {
        const int64_t i = q0 + r;
        const float delta = i < seq.n_q ? a.delta[lse_index(p, b, h, seq.q_start + i)] : 0.0f;
        for (int t = 0; t < kTile; ++t)  // lines 13-14
          ds[r][t] = dscore(prob[r][t], dot(&do_rows[r * D], &tile[t * pitch], D), delta, s[r][t], p);
      }
      load_tile<T>(tile.data(), pitch, a.k, a.k_st, b, hk, seq.k_start + k0, kTile, seq.k_end, D, 0, 1);
      for (int r = 0; r < kRows; ++r)  // line 15: dQ_i += sum_j dS_ij K_j
        for (int t = 0; t < kTile; ++t)
          for (int d = 0; d < D; ++d) dq[r * D + d] += ds[r][t] * tile[t * pitch + d];
    }
    for (int r = 0; r < kRows && q0 + r < seq.n_q; ++r) {  // line 21
      float* dq_row = a.dq + q_output_offset(p, b, h, seq.q_start + q0 + r);
      for (int d = 0; d < D; ++d) dq_row[d] = p.scale * dq[r * D + d];
    }
  }
}

// fn(b, h) for every batch b and head h < heads, in order.
template <typename Fn>
void for_each_head(const Problem& p, int64_t heads, Fn fn) {
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t h = 0; h < heads; ++h) fn(b, h);
}

}  // namespace

const char* forward_host(const ForwardArgs& args) {
  if (const char* problem = check_problem(args.p)) return problem;
  return dispatch_dtype(args.dtype, "unsupported dtype", [&](auto type) -> const char* {
    using T = typename decltype(type)::type;
    for_each_head(args.p, args.p.heads_q, [&](int64_t b, int64_t h) { forward_head<T>(args, b, h); });
    return nullptr;
  });
}

// The three kernels of the backward, one after the other, as the CUDA launcher runs them.
const char* backward_host(const BackwardArgs& args) {
  if (const char* problem = check_problem(args.p)) return problem;
  return dispatch_dtype(args.dtype, "unsupported dtype", [&](auto type) -> const char* {
    using T = typename decltype(type)::type;
    for_each_head(args.p, args.p.heads_q, [&](int64_t b, int64_t h) { delta_head<T>(args, b, h); });
    for_each_head(args.p, args.p.heads_kv, [&](int64_t b, int64_t hk) { dkdv_head<T>(args, b, hk); });
    for_each_head(args.p, args.p.heads_q, [&](int64_t b, int64_t h) { dq_head<T>(args, b, h); });
    return nullptr;
  });
}

}  // namespace flashtile_ref
