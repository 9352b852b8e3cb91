"""FlashAttention-2 in Triton: forward, and a deterministic backward.

Tri Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work
Partitioning" (2023). Line numbers are those of its Algorithm 1 (forward) and
Algorithm 2 (backward); sections are of the paper.

What makes this v2 rather than v1 (see v1.py):
- The output accumulator is left unnormalised inside the loop, O~ = sum_j exp(S_j - m) V_j,
  and divided by the row sum once at the end (section 3.1.1, "tweak" 1).
- Only the log-sum-exp L = m + log(l) is saved for the backward, not m and l (tweak 2).
- Scores are kept in log2 units: scale * log2(e) is folded into one multiply so that the
  softmax uses exp2, one hardware instruction (MUFU.EX2), instead of exp.
- Work is parallel over the sequence as well as batch and heads (section 3.2): one program
  per block of queries in the forward and the dQ pass, per block of keys in the dK/dV pass.
- Blocks outside the causal mask or the window are skipped; only blocks that straddle its
  edges (or the sequence end) are masked (section 3.1.1, "causal masking").
- The backward is deterministic: a row pass computes D = rowsum(dO * O) (Algorithm 2,
  line 4), then one kernel accumulates dK, dV over query blocks for each key block, and
  another accumulates dQ over key blocks for each query block. No atomics; the price is
  computing S = Q K^T and dP = dO V^T twice (7 matmuls instead of 5). v2_atomic.py runs
  the same dK/dV kernel with ATOMIC_DQ, which adds dQ in the same pass instead.

Features (see _common.py): grouped-query attention, (left, right) windows, softcap, varlen.
Layout: top to bottom, the Triton kernels, the launchers, the autograd Function.
"""
import torch
import triton
import triton.language as tl

from ._common import (LN_2, LOG2_E, ROWWISE_WARPS, STAT_BLOCK, Problem, autotuned, block_read_at, d_contiguous,
                      head_dim_args, head_start, is_visible, key_blocks, load_tile, masked_loop_bounds,
                      output_gradient, padded_stats_row0, program_rows, query_blocks, row_strides, rows_to_next_block,
                      scores_in_log2, sequence, settle_cache_keys, skip_unused_gradients, softcap_chain, stat_strides,
                      store_tile, tile_pointers)
from ._launch import DirectKernel

try:  # Gluon, and so the Hopper kernels, ships with Triton 3.6, not with 3.2 (flashtile's Turing version)
    from . import v2_hopper, v2_hopper_backward
except ImportError:
    v2_hopper = v2_hopper_backward = None


# ---------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------

@triton.jit
def _forward_key_loop(acc, row_max, row_sum, q, queries, k_start, v_start, stride_kn, stride_vn,
                      kv_lo, kv_hi, full_lo, full_hi, n_q, n_k, qk_scale, softcap_log2, window_left, window_right,
                      head_dim, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr,
                      MASKED: tl.constexpr, SKIP_FULL: tl.constexpr,
                      WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr):
    """Online softmax over keys [kv_lo, kv_hi), BLOCK_N at a time (Algorithm 1, lines 7-10);
    with SKIP_FULL, less the unmasked blocks [full_lo, full_hi) (`skip_full_blocks`).

    row_max is m (log2 units), row_sum is l, acc is the unnormalised O~."""
    local_keys = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    kv_first, kv_end = masked_loop_bounds(kv_lo, kv_hi, full_lo, full_hi, SKIP_FULL)
    k_ptrs = tile_pointers(k_start, kv_first, local_keys, dims, stride_kn)
    v_ptrs = tile_pointers(v_start, kv_first, local_keys, dims, stride_vn)
    for position in range(kv_lo, kv_end, BLOCK_N):
        # The pointers follow kv_first, the block read at `position`.
        kv_first = block_read_at(position, full_lo, full_hi, SKIP_FULL)
        keys = kv_first + local_keys
        k = load_tile(k_ptrs, keys, n_k, dims, head_dim, EVEN_D, MASKED)
        # Line 8: S = Q K^T, times scale * log2(e) (or softcapped): log2 units from here on.
        scores, _ = scores_in_log2(tl.dot(q, tl.trans(k)), qk_scale, softcap_log2, SOFTCAP)
        if MASKED:
            visible = is_visible(queries[:, None], keys[None, :], n_q, n_k, window_left, window_right,
                                 WINDOW_LEFT, WINDOW_RIGHT)
            scores = tl.where(visible, scores, float("-inf"))
        # Line 9: m_new = max(m_old, rowmax(S)); P~ = exp2(S - m_new); l_new = exp2(m_old - m_new) l_old + rowsum(P~)
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        shift = new_max
        if MASKED:
            # A row that has seen no key yet keeps m = -inf; shifting by 0 instead keeps
            # exp2(-inf - (-inf)) from turning into NaN. Its P~ and correction are 0.
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        p = tl.exp2(scores - shift[:, None])
        correction = tl.exp2(row_max - shift)
        row_sum = row_sum * correction + tl.sum(p, 1)
        v = load_tile(v_ptrs, keys, n_k, dims, head_dim, EVEN_D, MASKED)
        # Line 10: O~_new = diag(exp2(m_old - m_new)) O~_old + P~ V: no division inside the loop.
        acc = tl.dot(p.to(v.dtype), v, acc * correction[:, None])
        row_max = new_max
        rows = rows_to_next_block(position, BLOCK_N, full_lo, full_hi, SKIP_FULL)
        k_ptrs += rows * stride_kn
        v_ptrs += rows * stride_vn
    return acc, row_max, row_sum


