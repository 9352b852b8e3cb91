"""FlashAttention-1 in Triton: forward and backward.

Tri Dao, Daniel Y. Fu, Stefano Ermon, Atri Rudra, Christopher Re, "FlashAttention: Fast and
Memory-Efficient Exact Attention with IO-Awareness" (2022). Line numbers below are those of
its Algorithm 1 (forward) and Algorithm 4 (backward, appendix B).

What makes this v1 rather than v2 (see v2.py):
- The online softmax keeps the row max m and the row sum l as two statistics, in natural
  units (exp, not exp2), and both are saved for the backward.
- The output is kept normalised at every step: each new key block rescales the running O by
  l_old e^{m_old - m_new} / l_new and adds e^{m~ - m_new} P~ V / l_new (Algorithm 1, line 12),
  a division per block that FlashAttention-2 defers to the end.
- The backward recomputes P = diag(l)^-1 exp(S - m) from m and l (Algorithm 4, line 13) and
  computes D_i = rowsum(dO_i * O_i) inside its loop (line 19) rather than in a separate pass.
- No causal block skipping in the loop structure beyond what the mask needs: as in v2 the
  key range stops at the diagonal, since visiting fully masked blocks would only add zeros.

Parallelism: Algorithm 1 is written with the key loop outside and the query loop inside,
re-reading and re-writing O, m and l in HBM for every key block; its CUDA implementation
parallelises over batch and heads only. Here the forward runs one program per block of
queries with the key loop inside (the loop order FlashAttention-2 adopted), so O, m and l
stay in registers, and the backward runs one program per key block over all query blocks,
adding into dQ with float32 atomic adds, as FlashAttention-1's released backward does.
What is compared against v2 is the arithmetic, not the grid.
"""
import torch
import triton
import triton.language as tl

from ._common import (autotuned, block_of_program, head_dim_args, head_offset, is_visible,
                      key_range_for_query_block, load_head_tile, load_tile, query_range_for_key_block,
                      seq_bucket, store_tile, tile_pointers)


# ---------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------

@triton.jit
def _forward_key_loop(out, row_max, row_sum, q, K, V, k_head, v_head, queries,
                      kv_lo, kv_hi, n_q, n_k, scale,
                      stride_kn, stride_kd, stride_vn, stride_vd,
                      head_dim, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr,
                      IS_CAUSAL: tl.constexpr, MASKED: tl.constexpr):
    """Algorithm 1, lines 8-13, for keys [kv_lo, kv_hi): out stays normalised throughout."""
    local_keys = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    k_ptrs = tile_pointers(K, k_head, kv_lo, local_keys, dims, stride_kn, stride_kd)
    v_ptrs = tile_pointers(V, v_head, kv_lo, local_keys, dims, stride_vn, stride_vd)
    for kv_start in range(kv_lo, kv_hi, BLOCK_N):
        keys = kv_start + local_keys
        k = load_tile(k_ptrs, keys, n_k, dims, head_dim, EVEN_D, MASKED)
        scores = tl.dot(q, tl.trans(k)) * scale  # S_ij = tau Q_i K_j^T (line 9)
        if MASKED:
            scores = tl.where(is_visible(queries[:, None], keys[None, :], n_q, n_k, IS_CAUSAL),
                              scores, float("-inf"))
        # Line 10: m~ = rowmax(S), P~ = exp(S - m~), l~ = rowsum(P~).
        block_max = tl.max(scores, 1)
        if MASKED:
            # Rows with no visible key in this block: keep exp(-inf - (-inf)) from being NaN.
            block_max = tl.where(block_max == float("-inf"), 0.0, block_max)
        p = tl.exp(scores - block_max[:, None])
        block_sum = tl.sum(p, 1)
        # Line 11: m_new = max(m, m~), l_new = e^{m - m_new} l + e^{m~ - m_new} l~.
        new_max = tl.maximum(row_max, block_max)
        old_weight = tl.exp(row_max - new_max) * row_sum
        block_weight = tl.exp(block_max - new_max)
        new_sum = old_weight + block_weight * block_sum
        # Line 12: O = diag(l_new)^-1 (diag(l) e^{m - m_new} O + e^{m~ - m_new} P~ V).
        v = load_tile(v_ptrs, keys, n_k, dims, head_dim, EVEN_D, MASKED)
        pv = tl.dot(p.to(v.dtype), v)
        inv_new_sum = 1.0 / tl.where(new_sum > 0, new_sum, 1.0)  # l_new = 0: no key seen yet
        out = out * (old_weight * inv_new_sum)[:, None] + pv * (block_weight * inv_new_sum)[:, None]
        # Line 13: keep m_new, l_new.
        row_max = new_max
        row_sum = new_sum
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return out, row_max, row_sum


