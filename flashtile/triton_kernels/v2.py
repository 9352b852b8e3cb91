"""FlashAttention-2 in Triton: forward, and a deterministic backward.

Tri Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work
Partitioning" (2023). Equations are cited from its section 3.1 (forward, Algorithm 1)
and 3.1.2 / Algorithm 2 (backward).

What makes this v2 rather than v1 (see v1.py):
- The output accumulator is left unnormalised inside the loop, O~ = sum_j exp(S_j - m) V_j,
  and divided by the row sum once at the end (section 3.1.1, "tweak" 1).
- Only the log-sum-exp L = m + log(l) is saved for the backward, not m and l (tweak 2).
- Scores are kept in log2 units: scale * log2(e) is folded into one multiply so that the
  softmax uses exp2, one hardware instruction (MUFU.EX2), instead of exp.
- Work is parallel over the sequence as well as batch and heads (section 3.2): one program
  per block of queries in the forward and the dQ pass, per block of keys in the dK/dV pass.
- Causal blocks entirely above the diagonal are skipped; only blocks that straddle it (or
  the sequence end) are masked (section 3.1.1, "causal masking").
- The backward is deterministic: a row pass computes delta = rowsum(dO * O) (eq. for D_i
  in Algorithm 2, line 4), then one kernel accumulates dK, dV over query blocks for each key
  block, and another accumulates dQ over key blocks for each query block. No atomics; the
  price is computing S = Q K^T and dP = dO V^T twice (7 matmuls instead of 5).

Layout: top to bottom, the Triton kernels, the launchers, the autograd Function.
"""
import torch
import triton
import triton.language as tl

from ._common import (LN_2, LOG2_E, ROWWISE_BLOCK, ROWWISE_WARPS, autotuned, block_of_program,
                      head_dim_args, head_offset, is_visible, key_range_for_query_block,
                      load_head_tile, load_tile, query_range_for_key_block, seq_bucket, store_tile,
                      tile_pointers)


# ---------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------

@triton.jit
def _forward_key_loop(acc, row_max, row_sum, q, K, V, k_head, v_head, queries,
                      kv_lo, kv_hi, n_q, n_k, qk_scale,
                      stride_kn, stride_kd, stride_vn, stride_vd,
                      head_dim, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr,
                      IS_CAUSAL: tl.constexpr, MASKED: tl.constexpr):
    """Online softmax over keys [kv_lo, kv_hi), BLOCK_N at a time (FA2 Algorithm 1, lines 8-10).

    row_max is m (log2 units), row_sum is l, acc is the unnormalised O~."""
    local_keys = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    k_ptrs = tile_pointers(K, k_head, kv_lo, local_keys, dims, stride_kn, stride_kd)
    v_ptrs = tile_pointers(V, v_head, kv_lo, local_keys, dims, stride_vn, stride_vd)
    for kv_start in range(kv_lo, kv_hi, BLOCK_N):
        keys = kv_start + local_keys
        k = load_tile(k_ptrs, keys, n_k, dims, head_dim, EVEN_D, MASKED)
        # S = Q K^T, times scale * log2(e): log2 units from here on.
        scores = tl.dot(q, tl.trans(k)) * qk_scale
        if MASKED:
            scores = tl.where(is_visible(queries[:, None], keys[None, :], n_q, n_k, IS_CAUSAL),
                              scores, float("-inf"))
        # m_new = max(m_old, rowmax(S)); P~ = exp2(S - m_new); l_new = exp2(m_old - m_new) l_old + rowsum(P~)
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        if MASKED:
            # A row that has seen no key yet keeps m = -inf; subtracting 0 instead keeps
            # exp2(-inf - (-inf)) from turning into NaN. Its P~ and correction are 0.
            new_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        p = tl.exp2(scores - new_max[:, None])
        correction = tl.exp2(row_max - new_max)
        row_sum = row_sum * correction + tl.sum(p, 1)
        v = load_tile(v_ptrs, keys, n_k, dims, head_dim, EVEN_D, MASKED)
        # O~_new = diag(exp2(m_old - m_new)) O~_old + P~ V: no division inside the loop.
        acc = tl.dot(p.to(v.dtype), v, acc * correction[:, None])
        row_max = new_max
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return acc, row_max, row_sum


