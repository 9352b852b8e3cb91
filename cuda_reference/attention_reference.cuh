// flashtile's CUDA reference: what the CUDA kernels (attention_forward.cu,
// attention_backward.cu) and the host build (attention_host.cpp) share.
//
// Torch-free and CUDA-header-free: this header compiles with nvcc and with a plain C++
// compiler. Everything the two builds must agree on lives here, as __host__ __device__
// functions: the storage types and their conversion to float, tensor addressing (dense
// and varlen layouts, the K/V head of a query head), the mask (a sliding window, causal
// being one) and the loop bounds it allows, the tile loads, and the per-row arithmetic of
// the FlashAttention-2 paper (Dao 2023, "FlashAttention-2: Faster Attention with Better
// Parallelism and Work Partitioning", Algorithm 1 (forward) and Algorithm 2 (backward)).
//
// Notation (the paper's, with the softmax scale made explicit; the paper folds it in):
//   X = scale * Q K^T,  S = X (or softcap * tanh(X / softcap)),  P = softmax(S) row-wise,
//   O = P V,  L_i = log sum_j exp(S_ij)   (natural log; -inf for a row that sees no key)
//   D_i = rowsum(dO_i * O_i),  dP = dO V^T,  dS = P * (dP - D)   (elementwise),
//   dX = dS * dS/dX  (dS/dX = 1, or 1 - tanh^2(X / softcap) with a softcap),
//   dV = P^T dO,  dQ = scale * dX K,  dK = scale * dX^T Q.
// The paper writes the backward's dS without the scale because it takes S = Q K^T; with
// S = scale * Q K^T the chain rule puts the scale on dQ and dK, as written above.
// Masked entries (keys outside the window) have S_ij = -inf, P_ij = 0 and no gradient.
// With grouped-query attention every query head reads the K/V head of its group, and the
// dK, dV of a K/V head sum the contributions of the group's query heads.
//
// All arithmetic is float32: inputs (fp16, bf16 or fp32) are converted exactly to float
// when loaded, and every output (O, L, dQ, dK, dV) is written as float32. The caller
// rounds O and the gradients to the input dtype if it wants to (the bindings do).
#pragma once

#include <stdint.h>
#include <string.h>
#include <math.h>

#if defined(__CUDACC__)
#define FT_HD __host__ __device__ __forceinline__
#else
#define FT_HD inline
#endif

namespace flashtile_ref {

// ---------------------------------------------------------------------------------------
// Sizes
// ---------------------------------------------------------------------------------------

// Rows of a shared-memory tile: the keys (forward, dQ) or the queries (dK/dV) that one
// block stages at a time, one per lane of a warp, so it is the warp size.
constexpr int kTile = 32;
// Rows a block owns, one per warp: queries (forward, dQ) or keys (dK/dV).
constexpr int kRows = 8;
constexpr int kThreads = kRows * kTile;  // 256 threads per block
constexpr int kMaxHeadDim = 256;
// Each lane of a row's warp accumulates the columns d = lane + 32 c, c < kColsPerLane.
constexpr int kColsPerLane = kMaxHeadDim / kTile;

// Row pitch (in floats) of a kTile x D tile in shared memory. Lane r reads row r while
// the 32 lanes step through d together, so the 32 addresses r * pitch + d must fall in
// 32 different banks: an odd pitch does that (D or D + 1).
FT_HD int tile_pitch(int head_dim) { return head_dim | 1; }

// ---------------------------------------------------------------------------------------
// Storage types and their exact conversion to float
// ---------------------------------------------------------------------------------------

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// The bits of an IEEE binary16 / bfloat16 value. Own types rather than cuda_fp16.h's, so
// the host build needs no CUDA header and both builds convert with the same code.
struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

// Calls fn(TypeTag<T>{}) with T the storage type that `dtype` names, and returns what fn
// returns; `unknown` for a dtype outside the enum. One switch for the four entry points
// (forward / backward, CUDA / host), each instantiating its template for T.
template <typename T> struct TypeTag { using type = T; };
template <typename Result, typename Fn>
Result dispatch_dtype(DType dtype, Result unknown, Fn fn) {
  switch (dtype) {
    case DType::kFloat32: return fn(TypeTag<float>{});
    case DType::kFloat16: return fn(TypeTag<Half>{});
    case DType::kBFloat16: return fn(TypeTag<BFloat16>{});
  }
  return unknown;
}

FT_HD float bits_to_float(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

FT_HD float to_float(float x) { return x; }

// bfloat16 is the top half of a float32: shifting the bits back is exact.
FT_HD float to_float(BFloat16 x) { return bits_to_float(uint32_t(x.bits) << 16); }

// binary16: 1 sign, 5 exponent (bias 15), 10 mantissa bits. Every value is a float32
// value; this builds it field by field (tests/test_cuda_reference.py checks all 65536).
FT_HD float to_float(Half x) {
  const uint32_t sign = uint32_t(x.bits >> 15) << 31;
  const uint32_t exponent = (x.bits >> 10) & 0x1f;
  const uint32_t mantissa = x.bits & 0x3ff;
  if (exponent == 0) {
    // zero or subnormal: mantissa * 2^-24, exact in float32 (mantissa < 2^10)
    const float magnitude = float(mantissa) * 5.9604644775390625e-8f;  // 2^-24
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 0x1f) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));  // inf, NaN
  // normal: rebias the exponent from 15 to 127, widen the mantissa from 10 to 23 bits
  return bits_to_float(sign | ((exponent - 15 + 127) << 23) | (mantissa << 13));
}