@autotuned("forward")
@triton.jit
def _v2_forward_kernel(Q, K, V, O, LSE, CU_SEQLENS_Q, CU_SEQLENS_K,
                       stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                       stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on, stride_lb, stride_lh,
                       q_heads, group, n_q, n_k, head_dim, scale, qk_scale, softcap_log2,
                       window_left, window_right, q_bucket, k_bucket,
                       BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, VARLEN: tl.constexpr,
                       WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    batch, head, q_first, q_row0, n_q = program_rows(CU_SEQLENS_Q, q_heads, n_q, BLOCK_M, WINDOW_RIGHT, VARLEN)
    k_row0, n_k = sequence(CU_SEQLENS_K, batch, n_k, VARLEN)
    if q_first >= n_q:  # a spare program of the packed varlen grid
        return
    kv_head = head // group
    local_queries = tl.arange(0, BLOCK_M)
    queries = q_first + local_queries
    dims = tl.arange(0, BLOCK_D)
    q_start = head_start(Q, batch, head, q_row0, stride_qb, stride_qh, stride_qn)
    k_start = head_start(K, batch, kv_head, k_row0, stride_kb, stride_kh, stride_kn)
    v_start = head_start(V, batch, kv_head, k_row0, stride_vb, stride_vh, stride_vn)
    # Line 4: load Q_i; line 5: O~ = 0, l = 0, m = -inf.
    q = load_tile(tile_pointers(q_start, q_first, local_queries, dims, stride_qn), queries, n_q, dims, head_dim, EVEN_D, True)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Line 6, in two loops: first the key blocks that every query of this block sees whole
    # (no mask), then the masked ones, the window's left edge [start, first_full) and the
    # diagonal or the sequence's last partial block [end_full, hi), in one loop. The online
    # softmax gives the same result in any block order, up to rounding.
    start, first_full, end_full, hi = key_blocks(q_first, n_q, n_k, window_left, window_right, BLOCK_M, BLOCK_N,
                                                 WINDOW_LEFT, WINDOW_RIGHT)
    acc, row_max, row_sum = _forward_key_loop(
        acc, row_max, row_sum, q, queries, k_start, v_start, stride_kn, stride_vn, first_full, end_full,
        first_full, end_full, n_q, n_k, qk_scale, softcap_log2, window_left, window_right, head_dim,
        BLOCK_D, EVEN_D, BLOCK_N, False, False, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP)
    masked_lo = end_full
    if WINDOW_LEFT:  # only a left edge makes the head [start, first_full) non-empty
        masked_lo = start
    acc, row_max, row_sum = _forward_key_loop(
        acc, row_max, row_sum, q, queries, k_start, v_start, stride_kn, stride_vn, masked_lo, hi,
        first_full, end_full, n_q, n_k, qk_scale, softcap_log2, window_left, window_right, head_dim,
        BLOCK_D, EVEN_D, BLOCK_N, True, WINDOW_LEFT, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP)

    # Lines 12-13: O = diag(l)^-1 O~ and L = m + log(l), back in natural log.
    # A row that saw no key has l = 0: it outputs 0 and L = -inf, never NaN.
    sees_a_key = row_sum > 0
    out = acc / tl.where(sees_a_key, row_sum, 1.0)[:, None]
    lse = tl.where(sees_a_key, (row_max + tl.log2(row_sum)) * LN_2, float("-inf"))
    o_start = head_start(O, batch, head, q_row0, stride_ob, stride_oh, stride_on)
    store_tile(tile_pointers(o_start, q_first, local_queries, dims, stride_on), out.to(O.dtype.element_ty), queries, n_q,
               dims, head_dim, EVEN_D)
    tl.store(head_start(LSE, batch, head, q_row0, stride_lb, stride_lh, 1) + queries, lse, mask=queries < n_q)


# ---------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------

@DirectKernel  # no autotuner: launched directly after its first launch (_launch.py)
@triton.jit
def _v2_row_stats_kernel(O, DO, LSE, L2, DELTA, CU_SEQLENS_Q,
                         stride_ob, stride_oh, stride_on, stride_lb, stride_lh, stride_sb, stride_sh,
                         q_heads, n_q, head_dim,
                         BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr):
    """The row statistics the backward kernels read, for a block of BLOCK_M = STAT_BLOCK rows:
    D_i = rowsum(dO_i * O_i) (Algorithm 2, line 4: dS = P * (dP - D)) and L_i in log2 units,
    into the padded buffers L2 and DELTA (`Problem.padded_stats_shape`), every row of the
    block written. Rows past the sequence end and rows that saw no key (L = -inf) get
    L = +inf and D = 0, so that P = exp2(S - L) is exactly 0 there and they add nothing to
    any gradient. dO shares O's strides; LSE is the forward's (natural log, unpadded)."""
    batch, head, q_first, q_row0, n_q = program_rows(CU_SEQLENS_Q, q_heads, n_q, BLOCK_M, False, VARLEN)
    if q_first >= n_q:
        return
    local_queries = tl.arange(0, BLOCK_M)
    queries = q_first + local_queries
    dims = tl.arange(0, BLOCK_D)
    o_start = head_start(O, batch, head, q_row0, stride_ob, stride_oh, stride_on)
    do_start = head_start(DO, batch, head, q_row0, stride_ob, stride_oh, stride_on)
    o = load_tile(tile_pointers(o_start, q_first, local_queries, dims, stride_on), queries, n_q, dims,
                  head_dim, EVEN_D, True)
    do = load_tile(tile_pointers(do_start, q_first, local_queries, dims, stride_on), queries, n_q, dims,
                   head_dim, EVEN_D, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    lse = tl.load(head_start(LSE, batch, head, q_row0, stride_lb, stride_lh, 1) + queries, mask=queries < n_q,
                  other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2_E
    stats_row0 = padded_stats_row0(q_row0, batch, VARLEN)
    tl.store(head_start(L2, batch, head, stats_row0, stride_sb, stride_sh, 1) + queries, lse)
    tl.store(head_start(DELTA, batch, head, stats_row0, stride_sb, stride_sh, 1) + queries, delta)


@triton.jit
def load_row_stats(lse_start, delta_start, queries):
    """L (log2 units) and D of a block of queries, from the padded row statistics that
    `_v2_row_stats_kernel` wrote: no mask, every block a backward kernel reads lies inside
    them, with L = +inf and D = 0 past the sequence's end."""
    return tl.load(lse_start + queries), tl.load(delta_start + queries)


@triton.jit
def _dkdv_query_block(dk, dv, k, v, keys, q_ptrs, do_ptrs, dq_ptrs, lse_start, delta_start, q_first,
                      n_q, n_k, scale, qk_scale, softcap_log2, window_left, window_right, head_dim,
                      BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
                      WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
                      ATOMIC_DQ: tl.constexpr):
    """One query block's share of dK, dV (Algorithm 2, lines 9-17), from the tiles at q_ptrs,
    do_ptrs (rows q_first ...).

    Everything is computed transposed (key-major: S^T is BLOCK_N x BLOCK_M) so that the
    accumulators dK and dV stay in the program's row order.
    ATOMIC_DQ (v2_atomic): also add this block's share of dQ, scale * dS K (line 15), into
    the float32 buffer at dq_ptrs with atomic adds: every key block's program adds to the
    same dQ rows, in an order that varies from run to run."""
    queries = q_first + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q = load_tile(q_ptrs, queries, n_q, dims, head_dim, EVEN_D, True)
    do = load_tile(do_ptrs, queries, n_q, dims, head_dim, EVEN_D, True)
    lse, delta = load_row_stats(lse_start, delta_start, queries)
    # Line 10: S^T = K Q^T, in log2 units.
    scores_t, capped_t = scores_in_log2(tl.dot(k, tl.trans(q)), qk_scale, softcap_log2, SOFTCAP)
    if MASKED:
        visible = is_visible(queries[None, :], keys[:, None], n_q, n_k, window_left, window_right,
                             WINDOW_LEFT, WINDOW_RIGHT)
        scores_t = tl.where(visible, scores_t, float("-inf"))
    p_t = tl.exp2(scores_t - lse[None, :])  # line 11: P = exp(S - L), from L alone
    dv += tl.dot(p_t.to(do.dtype), do)  # line 12: dV += P^T dO
    dp_t = tl.dot(v, tl.trans(do))  # line 13: dP^T = V dO^T
    ds_t = p_t * (dp_t - delta[None, :])  # line 14: dS = P * (dP - D)
    ds_t = softcap_chain(ds_t, capped_t, SOFTCAP)
    dk += tl.dot(ds_t.to(q.dtype), q)  # line 16: dK += dS^T Q (times scale, once at the end)
    if ATOMIC_DQ:
        # Line 15: dQ += dS K. relaxed: only the sum matters once the kernel has finished,
        # and the default acq_rel would fence every element.
        dq_share = tl.dot(tl.trans(ds_t.to(k.dtype)), k) * scale
        tl.atomic_add(dq_ptrs, dq_share, mask=(queries[:, None] < n_q) & (dims[None, :] < head_dim), sem="relaxed")
    return dk, dv


@triton.jit
def _dkdv_query_loop(dk, dv, k, v, keys, q_start, do_start, dq_start, lse_start, delta_start,
                     stride_qh, stride_qn, stride_doh, stride_don, stride_lh, members, q_lo, q_hi, full_lo, full_hi,
                     n_q, n_k, scale, qk_scale, softcap_log2, window_left, window_right, head_dim,
                     BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
                     SKIP_FULL: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
                     SOFTCAP: tl.constexpr, GROUPED: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    """Accumulate dK, dV of one key block over queries [q_lo, q_hi) (Algorithm 2, line 8's
    loop), with SKIP_FULL less the unmasked blocks [full_lo, full_hi) (`skip_full_blocks`),
    of the `members` query heads that read its K/V head; *_start point at the first of
    them, and the dQ buffer has dO's strides.

    GROUPED (GQA): one flat loop over (query head, query block) pairs, heads outer, not a
    loop over heads around a loop over blocks: Triton software-pipelines a flat loop as it
    does the plain one, while the nested loops kept K, V, dK, dV and the inner loop's
    pipeline state live together and spilled registers (`flashtile.aot`-compiled for sm_90
    at D 128: hundreds of bytes of stack, none without GQA)."""
    local_queries = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q_first, q_end = masked_loop_bounds(q_lo, q_hi, full_lo, full_hi, SKIP_FULL)
    if GROUPED:
        blocks = tl.cdiv(q_end - q_lo, BLOCK_M)
        for step in range(0, members * blocks):
            member = step // blocks
            q_first = block_read_at(q_lo + (step - member * blocks) * BLOCK_M, full_lo, full_hi, SKIP_FULL)
            head_offset = tl.cast(member, tl.int64)
            dk, dv = _dkdv_query_block(
                dk, dv, k, v, keys,
                tile_pointers(q_start + head_offset * stride_qh, q_first, local_queries, dims, stride_qn),
                tile_pointers(do_start + head_offset * stride_doh, q_first, local_queries, dims, stride_don),
                tile_pointers(dq_start + head_offset * stride_doh, q_first, local_queries, dims, stride_don),
                lse_start + head_offset * stride_lh, delta_start + head_offset * stride_lh, q_first,
                n_q, n_k, scale, qk_scale, softcap_log2, window_left, window_right, head_dim,
                BLOCK_D, EVEN_D, BLOCK_M, MASKED, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP, ATOMIC_DQ)
    else:
        q_ptrs = tile_pointers(q_start, q_first, local_queries, dims, stride_qn)
        do_ptrs = tile_pointers(do_start, q_first, local_queries, dims, stride_don)
        dq_ptrs = tile_pointers(dq_start, q_first, local_queries, dims, stride_don)
        for position in range(q_lo, q_end, BLOCK_M):
            # The pointers follow q_first, the block read at `position`: one set of pointers
            # carried by the loop, moved on by the jump too (a second set spills more).
            q_first = block_read_at(position, full_lo, full_hi, SKIP_FULL)
            dk, dv = _dkdv_query_block(
                dk, dv, k, v, keys, q_ptrs, do_ptrs, dq_ptrs, lse_start, delta_start, q_first,
                n_q, n_k, scale, qk_scale, softcap_log2, window_left, window_right, head_dim,
                BLOCK_D, EVEN_D, BLOCK_M, MASKED, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP, ATOMIC_DQ)
            rows = rows_to_next_block(position, BLOCK_M, full_lo, full_hi, SKIP_FULL)
            q_ptrs += rows * stride_qn
            do_ptrs += rows * stride_don
            dq_ptrs += rows * stride_don
    return dk, dv


@autotuned("backward", owned="BLOCK_N", looped="BLOCK_M", reset_to_zero=["DQ"])
@triton.jit
def _v2_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DQ, CU_SEQLENS_Q, CU_SEQLENS_K,
                    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                    stride_gb, stride_gh, stride_gn, stride_lb, stride_lh,
                    kv_heads, group, n_q, n_k, head_dim, scale, qk_scale, softcap_log2,
                    window_left, window_right, q_bucket, k_bucket,
                    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, VARLEN: tl.constexpr,
                    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
                    GROUPED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    ATOMIC_DQ: tl.constexpr):
    """dK, dV of one key block of one K/V head (and with ATOMIC_DQ its share of dQ).

    Strides: stride_o* are dO's (and the float32 dQ buffer's: both are contiguous like q),
    stride_g* are dK's and dV's (contiguous like k). The group's query heads are visited in
    order, so dK and dV are summed over the group deterministically (GQA)."""
    batch, kv_head, k_first, k_row0, n_k = program_rows(CU_SEQLENS_K, kv_heads, n_k, BLOCK_N, False, VARLEN)
    q_row0, n_q = sequence(CU_SEQLENS_Q, batch, n_q, VARLEN)
    if k_first >= n_k:
        return
    local_keys = tl.arange(0, BLOCK_N)
    keys = k_first + local_keys
    dims = tl.arange(0, BLOCK_D)
    # Lines 6-7: load K_j, V_j; dK_j = dV_j = 0.
    k_start = head_start(K, batch, kv_head, k_row0, stride_kb, stride_kh, stride_kn)
    v_start = head_start(V, batch, kv_head, k_row0, stride_vb, stride_vh, stride_vn)
    k = load_tile(tile_pointers(k_start, k_first, local_keys, dims, stride_kn), keys, n_k, dims, head_dim, EVEN_D, True)
    v = load_tile(tile_pointers(v_start, k_first, local_keys, dims, stride_vn), keys, n_k, dims, head_dim, EVEN_D, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    start, first_full, end_full, hi = query_blocks(k_first, n_q, n_k, window_left, window_right, BLOCK_N, BLOCK_M,
                                                   WINDOW_LEFT, WINDOW_RIGHT)
    # Line 8, for each query head that reads this K/V head (the group's heads are consecutive).
    members = group if GROUPED else 1
    head = kv_head * group
    q_start = head_start(Q, batch, head, q_row0, stride_qb, stride_qh, stride_qn)
    do_start = head_start(DO, batch, head, q_row0, stride_ob, stride_oh, stride_on)
    dq_start = head_start(DQ, batch, head, q_row0, stride_ob, stride_oh, stride_on)
    stats_row0 = padded_stats_row0(q_row0, batch, VARLEN)
    lse_start = head_start(LSE, batch, head, stats_row0, stride_lb, stride_lh, 1)
    delta_start = head_start(DELTA, batch, head, stats_row0, stride_lb, stride_lh, 1)
    # In two loops: the masked query blocks, i.e. the diagonal [start, first_full) (a right
    # edge) and the window's left edge [end_full, hi) in one loop, and the unmasked ones
    # [first_full, end_full). A fixed order: dK and dV are the same sums, bit for bit, on
    # every run. The masked loop runs first when there is a diagonal and last for a left
    # edge alone: compiled for sm_90 (`flashtile.aot --resources`), the other order spills
    # registers that this one does not (causal 0 -> 88 B, left-only 0 -> 112 B at 128x64).
    if WINDOW_RIGHT:
        masked_hi = first_full
        if WINDOW_LEFT:
            masked_hi = hi
        dk, dv = _dkdv_query_loop(
            dk, dv, k, v, keys, q_start, do_start, dq_start, lse_start, delta_start, stride_qh, stride_qn,
            stride_oh, stride_on, stride_lh, members, start, masked_hi, first_full, end_full, n_q, n_k, scale,
            qk_scale, softcap_log2, window_left, window_right, head_dim, BLOCK_D, EVEN_D, BLOCK_M, True,
            WINDOW_LEFT, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP, GROUPED, ATOMIC_DQ)
    dk, dv = _dkdv_query_loop(
        dk, dv, k, v, keys, q_start, do_start, dq_start, lse_start, delta_start, stride_qh, stride_qn,
        stride_oh, stride_on, stride_lh, members, first_full, end_full, first_full, end_full, n_q, n_k, scale,
        qk_scale, softcap_log2, window_left, window_right, head_dim, BLOCK_D, EVEN_D, BLOCK_M, False, False,
        WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP, GROUPED, ATOMIC_DQ)
    if WINDOW_LEFT and not WINDOW_RIGHT:  # the left edge alone (the head is empty)
        dk, dv = _dkdv_query_loop(
            dk, dv, k, v, keys, q_start, do_start, dq_start, lse_start, delta_start, stride_qh, stride_qn,
            stride_oh, stride_on, stride_lh, members, end_full, hi, first_full, end_full, n_q, n_k, scale,
            qk_scale, softcap_log2, window_left, window_right, head_dim, BLOCK_D, EVEN_D, BLOCK_M, True, False,
            WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP, GROUPED, ATOMIC_DQ)
    dk *= scale  # dS was taken w.r.t. the scaled scores: dK = scale * dS^T Q
    # Line 18: write dK_j, dV_j.
    dk_start = head_start(DK, batch, kv_head, k_row0, stride_gb, stride_gh, stride_gn)
    dv_start = head_start(DV, batch, kv_head, k_row0, stride_gb, stride_gh, stride_gn)
    store_tile(tile_pointers(dk_start, k_first, local_keys, dims, stride_gn), dk.to(DK.dtype.element_ty), keys, n_k, dims,
               head_dim, EVEN_D)
    store_tile(tile_pointers(dv_start, k_first, local_keys, dims, stride_gn), dv.to(DV.dtype.element_ty), keys, n_k, dims,
               head_dim, EVEN_D)


@triton.jit
def _dq_key_loop(dq, q, do, lse, delta, queries, k_start, v_start, stride_kn, stride_vn,
                 kv_lo, kv_hi, full_lo, full_hi, n_q, n_k, qk_scale, softcap_log2, window_left, window_right, head_dim,
                 BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                 SKIP_FULL: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
                 SOFTCAP: tl.constexpr):
    """Accumulate dQ of one query block over keys [kv_lo, kv_hi), with SKIP_FULL less the
    unmasked blocks [full_lo, full_hi) (`skip_full_blocks`) (Algorithm 2, lines 10-15, with
    the loops swapped: this program owns dQ_i, so no other program writes it)."""
    local_keys = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    kv_first, kv_end = masked_loop_bounds(kv_lo, kv_hi, full_lo, full_hi, SKIP_FULL)
    k_ptrs = tile_pointers(k_start, kv_first, local_keys, dims, stride_kn)
    v_ptrs = tile_pointers(v_start, kv_first, local_keys, dims, stride_vn)
    for position in range(kv_lo, kv_end, BLOCK_N):
        # The pointers follow kv_first, the block read at `position`.
        kv_first = block_read_at(position, full_lo, full_hi, SKIP_FULL)
        keys = kv_first + local_keys
        k = load_tile(k_ptrs, keys, n_k, dims, head_dim, EVEN_D, MASKED)
        v = load_tile(v_ptrs, keys, n_k, dims, head_dim, EVEN_D, MASKED)
        scores, capped = scores_in_log2(tl.dot(q, tl.trans(k)), qk_scale, softcap_log2, SOFTCAP)
        if MASKED:
            visible = is_visible(queries[:, None], keys[None, :], n_q, n_k, window_left, window_right,
                                 WINDOW_LEFT, WINDOW_RIGHT)
            scores = tl.where(visible, scores, float("-inf"))
        p = tl.exp2(scores - lse[:, None])
        dp = tl.dot(do, tl.trans(v))
        ds = softcap_chain(p * (dp - delta[:, None]), capped, SOFTCAP)
        dq = tl.dot(ds.to(k.dtype), k, dq)  # line 15: dQ += dS K (times scale at the end)
        rows = rows_to_next_block(position, BLOCK_N, full_lo, full_hi, SKIP_FULL)
        k_ptrs += rows * stride_kn
        v_ptrs += rows * stride_vn
    return dq


@autotuned("backward")
@triton.jit
def _v2_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU_SEQLENS_Q, CU_SEQLENS_K,
                  stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                  stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on, stride_lb, stride_lh,
                  q_heads, group, n_q, n_k, head_dim, scale, qk_scale, softcap_log2,
                  window_left, window_right, q_bucket, k_bucket,
                  BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, VARLEN: tl.constexpr,
                  WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ of one query block. stride_o* are dO's and dQ's (both contiguous like q)."""
    batch, head, q_first, q_row0, n_q = program_rows(CU_SEQLENS_Q, q_heads, n_q, BLOCK_M, WINDOW_RIGHT, VARLEN)
    k_row0, n_k = sequence(CU_SEQLENS_K, batch, n_k, VARLEN)
    if q_first >= n_q:
        return
    kv_head = head // group
    local_queries = tl.arange(0, BLOCK_M)
    queries = q_first + local_queries
    dims = tl.arange(0, BLOCK_D)
    q_start = head_start(Q, batch, head, q_row0, stride_qb, stride_qh, stride_qn)
    do_start = head_start(DO, batch, head, q_row0, stride_ob, stride_oh, stride_on)
    q = load_tile(tile_pointers(q_start, q_first, local_queries, dims, stride_qn), queries, n_q, dims, head_dim, EVEN_D, True)
    do = load_tile(tile_pointers(do_start, q_first, local_queries, dims, stride_on), queries, n_q, dims, head_dim, EVEN_D, True)
    stats_row0 = padded_stats_row0(q_row0, batch, VARLEN)
    lse, delta = load_row_stats(head_start(LSE, batch, head, stats_row0, stride_lb, stride_lh, 1),
                                head_start(DELTA, batch, head, stats_row0, stride_lb, stride_lh, 1), queries)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_start = head_start(K, batch, kv_head, k_row0, stride_kb, stride_kh, stride_kn)
    v_start = head_start(V, batch, kv_head, k_row0, stride_vb, stride_vh, stride_vn)
    start, first_full, end_full, hi = key_blocks(q_first, n_q, n_k, window_left, window_right, BLOCK_M, BLOCK_N,
                                                 WINDOW_LEFT, WINDOW_RIGHT)
    # As in the forward: the unmasked key blocks, then both edges' masked blocks in one loop.
    dq = _dq_key_loop(dq, q, do, lse, delta, queries, k_start, v_start, stride_kn, stride_vn, first_full,
                      end_full, first_full, end_full, n_q, n_k, qk_scale, softcap_log2, window_left, window_right,
                      head_dim, BLOCK_D, EVEN_D, BLOCK_N, False, False, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP)
    masked_lo = end_full
    if WINDOW_LEFT:  # only a left edge makes the head [start, first_full) non-empty
        masked_lo = start
    dq = _dq_key_loop(dq, q, do, lse, delta, queries, k_start, v_start, stride_kn, stride_vn, masked_lo,
                      hi, first_full, end_full, n_q, n_k, qk_scale, softcap_log2, window_left, window_right,
                      head_dim, BLOCK_D, EVEN_D, BLOCK_N, True, WINDOW_LEFT, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP)
    dq *= scale
    dq_start = head_start(DQ, batch, head, q_row0, stride_ob, stride_oh, stride_on)
    store_tile(tile_pointers(dq_start, q_first, local_queries, dims, stride_on), dq.to(DQ.dtype.element_ty), queries, n_q,
               dims, head_dim, EVEN_D)


# ---------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------

def v2_forward(q, k, v, problem: Problem):
    """O (contiguous, q's shape) and the natural-log lse (float32, problem.stat_shape).
    On Hopper, v2_hopper.py's Gluon kernel where it `supports` the call."""
    q, k, v = d_contiguous(q), d_contiguous(k), d_contiguous(v)
    if v2_hopper is not None and v2_hopper.supports(q, k, v, problem):
        return v2_hopper.v2_hopper_forward(q, k, v, problem)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)  # cheaper on the host than torch.empty
    lse = q.new_empty(problem.stat_shape(q), dtype=torch.float32)
    _v2_forward_kernel[problem.grid("q", "BLOCK_M", problem.q_heads)](
        q, k, v, out, lse, *problem.sequences(q),
        *row_strides(q), *row_strides(k), *row_strides(v), *row_strides(out), *stat_strides(lse),
        q_heads=problem.q_heads, **problem.kernel_args)
    return out, lse


def v2_row_stats(out, d_out, lse, problem: Problem):
    """(L in log2 units, D) for the backward kernels: float32, padded (`_v2_row_stats_kernel`).
    out and d_out share their strides."""
    stats = out.new_empty((2,) + problem.padded_stats_shape(), dtype=torch.float32)
    lse2, delta = stats.unbind()  # one allocation; the two planes share their strides
    grid = problem.grid("q", "BLOCK_M", problem.q_heads)  # blocks of BLOCK_M = STAT_BLOCK rows
    _v2_row_stats_kernel[grid](out, d_out, lse, lse2, delta, problem.sequences(out)[0], *row_strides(out),
                               *stat_strides(lse), *stat_strides(lse2), problem.q_heads, problem.kernel_rows("q"),
                               VARLEN=problem.varlen, BLOCK_M=STAT_BLOCK.value, num_warps=ROWWISE_WARPS,
                               **head_dim_args(problem.head_dim))
    return lse2, delta


def dkdv(q, k, v, d_out, lse2, delta, problem: Problem, dq_accum=None):
    """dK, dV (contiguous, k's shape) from the key-major kernel, given `v2_row_stats`; with a
    float32 dq_accum (contiguous, q's shape, zeroed) the kernel also adds dQ into it atomically."""
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    atomic = dq_accum is not None
    _v2_dkdv_kernel[problem.grid("k", "BLOCK_N", problem.kv_heads)](
        q, k, v, d_out, lse2, delta, dk, dv, dq_accum if atomic else dk, *problem.sequences(q),
        *row_strides(q), *row_strides(k), *row_strides(v), *row_strides(d_out), *row_strides(dk),
        *stat_strides(lse2), kv_heads=problem.kv_heads, GROUPED=problem.group > 1, ATOMIC_DQ=atomic,
        **problem.kernel_args)
    return dk, dv


def one_pass_backward_serves(q, k, v, problem: Problem) -> bool:
    """Whether v2's backward of this call (q, k, v with a dense last dim) is v2_hopper_backward.py's
    one pass (on Hopper, where `supports_backward`), which adds dQ into a float32 buffer."""
    return v2_hopper_backward is not None and v2_hopper_backward.supports_backward(q, k, v, problem)


def v2_backward(d_out, q, k, v, out, lse, problem: Problem):
    """dQ, dK, dV: the row statistics' pass (D), then dK/dV over key blocks and dQ over query blocks
    (where `one_pass_backward_serves`, v2_hopper_backward.py's deterministic one pass instead).

    One stream: dQ on a second stream beside dK/dV gained about 1% at large shapes and cost
    0.1-0.35 ms of a 1 ms call at small ones (docs/results.md, "Paired rounds")."""
    q, k, v, d_out = d_contiguous(q), d_contiguous(k), d_contiguous(v), d_out.contiguous()
    lse2, delta = v2_row_stats(out, d_out, lse, problem)
    if one_pass_backward_serves(q, k, v, problem):
        return v2_hopper_backward.v2_hopper_backward(q, k, v, d_out, lse2, delta, problem)
    dk, dv = dkdv(q, k, v, d_out, lse2, delta, problem)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    _v2_dq_kernel[problem.grid("q", "BLOCK_M", problem.q_heads)](
        q, k, v, d_out, lse2, delta, dq, *problem.sequences(q),
        *row_strides(q), *row_strides(k), *row_strides(v), *row_strides(d_out), *stat_strides(lse2),
        q_heads=problem.q_heads, **problem.kernel_args)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------

# forward / backward / SAVED_LIKE: the Function's two halves as plain functions, for
# flashtile.ops (torch.library), where the op, not an autograd Function, keeps the saved tensors.
SAVED_LIKE = ()  # v2 saves nothing besides out and lse


def forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left, window_right,
            softcap):
    """(out, lse, saved): saved the tensors the backward needs besides q, k, v, out and lse."""
    problem = Problem.of(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
                         window_right, softcap)
    out, lse = v2_forward(q, k, v, problem)
    return out, lse, ()


def backward(d_out, q, k, v, out, lse, saved, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
             window_left, window_right, softcap):
    """(dq, dk, dv) from `forward`'s results."""
    problem = Problem.of(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
                         window_right, softcap)
    return v2_backward(d_out, q, k, v, out, lse, problem)


class FlashAttentionV2Function(torch.autograd.Function):
    """FlashAttention-2, the registry's contract (flashtile/registry.py):
    `apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
    window_left, window_right, softcap)` -> (out, lse); lse is not differentiable.
    Inputs are assumed checked (flashtile.attention / varlen_attention check them)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                window_left, window_right, softcap):
        problem = Problem.of(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                             window_left, window_right, softcap)
        out, lse = v2_forward(q, k, v, problem)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.problem = problem
        ctx.mark_non_differentiable(lse)
        skip_unused_gradients(ctx)
        return out, lse

    @staticmethod
    def backward(ctx, d_out, _d_lse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = v2_backward(output_gradient(d_out, out), q, k, v, out, lse, ctx.problem)
        return (dq, dk, dv) + (None,) * 8


settle_cache_keys(globals())