@autotuned("forward")
@triton.jit
def _v2_forward_kernel(Q, K, V, O, LSE,
                       stride_qb, stride_qh, stride_qn, stride_qd,
                       stride_kb, stride_kh, stride_kn, stride_kd,
                       stride_vb, stride_vh, stride_vn, stride_vd,
                       stride_ob, stride_oh, stride_on, stride_od,
                       n_heads, n_q, n_k, qk_scale, q_bucket, k_bucket,
                       head_dim, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, IS_CAUSAL: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    bh, q_start = block_of_program(n_q, BLOCK_M, IS_CAUSAL)
    local_queries = tl.arange(0, BLOCK_M)
    queries = q_start + local_queries
    dims = tl.arange(0, BLOCK_D)

    q = load_head_tile(Q, bh, n_heads, stride_qb, stride_qh, stride_qn, stride_qd,
                       q_start, local_queries, n_q, dims, head_dim, EVEN_D)

    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_head = head_offset(bh, n_heads, stride_kb, stride_kh)
    v_head = head_offset(bh, n_heads, stride_vb, stride_vh)
    unmasked_end, kv_end = key_range_for_query_block(q_start, n_q, n_k, BLOCK_M, BLOCK_N, IS_CAUSAL)
    acc, row_max, row_sum = _forward_key_loop(
        acc, row_max, row_sum, q, K, V, k_head, v_head, queries, 0, unmasked_end, n_q, n_k, qk_scale,
        stride_kn, stride_kd, stride_vn, stride_vd, head_dim, BLOCK_D, EVEN_D, BLOCK_N, IS_CAUSAL, False)
    acc, row_max, row_sum = _forward_key_loop(
        acc, row_max, row_sum, q, K, V, k_head, v_head, queries, unmasked_end, kv_end, n_q, n_k, qk_scale,
        stride_kn, stride_kd, stride_vn, stride_vd, head_dim, BLOCK_D, EVEN_D, BLOCK_N, IS_CAUSAL, True)

    # O = diag(l)^-1 O~ and L = m + log(l) (Algorithm 1, lines 12-13), back in natural log.
    # A row that saw no key has l = 0: it outputs 0 and L = -inf, never NaN.
    sees_a_key = row_sum > 0
    out = acc / tl.where(sees_a_key, row_sum, 1.0)[:, None]
    lse = tl.where(sees_a_key, (row_max + tl.log2(row_sum)) * LN_2, float("-inf"))

    o_ptrs = tile_pointers(O, head_offset(bh, n_heads, stride_ob, stride_oh), q_start,
                           local_queries, dims, stride_on, stride_od)
    store_tile(o_ptrs, out.to(O.dtype.element_ty), queries, n_q, dims, head_dim, EVEN_D)
    tl.store(LSE + bh.to(tl.int64) * n_q + queries, lse, mask=queries < n_q)


# ---------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------

@triton.jit
def _v2_delta_kernel(O, DO, DELTA,
                     stride_ob, stride_oh, stride_on, stride_od,
                     stride_dob, stride_doh, stride_don, stride_dod,
                     n_heads, n_q,
                     head_dim, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta_i = rowsum(dO_i * O_i) (Algorithm 2, line 4): dS = P * (dP - delta)."""
    bh, q_start = block_of_program(n_q, BLOCK_M, False)
    local_queries = tl.arange(0, BLOCK_M)
    queries = q_start + local_queries
    dims = tl.arange(0, BLOCK_D)
    o = load_head_tile(O, bh, n_heads, stride_ob, stride_oh, stride_on, stride_od,
                       q_start, local_queries, n_q, dims, head_dim, EVEN_D)
    do = load_head_tile(DO, bh, n_heads, stride_dob, stride_doh, stride_don, stride_dod,
                        q_start, local_queries, n_q, dims, head_dim, EVEN_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * n_q + queries, delta, mask=queries < n_q)


@triton.jit
def load_row_stats(LSE, DELTA, bh, queries, n_q):
    """lse (log2 units) and delta for a block of queries, made safe for P = exp2(S - lse).

    Queries past the sequence end and rows that saw no key (lse = -inf) get lse = +inf, so
    their P is exactly 0 and they add nothing to any gradient."""
    in_sequence = queries < n_q
    offsets = bh.to(tl.int64) * n_q + queries
    lse = tl.load(LSE + offsets, mask=in_sequence, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2_E
    delta = tl.load(DELTA + offsets, mask=in_sequence, other=0.0)
    return lse, delta


@triton.jit
def _dkdv_query_loop(dk, dv, k, v, keys, Q, DO, LSE, DELTA, DQ_ACCUM, bh, q_head, do_head,
                     q_lo, q_hi, n_q, n_k, scale, qk_scale,
                     stride_qn, stride_qd, stride_don, stride_dod,
                     head_dim, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr,
                     IS_CAUSAL: tl.constexpr, MASKED: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    """Accumulate dK, dV of one key block over queries [q_lo, q_hi) (Algorithm 2, lines 8-15).

    Everything is computed transposed (key-major: S^T is BLOCK_N x BLOCK_M) so that the
    accumulators dK and dV stay in the program's row order.
    ATOMIC_DQ (v2_atomic only): also add this block's share of dQ, scale * dS K, into the
    float32 buffer DQ_ACCUM (contiguous (B, H, Nq, head_dim)) with atomic adds: every key
    block's program adds to the same dQ rows, in an order that varies from run to run."""
    local_queries = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q_ptrs = tile_pointers(Q, q_head, q_lo, local_queries, dims, stride_qn, stride_qd)
    do_ptrs = tile_pointers(DO, do_head, q_lo, local_queries, dims, stride_don, stride_dod)
    if ATOMIC_DQ:
        dq_ptrs = tile_pointers(DQ_ACCUM, bh.to(tl.int64) * n_q * head_dim, q_lo, local_queries, dims,
                                head_dim, 1)
    for q_start in range(q_lo, q_hi, BLOCK_M):
        queries = q_start + local_queries
        q = load_tile(q_ptrs, queries, n_q, dims, head_dim, EVEN_D, True)
        do = load_tile(do_ptrs, queries, n_q, dims, head_dim, EVEN_D, True)
        lse, delta = load_row_stats(LSE, DELTA, bh, queries, n_q)
        scores_t = tl.dot(k, tl.trans(q)) * qk_scale  # S^T in log2 units
        if MASKED:
            scores_t = tl.where(is_visible(queries[None, :], keys[:, None], n_q, n_k, IS_CAUSAL),
                                scores_t, float("-inf"))
        # P = exp(S - L): the softmax recomputed from the saved log-sum-exp alone.
        p_t = tl.exp2(scores_t - lse[None, :])
        dv += tl.dot(p_t.to(do.dtype), do)  # dV += P^T dO
        dp_t = tl.dot(v, tl.trans(do))  # dP^T = V dO^T
        ds_t = p_t * (dp_t - delta[None, :])  # dS = P * (dP - delta)
        dk += tl.dot(ds_t.to(q.dtype), q)  # dK += dS^T Q (times scale, applied once at the end)
        if ATOMIC_DQ:
            dq_share = tl.dot(tl.trans(ds_t.to(k.dtype)), k) * scale  # scale * dS K
            # relaxed: no ordering is needed, only the sum once the kernel has finished (the
            # default acq_rel would fence every element).
            tl.atomic_add(dq_ptrs, dq_share, mask=(queries[:, None] < n_q) & (dims[None, :] < head_dim),
                          sem="relaxed")
            dq_ptrs += BLOCK_M * head_dim
        q_ptrs += BLOCK_M * stride_qn
        do_ptrs += BLOCK_M * stride_don
    return dk, dv


@triton.jit
def dkdv_program(Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACCUM,
                 stride_qb, stride_qh, stride_qn, stride_qd,
                 stride_kb, stride_kh, stride_kn, stride_kd,
                 stride_vb, stride_vh, stride_vn, stride_vd,
                 stride_dob, stride_doh, stride_don, stride_dod,
                 stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                 stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                 n_heads, n_q, n_k, scale, qk_scale,
                 head_dim, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, IS_CAUSAL: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    """One program of the key-major backward: dK and dV of one key block (and, with
    ATOMIC_DQ, its share of dQ). The body of v2's dK/dV kernel and of v2_atomic's kernel."""
    bh, k_start = block_of_program(n_k, BLOCK_N, False)
    local_keys = tl.arange(0, BLOCK_N)
    keys = k_start + local_keys
    dims = tl.arange(0, BLOCK_D)
    k = load_head_tile(K, bh, n_heads, stride_kb, stride_kh, stride_kn, stride_kd,
                       k_start, local_keys, n_k, dims, head_dim, EVEN_D)
    v = load_head_tile(V, bh, n_heads, stride_vb, stride_vh, stride_vn, stride_vd,
                       k_start, local_keys, n_k, dims, head_dim, EVEN_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    q_head = head_offset(bh, n_heads, stride_qb, stride_qh)
    do_head = head_offset(bh, n_heads, stride_dob, stride_doh)
    q_lo, masked_end = query_range_for_key_block(k_start, n_q, n_k, BLOCK_N, BLOCK_M, IS_CAUSAL)
    # Diagonal blocks first (masked), then every later query block sees all of these keys.
    dk, dv = _dkdv_query_loop(dk, dv, k, v, keys, Q, DO, LSE, DELTA, DQ_ACCUM, bh, q_head, do_head,
                              q_lo, masked_end, n_q, n_k, scale, qk_scale, stride_qn, stride_qd,
                              stride_don, stride_dod, head_dim, BLOCK_D, EVEN_D, BLOCK_M, IS_CAUSAL, True,
                              ATOMIC_DQ)
    dk, dv = _dkdv_query_loop(dk, dv, k, v, keys, Q, DO, LSE, DELTA, DQ_ACCUM, bh, q_head, do_head,
                              masked_end, n_q, n_q, n_k, scale, qk_scale, stride_qn, stride_qd,
                              stride_don, stride_dod, head_dim, BLOCK_D, EVEN_D, BLOCK_M, IS_CAUSAL, False,
                              ATOMIC_DQ)
    dk *= scale  # dS was taken w.r.t. the scaled scores: dK = scale * dS^T Q
    store_tile(tile_pointers(DK, head_offset(bh, n_heads, stride_dkb, stride_dkh), k_start,
                             local_keys, dims, stride_dkn, stride_dkd),
               dk.to(DK.dtype.element_ty), keys, n_k, dims, head_dim, EVEN_D)
    store_tile(tile_pointers(DV, head_offset(bh, n_heads, stride_dvb, stride_dvh), k_start,
                             local_keys, dims, stride_dvn, stride_dvd),
               dv.to(DV.dtype.element_ty), keys, n_k, dims, head_dim, EVEN_D)


@autotuned("backward", owned="BLOCK_N", looped="BLOCK_M")
@triton.jit
def _v2_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV,
                    stride_qb, stride_qh, stride_qn, stride_qd,
                    stride_kb, stride_kh, stride_kn, stride_kd,
                    stride_vb, stride_vh, stride_vn, stride_vd,
                    stride_dob, stride_doh, stride_don, stride_dod,
                    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                    n_heads, n_q, n_k, scale, qk_scale, q_bucket, k_bucket,
                    head_dim, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, IS_CAUSAL: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK, dV for one key block, looping over query blocks; dQ is left to _v2_dq_kernel."""
    dkdv_program(Q, K, V, DO, LSE, DELTA, DK, DV, DK,  # no dQ buffer: DK stands in, unused
                 stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                 stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_don, stride_dod,
                 stride_dkb, stride_dkh, stride_dkn, stride_dkd, stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                 n_heads, n_q, n_k, scale, qk_scale, head_dim, BLOCK_D, EVEN_D, IS_CAUSAL, BLOCK_M, BLOCK_N, False)


@triton.jit
def _dq_key_loop(dq, q, do, lse, delta, queries, K, V, k_head, v_head,
                 kv_lo, kv_hi, n_q, n_k, qk_scale,
                 stride_kn, stride_kd, stride_vn, stride_vd,
                 head_dim, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr,
                 IS_CAUSAL: tl.constexpr, MASKED: tl.constexpr):
    """Accumulate dQ of one query block over keys [kv_lo, kv_hi) (Algorithm 2, lines 11-13)."""
    local_keys = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    k_ptrs = tile_pointers(K, k_head, kv_lo, local_keys, dims, stride_kn, stride_kd)
    v_ptrs = tile_pointers(V, v_head, kv_lo, local_keys, dims, stride_vn, stride_vd)
    for kv_start in range(kv_lo, kv_hi, BLOCK_N):
        keys = kv_start + local_keys
        k = load_tile(k_ptrs, keys, n_k, dims, head_dim, EVEN_D, MASKED)
        v = load_tile(v_ptrs, keys, n_k, dims, head_dim, EVEN_D, MASKED)
        scores = tl.dot(q, tl.trans(k)) * qk_scale
        if MASKED:
            scores = tl.where(is_visible(queries[:, None], keys[None, :], n_q, n_k, IS_CAUSAL),
                              scores, float("-inf"))
        p = tl.exp2(scores - lse[:, None])
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)  # dQ += dS K (times scale at the end)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return dq


@autotuned("backward")
@triton.jit
def _v2_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ,
                  stride_qb, stride_qh, stride_qn, stride_qd,
                  stride_kb, stride_kh, stride_kn, stride_kd,
                  stride_vb, stride_vh, stride_vn, stride_vd,
                  stride_dob, stride_doh, stride_don, stride_dod,
                  stride_dqb, stride_dqh, stride_dqn, stride_dqd,
                  n_heads, n_q, n_k, scale, qk_scale, q_bucket, k_bucket,
                  head_dim, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, IS_CAUSAL: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    bh, q_start = block_of_program(n_q, BLOCK_M, IS_CAUSAL)
    local_queries = tl.arange(0, BLOCK_M)
    queries = q_start + local_queries
    dims = tl.arange(0, BLOCK_D)
    q = load_head_tile(Q, bh, n_heads, stride_qb, stride_qh, stride_qn, stride_qd,
                       q_start, local_queries, n_q, dims, head_dim, EVEN_D)
    do = load_head_tile(DO, bh, n_heads, stride_dob, stride_doh, stride_don, stride_dod,
                        q_start, local_queries, n_q, dims, head_dim, EVEN_D)
    lse, delta = load_row_stats(LSE, DELTA, bh, queries, n_q)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_head = head_offset(bh, n_heads, stride_kb, stride_kh)
    v_head = head_offset(bh, n_heads, stride_vb, stride_vh)
    unmasked_end, kv_end = key_range_for_query_block(q_start, n_q, n_k, BLOCK_M, BLOCK_N, IS_CAUSAL)
    dq = _dq_key_loop(dq, q, do, lse, delta, queries, K, V, k_head, v_head, 0, unmasked_end,
                      n_q, n_k, qk_scale, stride_kn, stride_kd, stride_vn, stride_vd,
                      head_dim, BLOCK_D, EVEN_D, BLOCK_N, IS_CAUSAL, False)
    dq = _dq_key_loop(dq, q, do, lse, delta, queries, K, V, k_head, v_head, unmasked_end, kv_end,
                      n_q, n_k, qk_scale, stride_kn, stride_kd, stride_vn, stride_vd,
                      head_dim, BLOCK_D, EVEN_D, BLOCK_N, IS_CAUSAL, True)
    dq *= scale
    store_tile(tile_pointers(DQ, head_offset(bh, n_heads, stride_dqb, stride_dqh), q_start,
                             local_queries, dims, stride_dqn, stride_dqd),
               dq.to(DQ.dtype.element_ty), queries, n_q, dims, head_dim, EVEN_D)


# ---------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------

def shape_args(q, k):
    """The launch arguments every kernel takes after its strides, and its constexprs."""
    B, H, n_q, D = q.shape
    n_k = k.shape[2]
    return (B, H, n_q, n_k, D), head_dim_args(D)


def v2_forward(q, k, v, causal, scale):
    """O and the natural-log lse (float32, (B, H, Nq)) of softmax(scale q k^T) v."""
    (B, H, n_q, n_k, D), dims = shape_args(q, k)
    out = torch.empty_like(q)
    lse = torch.empty((B, H, n_q), device=q.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]) * B * H,)
    _v2_forward_kernel[grid](q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                             H, n_q, n_k, scale * LOG2_E.value, seq_bucket(n_q), seq_bucket(n_k),
                             IS_CAUSAL=causal, **dims)
    return out, lse


def v2_delta(out, d_out):
    """delta = rowsum(dO * O) in float32, (B, H, Nq)."""
    (B, H, n_q, _, D), dims = shape_args(out, out)
    delta = torch.empty((B, H, n_q), device=out.device, dtype=torch.float32)
    grid = (triton.cdiv(n_q, ROWWISE_BLOCK) * B * H,)
    _v2_delta_kernel[grid](out, d_out, delta, *out.stride(), *d_out.stride(), H, n_q,
                           BLOCK_M=ROWWISE_BLOCK, num_warps=ROWWISE_WARPS, **dims)
    return delta


def v2_backward(d_out, q, k, v, out, lse, causal, scale):
    """dQ, dK, dV: delta pass, then dK/dV over key blocks, then dQ over query blocks."""
    (B, H, n_q, n_k, D), dims = shape_args(q, k)
    delta = v2_delta(out, d_out)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    shapes = (H, n_q, n_k, scale, scale * LOG2_E.value, seq_bucket(n_q), seq_bucket(n_k))
    key_grid = lambda meta: (triton.cdiv(n_k, meta["BLOCK_N"]) * B * H,)
    _v2_dkdv_kernel[key_grid](q, k, v, d_out, lse, delta, dk, dv,
                              *q.stride(), *k.stride(), *v.stride(), *d_out.stride(),
                              *dk.stride(), *dv.stride(), *shapes, IS_CAUSAL=causal, **dims)
    query_grid = lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]) * B * H,)
    _v2_dq_kernel[query_grid](q, k, v, d_out, lse, delta, dq,
                              *q.stride(), *k.stride(), *v.stride(), *d_out.stride(), *dq.stride(),
                              *shapes, IS_CAUSAL=causal, **dims)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------

class FlashAttentionV2Function(torch.autograd.Function):
    """FlashAttention-2: `FlashAttentionV2Function.apply(q, k, v, causal=False, scale=None)`
    returns (out, lse); lse is not differentiable. Inputs are checked as flashtile.attention
    checks them."""

    @staticmethod
    def forward(ctx, q, k, v, causal=False, scale=None):
        from ..interface import check_inputs

        scale = check_inputs(q, k, v, causal, scale, "v2", False)
        out, lse = v2_forward(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale = causal, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, d_out, _d_lse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = v2_backward(d_out, q, k, v, out, lse, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None