// ---------------------------------------------------------------------------------------
// Addressing: (b, h, row, d) with arbitrary element strides, 64-bit offsets
// ---------------------------------------------------------------------------------------

struct Strides { int64_t b, h, n, d; };

FT_HD int64_t offset(const Strides& s, int64_t b, int64_t h, int64_t n, int64_t d) {
  return b * s.b + h * s.h + n * s.n + d * s.d;
}

template <typename T>
FT_HD float load(const void* base, int64_t element) {
  return to_float(static_cast<const T*>(base)[element]);
}

// Copies rows [row0, row0 + rows) of head (b, h) into a rows x D float tile of row pitch
// `pitch`, zero-filling rows at or past `end` (the end of the sequence: rows are absolute,
// see Sequence). The elements are split among `n_workers` workers, worker `worker` taking
// every n_workers-th one: the threads of a CUDA block (threadIdx.x, blockDim.x) or the one
// host thread (0, 1).
template <typename T>
FT_HD void load_tile(float* tile, int pitch, const void* src, const Strides& st, int64_t b, int64_t h,
                     int64_t row0, int rows, int64_t end, int head_dim, int worker, int n_workers) {
  for (int e = worker; e < rows * head_dim; e += n_workers) {
    const int r = e / head_dim, d = e % head_dim;
    const int64_t row = row0 + r;
    tile[r * pitch + d] = row < end ? load<T>(src, offset(st, b, h, row, d)) : 0.0f;
  }
}

// ---------------------------------------------------------------------------------------
// The problem and the arguments of the launchers
// ---------------------------------------------------------------------------------------

// Two layouts share one code path. Dense: q (B, Hq, Nq, D), k and v (B, Hkv, Nk, D), every
// sequence of the batch n_q queries and n_k keys long. Varlen: q (total_q, Hq, D), k and v
// (total_k, Hkv, D), sequence b being rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1 of q
// (and likewise of k, v). Both are addressed as (b, h, row, d) through Strides: a varlen
// tensor has batch stride 0 and its rows are absolute (the sequence's start added), a dense
// one has its batch stride and every sequence starts at row 0 (see Sequence below).
struct Problem {
  int64_t batch;
  int64_t heads_q, heads_kv;  // heads_q a multiple of heads_kv (GQA; MQA is heads_kv = 1)
  int64_t n_q, n_k;           // dense: the sequence lengths; varlen: the longest (max_seqlen), the grid's size
  int64_t total_q;            // varlen: rows of q (the row count of lse (Hq, total_q)); dense: unused
  int head_dim;               // 1..kMaxHeadDim
  float scale;                // softmax scale, > 0
  // Query i of a sequence sits at position i + n_k - n_q (bottom-right aligned) and sees
  // key j iff position - window_left <= j <= position + window_right; a side of -1 is
  // unbounded, and causal attention is window_right = 0.
  int64_t window_left, window_right;
  float softcap;  // > 0: scores are softcap * tanh(scale q.k / softcap); 0: plain scale q.k
  // varlen: (batch + 1) int32 prefix sums starting at 0, where the kernels run (device
  // memory for the CUDA launchers, host memory for the host build); dense: nullptr.
  const int32_t* cu_seqlens_q;
  const int32_t* cu_seqlens_k;
};