@autotuned("forward")
@triton.jit
def _v1_forward_kernel(Q, K, V, O, ROW_MAX, ROW_SUM,
                       stride_qb, stride_qh, stride_qn, stride_qd,
                       stride_kb, stride_kh, stride_kn, stride_kd,
                       stride_vb, stride_vh, stride_vn, stride_vd,
                       stride_ob, stride_oh, stride_on, stride_od,
                       n_heads, n_q, n_k, scale, q_bucket, k_bucket,
                       head_dim, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, IS_CAUSAL: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    bh, q_start = block_of_program(n_q, BLOCK_M, IS_CAUSAL)
    local_queries = tl.arange(0, BLOCK_M)
    queries = q_start + local_queries
    dims = tl.arange(0, BLOCK_D)
    q = load_head_tile(Q, bh, n_heads, stride_qb, stride_qh, stride_qn, stride_qd,
                       q_start, local_queries, n_q, dims, head_dim, EVEN_D)

    # Line 2: O = 0, l = 0, m = -inf.
    out = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    k_head = head_offset(bh, n_heads, stride_kb, stride_kh)
    v_head = head_offset(bh, n_heads, stride_vb, stride_vh)
    unmasked_end, kv_end = key_range_for_query_block(q_start, n_q, n_k, BLOCK_M, BLOCK_N, IS_CAUSAL)
    out, row_max, row_sum = _forward_key_loop(
        out, row_max, row_sum, q, K, V, k_head, v_head, queries, 0, unmasked_end, n_q, n_k, scale,
        stride_kn, stride_kd, stride_vn, stride_vd, head_dim, BLOCK_D, EVEN_D, BLOCK_N, IS_CAUSAL, False)
    out, row_max, row_sum = _forward_key_loop(
        out, row_max, row_sum, q, K, V, k_head, v_head, queries, unmasked_end, kv_end, n_q, n_k, scale,
        stride_kn, stride_kd, stride_vn, stride_vd, head_dim, BLOCK_D, EVEN_D, BLOCK_N, IS_CAUSAL, True)

    store_tile(tile_pointers(O, head_offset(bh, n_heads, stride_ob, stride_oh), q_start,
                             local_queries, dims, stride_on, stride_od),
               out.to(O.dtype.element_ty), queries, n_q, dims, head_dim, EVEN_D)
    # A row that saw no key keeps m = -inf and l = 0 (and O = 0).
    stats = bh.to(tl.int64) * n_q + queries
    tl.store(ROW_MAX + stats, row_max, mask=queries < n_q)
    tl.store(ROW_SUM + stats, row_sum, mask=queries < n_q)


# ---------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------

@triton.jit
def _backward_query_loop(dk, dv, k, v, keys, Q, O, DO, ROW_MAX, ROW_SUM, DQ_ACCUM,
                         bh, q_head, o_head, do_head, q_lo, q_hi, n_q, n_k, scale,
                         stride_qn, stride_qd, stride_on, stride_od, stride_don, stride_dod,
                         head_dim, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr,
                         IS_CAUSAL: tl.constexpr, MASKED: tl.constexpr):
    """Algorithm 4, lines 8-24, for one key block over queries [q_lo, q_hi), key-major."""
    local_queries = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q_ptrs = tile_pointers(Q, q_head, q_lo, local_queries, dims, stride_qn, stride_qd)
    o_ptrs = tile_pointers(O, o_head, q_lo, local_queries, dims, stride_on, stride_od)
    do_ptrs = tile_pointers(DO, do_head, q_lo, local_queries, dims, stride_don, stride_dod)
    dq_ptrs = tile_pointers(DQ_ACCUM, bh.to(tl.int64) * n_q * head_dim, q_lo, local_queries, dims,
                            head_dim, 1)
    for q_start in range(q_lo, q_hi, BLOCK_M):
        queries = q_start + local_queries
        in_sequence = queries < n_q
        q = load_tile(q_ptrs, queries, n_q, dims, head_dim, EVEN_D, True)
        o = load_tile(o_ptrs, queries, n_q, dims, head_dim, EVEN_D, True)
        do = load_tile(do_ptrs, queries, n_q, dims, head_dim, EVEN_D, True)
        row_max = tl.load(ROW_MAX + bh.to(tl.int64) * n_q + queries, mask=in_sequence, other=0.0)
        row_sum = tl.load(ROW_SUM + bh.to(tl.int64) * n_q + queries, mask=in_sequence, other=0.0)
        # Rows past the end and rows that saw no key (l = 0, m = -inf) must get P = 0:
        # m = +inf does it, and 1/l is taken as 1 so that 0 * inf never appears.
        row_max = tl.where(row_sum > 0, row_max, float("inf"))
        inv_row_sum = 1.0 / tl.where(row_sum > 0, row_sum, 1.0)
        scores_t = tl.dot(k, tl.trans(q)) * scale  # S^T = tau K_j Q_i^T (line 11)
        if MASKED:
            scores_t = tl.where(is_visible(queries[None, :], keys[:, None], n_q, n_k, IS_CAUSAL),
                                scores_t, float("-inf"))
        # Line 13: P_ij = diag(l_i)^-1 exp(S_ij - m_i), from the saved m and l.
        p_t = tl.exp(scores_t - row_max[None, :]) * inv_row_sum[None, :]
        dv += tl.dot(p_t.to(do.dtype), do)  # line 16: dV_j += P_ij^T dO_i
        dp_t = tl.dot(v, tl.trans(do))  # line 17: dP_ij = dO_i V_j^T
        d_row = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # line 19: D_i = rowsum(dO_i * O_i)
        ds_t = p_t * (dp_t - d_row[None, :])  # line 20: dS_ij = P_ij * (dP_ij - D_i)
        # Line 21: dQ_i += tau dS_ij K_j; other key blocks add to the same rows, hence atomics.
        dq_share = tl.dot(tl.trans(ds_t.to(k.dtype)), k) * scale
        tl.atomic_add(dq_ptrs, dq_share, mask=in_sequence[:, None] & (dims[None, :] < head_dim),
                      sem="relaxed")  # only the final sum matters: no fences
        dk += tl.dot(ds_t.to(q.dtype), q)  # line 22: dK_j += tau dS_ij^T Q_i (tau at the end)
        q_ptrs += BLOCK_M * stride_qn
        o_ptrs += BLOCK_M * stride_on
        do_ptrs += BLOCK_M * stride_don
        dq_ptrs += BLOCK_M * head_dim
    return dk, dv


@autotuned("backward", owned="BLOCK_N", looped="BLOCK_M", reset_to_zero=["DQ_ACCUM"])
@triton.jit
def _v1_backward_kernel(Q, K, V, O, DO, ROW_MAX, ROW_SUM, DK, DV, DQ_ACCUM,
                        stride_qb, stride_qh, stride_qn, stride_qd,
                        stride_kb, stride_kh, stride_kn, stride_kd,
                        stride_vb, stride_vh, stride_vn, stride_vd,
                        stride_ob, stride_oh, stride_on, stride_od,
                        stride_dob, stride_doh, stride_don, stride_dod,
                        stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                        stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                        n_heads, n_q, n_k, scale, q_bucket, k_bucket,
                        head_dim, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, IS_CAUSAL: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    bh, k_start = block_of_program(n_k, BLOCK_N, False)
    local_keys = tl.arange(0, BLOCK_N)
    keys = k_start + local_keys
    dims = tl.arange(0, BLOCK_D)
    # Lines 6-7: load K_j, V_j; dK_j = dV_j = 0.
    k = load_head_tile(K, bh, n_heads, stride_kb, stride_kh, stride_kn, stride_kd,
                       k_start, local_keys, n_k, dims, head_dim, EVEN_D)
    v = load_head_tile(V, bh, n_heads, stride_vb, stride_vh, stride_vn, stride_vd,
                       k_start, local_keys, n_k, dims, head_dim, EVEN_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    q_head = head_offset(bh, n_heads, stride_qb, stride_qh)
    o_head = head_offset(bh, n_heads, stride_ob, stride_oh)
    do_head = head_offset(bh, n_heads, stride_dob, stride_doh)
    q_lo, masked_end = query_range_for_key_block(k_start, n_q, n_k, BLOCK_N, BLOCK_M, IS_CAUSAL)
    dk, dv = _backward_query_loop(dk, dv, k, v, keys, Q, O, DO, ROW_MAX, ROW_SUM, DQ_ACCUM,
                                  bh, q_head, o_head, do_head, q_lo, masked_end, n_q, n_k, scale,
                                  stride_qn, stride_qd, stride_on, stride_od, stride_don, stride_dod,
                                  head_dim, BLOCK_D, EVEN_D, BLOCK_M, IS_CAUSAL, True)
    dk, dv = _backward_query_loop(dk, dv, k, v, keys, Q, O, DO, ROW_MAX, ROW_SUM, DQ_ACCUM,
                                  bh, q_head, o_head, do_head, masked_end, n_q, n_q, n_k, scale,
                                  stride_qn, stride_qd, stride_on, stride_od, stride_don, stride_dod,
                                  head_dim, BLOCK_D, EVEN_D, BLOCK_M, IS_CAUSAL, False)
    dk *= scale
    # Line 24: write dK_j, dV_j.
    store_tile(tile_pointers(DK, head_offset(bh, n_heads, stride_dkb, stride_dkh), k_start,
                             local_keys, dims, stride_dkn, stride_dkd),
               dk.to(DK.dtype.element_ty), keys, n_k, dims, head_dim, EVEN_D)
    store_tile(tile_pointers(DV, head_offset(bh, n_heads, stride_dvb, stride_dvh), k_start,
                             local_keys, dims, stride_dvn, stride_dvd),
               dv.to(DV.dtype.element_ty), keys, n_k, dims, head_dim, EVEN_D)


# ---------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------

def v1_forward(q, k, v, causal, scale):
    """O, and the statistics m (row max) and l (row sum), float32 (B, H, Nq), natural units."""
    B, H, n_q, D = q.shape
    n_k = k.shape[2]
    out = torch.empty_like(q)
    row_max = torch.empty((B, H, n_q), device=q.device, dtype=torch.float32)
    row_sum = torch.empty_like(row_max)
    grid = lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]) * B * H,)
    _v1_forward_kernel[grid](q, k, v, out, row_max, row_sum,
                             *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                             H, n_q, n_k, scale, seq_bucket(n_q), seq_bucket(n_k),
                             IS_CAUSAL=causal, **head_dim_args(D))
    return out, row_max, row_sum


