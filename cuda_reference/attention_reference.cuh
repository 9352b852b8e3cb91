// flashtile's CUDA reference: what the CUDA kernels (attention_forward.cu,
// attention_backward.cu) and the host build (attention_host.cpp) share.
//
// Torch-free and CUDA-header-free: this header compiles with nvcc and with a plain C++
// compiler. Everything the two builds must agree on lives here, as __host__ __device__
// functions: the storage types and their conversion to float, tensor addressing, the
// causal mask and loop bounds, the tile loads, and the per-row arithmetic of the
// FlashAttention-2 paper (Dao 2023, "FlashAttention-2: Faster Attention with Better
// Parallelism and Work Partitioning", Algorithm 1 (forward) and Algorithm 2 (backward)).
//
// Notation (the paper's, with the softmax scale made explicit; the paper folds it in):
//   S = scale * Q K^T,  P = softmax(S) row-wise,  O = P V,
//   L_i = log sum_j exp(S_ij)            (natural log; -inf for a row that sees no key)
//   D_i = rowsum(dO_i * O_i),  dP = dO V^T,  dS = P * (dP - D)   (elementwise),
//   dV = P^T dO,  dQ = scale * dS K,  dK = scale * dS^T Q.
// The paper writes the backward's dS without the scale because it takes S = Q K^T; with
// S = scale * Q K^T the chain rule puts the scale on dQ and dK, as written above.
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
// Addressing: (B, H, N, D) tensors with arbitrary element strides, 64-bit offsets
// ---------------------------------------------------------------------------------------

struct Strides { int64_t b, h, n, d; };

FT_HD int64_t offset(const Strides& s, int64_t b, int64_t h, int64_t n, int64_t d) {
  return b * s.b + h * s.h + n * s.n + d * s.d;
}

template <typename T>
FT_HD float load(const void* base, int64_t element) {
  return to_float(static_cast<const T*>(base)[element]);
}

// Copies rows [row0, row0 + rows) of head (b, h) of a (B, H, N, D) tensor into a
// rows x D float tile of row pitch `pitch`, zero-filling rows at or past n. The elements
// are split among `n_workers` workers, worker `worker` taking every n_workers-th one:
// the threads of a CUDA block (threadIdx.x, blockDim.x) or the one host thread (0, 1).
template <typename T>
FT_HD void load_tile(float* tile, int pitch, const void* src, const Strides& st, int64_t b, int64_t h,
                     int64_t row0, int rows, int64_t n, int head_dim, int worker, int n_workers) {
  for (int e = worker; e < rows * head_dim; e += n_workers) {
    const int r = e / head_dim, d = e % head_dim;
    const int64_t row = row0 + r;
    tile[r * pitch + d] = row < n ? load<T>(src, offset(st, b, h, row, d)) : 0.0f;
  }
}

// ---------------------------------------------------------------------------------------
// The problem and the arguments of the launchers
// ---------------------------------------------------------------------------------------

struct Problem {
  int64_t batch, heads, n_q, n_k;
  int head_dim;   // 1..kMaxHeadDim
  float scale;    // softmax scale, > 0
  bool causal;    // bottom-right aligned: query i sees key j iff j <= i + n_k - n_q
};

// q, k, v in `dtype` with any strides; out (B, H, Nq, D) and lse (B, H, Nq) float32,
// contiguous.
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
// to the input dtype), lse, and the outputs delta (B, H, Nq) and dq, dk, dv (B, H, N, D)
// float32, contiguous.
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

// Strides of the contiguous float32 outputs.
FT_HD Strides contiguous_strides(const Problem& p, int64_t n) {
  return Strides{p.heads * n * p.head_dim, n * p.head_dim, p.head_dim, 1};
}

// ---------------------------------------------------------------------------------------
// The causal mask and the loop bounds it allows
// ---------------------------------------------------------------------------------------

// Query i sees key j (both in range) iff not causal or j <= i + n_k - n_q.
FT_HD bool visible(int64_t i, int64_t j, const Problem& p) {
  return i < p.n_q && j < p.n_k && (!p.causal || j <= i + p.n_k - p.n_q);
}

// Keys [0, block_key_end) include every key that the block of queries [q0, q0 + kRows)
// sees; keys past it are masked for all of them, so the block never loads those tiles.
// Under the causal mask the block's last query, min(q0 + kRows, n_q) - 1, sees the most.
FT_HD int64_t block_key_end(int64_t q0, const Problem& p) {
  if (!p.causal) return p.n_k;
  const int64_t last_query = (q0 + kRows < p.n_q ? q0 + kRows : p.n_q) - 1;
  const int64_t end = last_query + p.n_k - p.n_q + 1;
  return end < 0 ? 0 : (end > p.n_k ? p.n_k : end);
}

// Queries [query_begin, n_q) include every query that sees a key >= first_key.
FT_HD int64_t query_begin(int64_t first_key, const Problem& p) {
  if (!p.causal) return 0;
  const int64_t begin = first_key - (p.n_k - p.n_q);
  return begin < 0 ? 0 : (begin > p.n_q ? p.n_q : begin);
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

// One entry of S = scale * Q K^T (Alg. 1 line 8, Alg. 2 line 10), -inf where masked.
FT_HD float score(const float* q_row, const float* k_row, int head_dim, bool is_visible, float scale) {
  return is_visible ? scale * dot(q_row, k_row, head_dim) : -INFINITY;
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

// Alg. 2 line 14: dS_ij = P_ij (dP_ij - D_i).
FT_HD float dscore(float p, float dp, float delta) { return p * (dp - delta); }

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

// Shared argument check of all launchers.
inline const char* check_problem(const Problem& p) {
  if (p.batch < 0 || p.heads < 0 || p.n_q < 0 || p.n_k < 0) return "negative size";
  if (p.head_dim < 1 || p.head_dim > kMaxHeadDim) return "head_dim must be in 1..256";
  if (!(p.scale > 0.0f) || !isfinite(p.scale)) return "scale must be finite and positive";
  return nullptr;
}

}  // namespace flashtile_ref