FT_HD bool is_varlen(const Problem& p) { return p.cu_seqlens_q != nullptr; }

// K/V head of query head h: the heads_q / heads_kv consecutive query heads of a group
// share one K/V head (FlashAttention-2's and SDPA enable_gqa's grouping).
FT_HD int64_t group_size(const Problem& p) { return p.heads_q / p.heads_kv; }
FT_HD int64_t kv_head(int64_t h, const Problem& p) { return h / group_size(p); }

// One sequence of the batch: its rows [q_start, q_end) of q and [k_start, k_end) of k, v,
// as absolute rows (dense: q_start = k_start = 0, the batch stride does the rest).
struct Sequence {
  int64_t q_start, q_end, n_q;
  int64_t k_start, k_end, n_k;
};

FT_HD Sequence sequence_of(int64_t b, const Problem& p) {
  Sequence s;
  s.q_start = is_varlen(p) ? p.cu_seqlens_q[b] : 0;
  s.q_end = is_varlen(p) ? p.cu_seqlens_q[b + 1] : p.n_q;
  s.k_start = is_varlen(p) ? p.cu_seqlens_k[b] : 0;
  s.k_end = is_varlen(p) ? p.cu_seqlens_k[b + 1] : p.n_k;
  s.n_q = s.q_end - s.q_start;
  s.n_k = s.k_end - s.k_start;
  return s;
}

// The float32 outputs, contiguous, in the inputs' layout: out and dq shaped like q, dk and
// dv like k (dense (B, H, N, D), varlen (total, H, D)); lse and delta dense (B, Hq, Nq),
// varlen (Hq, total_q). `row` is absolute (Sequence's q_start / k_start included).
FT_HD int64_t output_offset(const Problem& p, int64_t heads, int64_t n, int64_t b, int64_t h, int64_t row) {
  return (is_varlen(p) ? row * heads + h : (b * heads + h) * n + row) * p.head_dim;
}
FT_HD int64_t q_output_offset(const Problem& p, int64_t b, int64_t h, int64_t row) {
  return output_offset(p, p.heads_q, p.n_q, b, h, row);
}
FT_HD int64_t kv_output_offset(const Problem& p, int64_t b, int64_t h, int64_t row) {
  return output_offset(p, p.heads_kv, p.n_k, b, h, row);
}
FT_HD int64_t lse_index(const Problem& p, int64_t b, int64_t h, int64_t row) {
  return is_varlen(p) ? h * p.total_q + row : (b * p.heads_q + h) * p.n_q + row;
}

// q, k, v in `dtype` with any strides; out, lse float32 (layouts above).
struct ForwardArgs {
  Problem p;
  DType dtype;
  const void* q; Strides q_st;
  const void* k; Strides k_st;
  const void* v; Strides v_st;
  float* out;
  float* lse;
};

// q, k, v, d_out in `dtype` with any strides; out (the forward's float32 O, not rounded
// to the input dtype), lse, and the outputs delta (lse's layout) and dq, dk, dv, float32
// (layouts above).
struct BackwardArgs {
  Problem p;
  DType dtype;
  const void* q; Strides q_st;
  const void* k; Strides k_st;
  const void* v; Strides v_st;
  const void* d_out; Strides do_st;
  const float* out;
  const float* lse;
  float* delta;
  float* dq;
  float* dk;
  float* dv;
};

// ---------------------------------------------------------------------------------------
// The mask (window, causal) and the loop bounds it allows
// ---------------------------------------------------------------------------------------

FT_HD int64_t clamp(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : (x > hi ? hi : x); }

// Whether query i sees key j, both counted from their sequence's start: both in range and
// j within the window around i's position i + n_k - n_q (bottom-right alignment).
FT_HD bool visible(int64_t i, int64_t j, const Sequence& s, const Problem& p) {
  if (i < 0 || i >= s.n_q || j < 0 || j >= s.n_k) return false;
  const int64_t position = i + s.n_k - s.n_q;
  return (p.window_left < 0 || j >= position - p.window_left) &&
         (p.window_right < 0 || j <= position + p.window_right);
}

