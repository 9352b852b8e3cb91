// The host (CPU) build of the CUDA reference: the same algorithm as attention_forward.cu
// and attention_backward.cu, with the same tiles, loop bounds and per-row functions from
// attention_reference.cuh, run by plain loops. What a block's warps do in parallel is a
// loop over r (the block's rows) here, and what the 32 lanes of a warp do is a loop over
// the tile's rows. Reductions over a tile are sequential sums here and butterfly sums on
// the GPU, so the two builds agree to float32 rounding, not bit for bit.
//
// (batch, head) pairs are independent and run one after the other (one thread: the host
// build serves small test shapes).
#include <vector>

#include "attention_reference.cuh"

namespace flashtile_ref {
namespace {

template <typename T>
void forward_head(const ForwardArgs& a, int64_t b, int64_t h) {
  const Problem& p = a.p;
  const int D = p.head_dim, pitch = tile_pitch(D);
  const int64_t bh = b * p.heads + h;
  std::vector<float> q_rows(kRows * D), kv_tile(kTile * pitch);
  float s[kRows][kTile], weight[kRows][kTile];
  float m[kRows], l[kRows];
  std::vector<float> acc(kRows * D);

  for (int64_t q0 = 0; q0 < p.n_q; q0 += kRows) {  // the CUDA kernel's blocks
    load_tile<T>(q_rows.data(), D, a.q, a.q_st, b, h, q0, kRows, p.n_q, D, 0, 1);
    for (int r = 0; r < kRows; ++r) { m[r] = -INFINITY; l[r] = 0.0f; }  // Alg. 1 line 5
    for (float& x : acc) x = 0.0f;
    const int64_t end = block_key_end(q0, p);
    for (int64_t k0 = 0; k0 < end; k0 += kTile) {  // line 6
      load_tile<T>(kv_tile.data(), pitch, a.k, a.k_st, b, h, k0, kTile, p.n_k, D, 0, 1);
      float rescale[kRows];
      for (int r = 0; r < kRows; ++r) {
        const int64_t i = q0 + r;
        float tile_max = -INFINITY, tile_sum = 0.0f;
        for (int j = 0; j < kTile; ++j) {  // line 8: S_ij
          s[r][j] = score(&q_rows[r * D], &kv_tile[j * pitch], D, visible(i, k0 + j, p), p.scale);
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
      load_tile<T>(kv_tile.data(), pitch, a.v, a.v_st, b, h, k0, kTile, p.n_k, D, 0, 1);
      for (int r = 0; r < kRows; ++r) {  // line 10: O~_i = diag(rescale) O~_i + P~_i V_j
        float* o = &acc[r * D];
        for (int d = 0; d < D; ++d) o[d] *= rescale[r];
        for (int j = 0; j < kTile; ++j)
          for (int d = 0; d < D; ++d) o[d] += weight[r][j] * kv_tile[j * pitch + d];
      }
    }
    for (int r = 0; r < kRows && q0 + r < p.n_q; ++r) {  // lines 12-13
      const int64_t i = q0 + r;
      const float factor = output_factor(l[r]);
      float* out_row = a.out + offset(contiguous_strides(p, p.n_q), b, h, i, 0);
      for (int d = 0; d < D; ++d) out_row[d] = acc[r * D + d] * factor;
      a.lse[bh * p.n_q + i] = log_sum_exp(m[r], l[r]);
    }
  }
}

template <typename T>
void backward_head(const BackwardArgs& a, int64_t b, int64_t h) {
  const Problem& p = a.p;
  const int D = p.head_dim, pitch = tile_pitch(D);
  const int64_t bh = b * p.heads + h;
  const Strides q_out = contiguous_strides(p, p.n_q), k_out = contiguous_strides(p, p.n_k);

  // delta_kernel: D_i = rowsum(dO_i * O_i) (Alg. 2 line 4)
  for (int64_t i = 0; i < p.n_q; ++i)
    a.delta[bh * p.n_q + i] = delta_row<T>(a.d_out, offset(a.do_st, b, h, i, 0), a.do_st.d,
                                           a.out + offset(q_out, b, h, i, 0), D);

  std::vector<float> rows_a(kRows * D), rows_b(kRows * D), tile(kTile * pitch);
  std::vector<float> grad_a(kRows * D), grad_b(kRows * D);
  float prob[kRows][kTile], ds[kRows][kTile];

  // dkdv_kernel: kRows keys at a time (rows_a = K_j, rows_b = V_j), over query tiles.
  for (int64_t k0 = 0; k0 < p.n_k; k0 += kRows) {
    load_tile<T>(rows_a.data(), D, a.k, a.k_st, b, h, k0, kRows, p.n_k, D, 0, 1);
    load_tile<T>(rows_b.data(), D, a.v, a.v_st, b, h, k0, kRows, p.n_k, D, 0, 1);
    for (float& x : grad_a) x = 0.0f;  // dK_j (line 7)
    for (float& x : grad_b) x = 0.0f;  // dV_j
    for (int64_t q0 = query_begin(k0, p); q0 < p.n_q; q0 += kTile) {  // line 8
      load_tile<T>(tile.data(), pitch, a.q, a.q_st, b, h, q0, kTile, p.n_q, D, 0, 1);
      for (int r = 0; r < kRows; ++r)
        for (int t = 0; t < kTile; ++t) {  // lines 10-11: S_ij, P_ij
          const int64_t i = q0 + t;
          const float lse = i < p.n_q ? a.lse[bh * p.n_q + i] : -INFINITY;
          const float s = score(&tile[t * pitch], &rows_a[r * D], D, visible(i, k0 + r, p), p.scale);
          prob[r][t] = prob_from_lse(s, lse);
        }
      load_tile<T>(tile.data(), pitch, a.d_out, a.do_st, b, h, q0, kTile, p.n_q, D, 0, 1);
      for (int r = 0; r < kRows; ++r)
        for (int t = 0; t < kTile; ++t) {  // lines 13-14: dP_ij, dS_ij
          const int64_t i = q0 + t;
          const float delta = i < p.n_q ? a.delta[bh * p.n_q + i] : 0.0f;
          ds[r][t] = dscore(prob[r][t], dot(&tile[t * pitch], &rows_b[r * D], D), delta);
        }
      for (int r = 0; r < kRows; ++r)  // line 12: dV_j += sum_i P_ij dO_i
        for (int t = 0; t < kTile; ++t)
          for (int d = 0; d < D; ++d) grad_b[r * D + d] += prob[r][t] * tile[t * pitch + d];
      load_tile<T>(tile.data(), pitch, a.q, a.q_st, b, h, q0, kTile, p.n_q, D, 0, 1);
      for (int r = 0; r < kRows; ++r)  // line 17: dK_j += sum_i dS_ij Q_i
        for (int t = 0; t < kTile; ++t)
          for (int d = 0; d < D; ++d) grad_a[r * D + d] += ds[r][t] * tile[t * pitch + d];
    }
    for (int r = 0; r < kRows && k0 + r < p.n_k; ++r) {  // line 19
      float* dk_row = a.dk + offset(k_out, b, h, k0 + r, 0);
      float* dv_row = a.dv + offset(k_out, b, h, k0 + r, 0);
      for (int d = 0; d < D; ++d) {
        dk_row[d] = p.scale * grad_a[r * D + d];
        dv_row[d] = grad_b[r * D + d];
      }
    }
  }

  // dq_kernel: kRows queries at a time (rows_a = Q_i, rows_b = dO_i), over key tiles.
  for (int64_t q0 = 0; q0 < p.n_q; q0 += kRows) {
    load_tile<T>(rows_a.data(), D, a.q, a.q_st, b, h, q0, kRows, p.n_q, D, 0, 1);
    load_tile<T>(rows_b.data(), D, a.d_out, a.do_st, b, h, q0, kRows, p.n_q, D, 0, 1);
    for (float& x : grad_a) x = 0.0f;  // dQ_i
    const int64_t end = block_key_end(q0, p);
    for (int64_t k0 = 0; k0 < end; k0 += kTile) {
      load_tile<T>(tile.data(), pitch, a.k, a.k_st, b, h, k0, kTile, p.n_k, D, 0, 1);
      for (int r = 0; r < kRows; ++r) {
        const int64_t i = q0 + r;
        const float lse = i < p.n_q ? a.lse[bh * p.n_q + i] : -INFINITY;
        for (int t = 0; t < kTile; ++t) {  // lines 10-11
          const float s = score(&rows_a[r * D], &tile[t * pitch], D, visible(i, k0 + t, p), p.scale);
          prob[r][t] = prob_from_lse(s, lse);
        }
      }
      load_tile<T>(tile.data(), pitch, a.v, a.v_st, b, h, k0, kTile, p.n_k, D, 0, 1);
      for (int r = 0; r < kRows; ++r) {
        const int64_t i = q0 + r;
        const float delta = i < p.n_q ? a.delta[bh * p.n_q + i] : 0.0f;
        for (int t = 0; t < kTile; ++t)  // lines 13-14
          ds[r][t] = dscore(prob[r][t], dot(&rows_b[r * D], &tile[t * pitch], D), delta);
      }
      load_tile<T>(tile.data(), pitch, a.k, a.k_st, b, h, k0, kTile, p.n_k, D, 0, 1);
      for (int r = 0; r < kRows; ++r)  // line 15: dQ_i += sum_j dS_ij K_j
        for (int t = 0; t < kTile; ++t)
          for (int d = 0; d < D; ++d) grad_a[r * D + d] += ds[r][t] * tile[t * pitch + d];
    }
    for (int r = 0; r < kRows && q0 + r < p.n_q; ++r) {
      float* dq_row = a.dq + offset(q_out, b, h, q0 + r, 0);
      for (int d = 0; d < D; ++d) dq_row[d] = p.scale * grad_a[r * D + d];
    }
  }
}

template <typename Args, typename Fn>
void for_each_head(const Args& a, Fn fn) {
  const int64_t heads = a.p.batch * a.p.heads;
  for (int64_t bh = 0; bh < heads; ++bh) fn(bh / a.p.heads, bh % a.p.heads);
}

}  // namespace

const char* forward_host(const ForwardArgs& args) {
  if (const char* problem = check_problem(args.p)) return problem;
  return dispatch_dtype(args.dtype, "unsupported dtype", [&](auto type) -> const char* {
    using T = typename decltype(type)::type;
    for_each_head(args, [&](int64_t b, int64_t h) { forward_head<T>(args, b, h); });
    return nullptr;
  });
}

const char* backward_host(const BackwardArgs& args) {
  if (const char* problem = check_problem(args.p)) return problem;
  return dispatch_dtype(args.dtype, "unsupported dtype", [&](auto type) -> const char* {
    using T = typename decltype(type)::type;
    for_each_head(args, [&](int64_t b, int64_t h) { backward_head<T>(args, b, h); });
    return nullptr;
  });
}

}  // namespace flashtile_ref