def v1_backward(d_out, q, k, v, out, row_max, row_sum, causal, scale):
    B, H, n_q, D = q.shape
    n_k = k.shape[2]
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    dq_accum = torch.zeros((B, H, n_q, D), device=q.device, dtype=torch.float32)
    key_grid = lambda meta: (triton.cdiv(n_k, meta["BLOCK_N"]) * B * H,)
    _v1_backward_kernel[key_grid](
        q, k, v, out, d_out, row_max, row_sum, dk, dv, dq_accum,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *d_out.stride(), *dk.stride(), *dv.stride(),
        H, n_q, n_k, scale, seq_bucket(n_q), seq_bucket(n_k),
        IS_CAUSAL=causal, **head_dim_args(D))
    return dq_accum.to(q.dtype), dk, dv


class FlashAttentionV1Function(torch.autograd.Function):
    """FlashAttention-1: `FlashAttentionV1Function.apply(q, k, v, causal=False, scale=None)`
    returns (out, lse), lse = m + log(l) (not differentiable)."""

    @staticmethod
    def forward(ctx, q, k, v, causal=False, scale=None):
        from ..interface import check_inputs

        scale = check_inputs(q, k, v, causal, scale, "v1", False)
        out, row_max, row_sum = v1_forward(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, out, row_max, row_sum)
        ctx.causal, ctx.scale = causal, scale
        # The log-sum-exp for callers who ask for it; v1 itself keeps m and l.
        lse = torch.where(row_sum > 0, row_max + torch.log(row_sum), float("-inf"))
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, d_out, _d_lse):
        q, k, v, out, row_max, row_sum = ctx.saved_tensors
        dq, dk, dv = v1_backward(d_out, q, k, v, out, row_max, row_sum, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None