struct Range { int64_t begin, end; };  // [begin, end), empty when begin == end

// Keys [begin, end) of the sequence include every key that one of the queries
// [first, last] sees, and the loops over key tiles run over this range only: tiles wholly
// outside the window are skipped, not loaded and masked. Query i sees the keys
// [position - left, position + right]; these intervals move by one key per query and are
// at least one key wide, so for consecutive queries their union is the one interval
// [first's position - left, last's position + right]. Empty when no query is in range or
// none sees a key.
FT_HD Range key_range(int64_t first, int64_t last, const Sequence& s, const Problem& p) {
  last = last < s.n_q - 1 ? last : s.n_q - 1;
  if (first > last) return Range{0, 0};
  const int64_t shift = s.n_k - s.n_q;
  const int64_t begin = p.window_left < 0 ? 0 : clamp(first + shift - p.window_left, 0, s.n_k);
  const int64_t end = p.window_right < 0 ? s.n_k : clamp(last + shift + p.window_right + 1, begin, s.n_k);
  return Range{begin, end};
}

// Queries [begin, end) include every query that sees one of the keys [first, last]: query
// i sees key j iff j - right <= i + n_k - n_q <= j + left, the same intervals turned
// around (the loops over query tiles of the dK/dV pass).
FT_HD Range query_range(int64_t first, int64_t last, const Sequence& s, const Problem& p) {
  last = last < s.n_k - 1 ? last : s.n_k - 1;
  if (first > last) return Range{0, 0};
  const int64_t shift = s.n_k - s.n_q;
  const int64_t begin = p.window_right < 0 ? 0 : clamp(first - p.window_right - shift, 0, s.n_q);
  const int64_t end = p.window_left < 0 ? s.n_q : clamp(last + p.window_left - shift + 1, begin, s.n_q);
  return Range{begin, end};
}

FT_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------
// Per-row arithmetic
// ---------------------------------------------------------------------------------------

// sum_d a[d] * b[d] over float rows, in order d = 0, 1, ...
FT_HD float dot(const float* a, const float* b, int n) {
  float sum = 0.0f;
  for (int d = 0; d < n; ++d) sum += a[d] * b[d];
  return sum;
}

// One entry of the score matrix S (Alg. 1 line 8, Alg. 2 line 10), -inf where masked:
// S_ij = scale q_i.k_j, or with a softcap c > 0, S_ij = c tanh(scale q_i.k_j / c) (the
// scores stay in (-c, c); Gemma 2, Grok).
FT_HD float score(const float* q_row, const float* k_row, int head_dim, bool is_visible, const Problem& p) {
  if (!is_visible) return -INFINITY;
  const float x = p.scale * dot(q_row, k_row, head_dim);
  return p.softcap > 0.0f ? p.softcap * tanhf(x / p.softcap) : x;
}

// The forward's online softmax (Alg. 1 lines 9-10) for one query row i, one key tile
// (j) at a time, keeping m_i (the running row max) and l_i (the running sum of
// exp(S_ij - m_i)):
//   m_i^(j)  = max(m_i^(j-1), rowmax(S_i^(j)))                        softmax_new_max
//   P~_i^(j) = exp(S_i^(j) - m_i^(j))                                  softmax_weight
//   l_i^(j)  = exp(m_i^(j-1) - m_i^(j)) l_i^(j-1) + rowsum(P~_i^(j))   softmax_rescale, softmax_sum
//   O~_i^(j) = diag(exp(m_i^(j-1) - m_i^(j))) O~_i^(j-1) + P~_i^(j) V_j
// Start: m = -inf, l = 0, O~ = 0. Masked scores are -inf, and while a row has seen only
// masked keys m stays -inf; the two guards below keep that from producing
// exp(-inf - (-inf)) = NaN.
FT_HD float softmax_new_max(float m_old, float tile_max) { return fmaxf(m_old, tile_max); }

// P~_ij = exp(S_ij - m_new); 0 for a masked score (also when m_new is still -inf).
FT_HD float softmax_weight(float s, float m_new) { return s == -INFINITY ? 0.0f : expf(s - m_new); }

// exp(m_old - m_new), the factor that moves l and O~ from the old max to the new one.
// m_old = -inf means nothing was accumulated yet (l = 0, O~ = 0): the factor is moot, 0.
FT_HD float softmax_rescale(float m_old, float m_new) {
  return m_old == -INFINITY ? 0.0f : expf(m_old - m_new);
}

FT_HD float softmax_sum(float l_old, float rescale, float tile_sum) { return rescale * l_old + tile_sum; }

// Alg. 1 line 12: O_i = diag(l_i)^-1 O~_i. A row that saw no key has l = 0: O_i = 0.
FT_HD float output_factor(float l) { return l > 0.0f ? 1.0f / l : 0.0f; }

// Alg. 1 line 13: L_i = m_i + log(l_i); -inf for a row that saw no key.
FT_HD float log_sum_exp(float m, float l) { return l > 0.0f ? m + logf(l) : -INFINITY; }

// Alg. 2 line 11: P_ij = exp(S_ij - L_i), recomputed from the forward's L. 0 where masked
// and in rows that see no key (L_i = -inf), so those rows get zero gradients.
FT_HD float prob_from_lse(float s, float lse) {
  return (s == -INFINITY || lse == -INFINITY) ? 0.0f : expf(s - lse);
}

// Alg. 2 line 14: dS_ij = P_ij (dP_ij - D_i), the gradient with respect to S_ij. With a
// softcap, S_ij = c tanh(x_ij / c) of x_ij = scale q_i.k_j, the chain rule carries it back
// to x_ij: dS_ij dS/dx = dS_ij (1 - tanh^2(x_ij / c)) = dS_ij (1 - (S_ij / c)^2), and dQ, dK
// (x's gradients times the scale, as without a softcap) are formed from that. A masked
// entry (S_ij = -inf, P_ij = 0) has no gradient.
FT_HD float dscore(float prob, float dp, float delta, float s, const Problem& p) {
  if (s == -INFINITY) return 0.0f;
  const float ds = prob * (dp - delta);
  if (!(p.softcap > 0.0f)) return ds;
  const float tanh_x = s / p.softcap;
  return ds * (1.0f - tanh_x * tanh_x);
}

// Alg. 2 line 4: D_i = rowsum(dO_i * O_i) for one row, dO in the input dtype (any
// stride along d), O the forward's float32 output.
template <typename T>
FT_HD float delta_row(const void* d_out, int64_t d_out_row, int64_t d_out_stride_d, const float* out_row,
                      int head_dim) {
  float sum = 0.0f;
  for (int d = 0; d < head_dim; ++d) sum += load<T>(d_out, d_out_row + d * d_out_stride_d) * out_row[d];
  return sum;
}

// ---------------------------------------------------------------------------------------
// Host build entry points (attention_host.cpp); the CUDA ones are in attention_cuda.h
// ---------------------------------------------------------------------------------------

// Both return nullptr on success or a message for arguments they refuse.
const char* forward_host(const ForwardArgs& args);
const char* backward_host(const BackwardArgs& args);

// Shared argument check of all launchers. The values inside cu_seqlens (starting at 0,
// non-decreasing, the last one the row count, no sequence longer than n_q / n_k) are the
// caller's contract, as in FlashAttention-2.
inline const char* check_problem(const Problem& p) {
  if (p.batch < 0 || p.heads_q < 0 || p.heads_kv < 0 || p.n_q < 0 || p.n_k < 0 || p.total_q < 0)
    return "negative size";
  if (p.heads_kv == 0 ? p.heads_q != 0 : p.heads_q % p.heads_kv != 0)
    return "heads_q must be a multiple of heads_kv";
  if (p.head_dim < 1 || p.head_dim > kMaxHeadDim) return "head_dim must be in 1..256";
  if (!(p.scale > 0.0f) || !isfinite(p.scale)) return "scale must be finite and positive";
  if (p.window_left < -1 || p.window_right < -1) return "window sides must be >= -1";
  if (!(p.softcap >= 0.0f) || !isfinite(p.softcap)) return "softcap must be finite and >= 0";
  if ((p.cu_seqlens_q == nullptr) != (p.cu_seqlens_k == nullptr)) return "cu_seqlens_q and cu_seqlens_k go together";
  return nullptr;
}

}  // namespace flashtile_ref
