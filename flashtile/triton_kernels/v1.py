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
- Block skipping as in v2: key blocks outside the causal mask or the window are not
  visited, since they would only add zeros.

Parallelism: Algorithm 1 is written with the key loop outside and the query loop inside,
re-reading and re-writing O, m and l in HBM for every key block; its CUDA implementation
parallelises over batch and heads only. Here the forward runs one program per block of
queries with the key loop inside (the loop order FlashAttention-2 adopted), so O, m and l
stay in registers, and the backward runs one program per key block over all query blocks,
adding into dQ with float32 atomic adds, as FlashAttention-1's released backward does.
What is compared against v2 is the arithmetic, not the grid.

Features (see _common.py): grouped-query attention, (left, right) windows, softcap, varlen.
"""
import torch
import triton
import triton.language as tl

from ._common import (Problem, autotuned, d_contiguous, head_start, is_visible, key_blocks, load_tile,
                      output_gradient, program_rows, query_blocks, row_strides, sequence, settle_cache_keys,
                      skip_unused_gradients, softcap_chain, stat_strides, store_tile, tanh, tile_pointers)


# ---------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------

@triton.jit
def natural_scores(qk, scale, softcap, SOFTCAP: tl.constexpr):
    """S = scale q.k, or softcap * tanh(scale q.k / softcap), in natural units (v1 uses exp);
    also returns the tanh (q.k without a softcap) for the softcap's derivative."""
    if SOFTCAP:
        capped = tanh(qk * (scale / softcap))
        return capped * softcap, capped
    return qk * scale, qk


@triton.jit
def _forward_key_loop(out, row_max, row_sum, q, queries, k_start, v_start, stride_kn, stride_vn,
                      kv_lo, kv_hi, n_q, n_k, scale, softcap, window_left, window_right, head_dim,
                      BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                      WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr):
    """Algorithm 1, lines 8-13, for keys [kv_lo, kv_hi): out stays normalised throughout."""
    local_keys = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    k_ptrs = tile_pointers(k_start, kv_lo, local_keys, dims, stride_kn)
    v_ptrs = tile_pointers(v_start, kv_lo, local_keys, dims, stride_vn)
    for kv_first in range(kv_lo, kv_hi, BLOCK_N):
        keys = kv_first + local_keys
        k = load_tile(k_ptrs, keys, n_k, dims, head_dim, EVEN_D, MASKED)
        scores, _ = natural_scores(tl.dot(q, tl.trans(k)), scale, softcap, SOFTCAP)  # line 9: S_ij = tau Q_i K_j^T
        if MASKED:
            visible = is_visible(queries[:, None], keys[None, :], n_q, n_k, window_left, window_right,
                                 WINDOW_LEFT, WINDOW_RIGHT)
            scores = tl.where(visible, scores, float("-inf"))
        # Line 10: m~ = rowmax(S), P~ = exp(S - m~), l~ = rowsum(P~).
        block_max = tl.max(scores, 1)
        new_max = tl.maximum(row_max, block_max)
        block_shift = block_max
        shift = new_max
        if MASKED:
            # Rows with no visible key in this block (or yet) keep m = -inf; shifting by 0
            # instead keeps exp(-inf - (-inf)) from being NaN, and their weights are 0.
            block_shift = tl.where(block_max == float("-inf"), 0.0, block_max)
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        p = tl.exp(scores - block_shift[:, None])
        block_sum = tl.sum(p, 1)
        # Line 11: m_new = max(m, m~), l_new = e^{m - m_new} l + e^{m~ - m_new} l~.
        old_weight = tl.exp(row_max - shift) * row_sum
        block_weight = tl.exp(block_max - shift)
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
def _v1_forward_kernel(Q, K, V, O, ROW_MAX, ROW_SUM, CU_SEQLENS_Q, CU_SEQLENS_K,
                       stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                       stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on, stride_lb, stride_lh,
                       q_heads, group, n_q, n_k, head_dim, scale, softcap, window_left, window_right,
                       q_bucket, k_bucket,
                       BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, VARLEN: tl.constexpr,
                       WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    batch, head, q_first, q_row0, n_q = program_rows(CU_SEQLENS_Q, q_heads, n_q, BLOCK_M, WINDOW_RIGHT, VARLEN)
    k_row0, n_k = sequence(CU_SEQLENS_K, batch, n_k, VARLEN)
    if q_first >= n_q:
        return
    kv_head = head // group
    local_queries = tl.arange(0, BLOCK_M)
    queries = q_first + local_queries
    dims = tl.arange(0, BLOCK_D)
    q_start = head_start(Q, batch, head, q_row0, stride_qb, stride_qh, stride_qn)
    k_start = head_start(K, batch, kv_head, k_row0, stride_kb, stride_kh, stride_kn)
    v_start = head_start(V, batch, kv_head, k_row0, stride_vb, stride_vh, stride_vn)
    q = load_tile(tile_pointers(q_start, q_first, local_queries, dims, stride_qn), queries, n_q, dims, head_dim,
                  EVEN_D, True)
    # Line 2: O = 0, l = 0, m = -inf.
    out = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    start, first_full, end_full, hi = key_blocks(q_first, n_q, n_k, window_left, window_right, BLOCK_M, BLOCK_N,
                                                 WINDOW_LEFT, WINDOW_RIGHT)
    if WINDOW_LEFT:
        out, row_max, row_sum = _forward_key_loop(
            out, row_max, row_sum, q, queries, k_start, v_start, stride_kn, stride_vn, start, first_full,
            n_q, n_k, scale, softcap, window_left, window_right, head_dim,
            BLOCK_D, EVEN_D, BLOCK_N, True, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP)
    out, row_max, row_sum = _forward_key_loop(
        out, row_max, row_sum, q, queries, k_start, v_start, stride_kn, stride_vn, first_full, end_full,
        n_q, n_k, scale, softcap, window_left, window_right, head_dim,
        BLOCK_D, EVEN_D, BLOCK_N, False, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP)
    out, row_max, row_sum = _forward_key_loop(
        out, row_max, row_sum, q, queries, k_start, v_start, stride_kn, stride_vn, end_full, hi,
        n_q, n_k, scale, softcap, window_left, window_right, head_dim,
        BLOCK_D, EVEN_D, BLOCK_N, True, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP)

    o_start = head_start(O, batch, head, q_row0, stride_ob, stride_oh, stride_on)
    store_tile(tile_pointers(o_start, q_first, local_queries, dims, stride_on), out.to(O.dtype.element_ty),
               queries, n_q, dims, head_dim, EVEN_D)
    # A row that saw no key keeps m = -inf and l = 0 (and O = 0).
    in_sequence = queries < n_q
    tl.store(head_start(ROW_MAX, batch, head, q_row0, stride_lb, stride_lh, 1) + queries, row_max, mask=in_sequence)
    tl.store(head_start(ROW_SUM, batch, head, q_row0, stride_lb, stride_lh, 1) + queries, row_sum, mask=in_sequence)


# ---------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------

@triton.jit
def _backward_query_loop(dk, dv, k, v, keys, q_start, o_start, do_start, dq_start, max_start, sum_start,
                         stride_qn, stride_on, q_lo, q_hi, n_q, n_k, scale, softcap, window_left, window_right,
                         head_dim, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr,
                         MASKED: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
                         SOFTCAP: tl.constexpr):
    """Algorithm 4, lines 8-24, for one key block over queries [q_lo, q_hi), key-major.
    O, dO and the float32 dQ buffer share stride_on (all contiguous like q)."""
    local_queries = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q_ptrs = tile_pointers(q_start, q_lo, local_queries, dims, stride_qn)
    o_ptrs = tile_pointers(o_start, q_lo, local_queries, dims, stride_on)
    do_ptrs = tile_pointers(do_start, q_lo, local_queries, dims, stride_on)
    dq_ptrs = tile_pointers(dq_start, q_lo, local_queries, dims, stride_on)
    for q_first in range(q_lo, q_hi, BLOCK_M):
        queries = q_first + local_queries
        in_sequence = queries < n_q
        q = load_tile(q_ptrs, queries, n_q, dims, head_dim, EVEN_D, True)
        o = load_tile(o_ptrs, queries, n_q, dims, head_dim, EVEN_D, True)
        do = load_tile(do_ptrs, queries, n_q, dims, head_dim, EVEN_D, True)
        row_max = tl.load(max_start + queries, mask=in_sequence, other=0.0)
        row_sum = tl.load(sum_start + queries, mask=in_sequence, other=0.0)
        # Rows past the end and rows that saw no key (l = 0, m = -inf) must get P = 0:
        # m = +inf does it, and 1/l is taken as 1 so that 0 * inf never appears.
        row_max = tl.where(row_sum > 0, row_max, float("inf"))
        inv_row_sum = 1.0 / tl.where(row_sum > 0, row_sum, 1.0)
        scores_t, capped_t = natural_scores(tl.dot(k, tl.trans(q)), scale, softcap, SOFTCAP)  # line 11
        if MASKED:
            visible = is_visible(queries[None, :], keys[:, None], n_q, n_k, window_left, window_right,
                                 WINDOW_LEFT, WINDOW_RIGHT)
            scores_t = tl.where(visible, scores_t, float("-inf"))
        # Line 13: P_ij = diag(l_i)^-1 exp(S_ij - m_i), from the saved m and l.
        p_t = tl.exp(scores_t - row_max[None, :]) * inv_row_sum[None, :]
        dv += tl.dot(p_t.to(do.dtype), do)  # line 16: dV_j += P_ij^T dO_i
        dp_t = tl.dot(v, tl.trans(do))  # line 17: dP_ij = dO_i V_j^T
        d_row = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # line 19: D_i = rowsum(dO_i * O_i)
        ds_t = softcap_chain(p_t * (dp_t - d_row[None, :]), capped_t, SOFTCAP)  # line 20: dS = P * (dP - D)
        # Line 21: dQ_i += tau dS_ij K_j; other key blocks add to the same rows, hence atomics.
        dq_share = tl.dot(tl.trans(ds_t.to(k.dtype)), k) * scale
        tl.atomic_add(dq_ptrs, dq_share, mask=in_sequence[:, None] & (dims[None, :] < head_dim),
                      sem="relaxed")  # only the final sum matters: no fences
        dk += tl.dot(ds_t.to(q.dtype), q)  # line 22: dK_j += tau dS_ij^T Q_i (tau at the end)
        q_ptrs += BLOCK_M * stride_qn
        o_ptrs += BLOCK_M * stride_on
        do_ptrs += BLOCK_M * stride_on
        dq_ptrs += BLOCK_M * stride_on
    return dk, dv


@autotuned("atomic_backward", owned="BLOCK_N", looped="BLOCK_M", reset_to_zero=["DQ"])
@triton.jit
def _v1_backward_kernel(Q, K, V, O, DO, ROW_MAX, ROW_SUM, DK, DV, DQ, CU_SEQLENS_Q, CU_SEQLENS_K,
                        stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                        stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                        stride_gb, stride_gh, stride_gn, stride_lb, stride_lh,
                        kv_heads, group, n_q, n_k, head_dim, scale, softcap, window_left, window_right,
                        q_bucket, k_bucket,
                        BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, VARLEN: tl.constexpr,
                        WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
                        GROUPED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """stride_o*: O, dO and dQ (contiguous like q); stride_g*: dK and dV (contiguous like k)."""
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
    k = load_tile(tile_pointers(k_start, k_first, local_keys, dims, stride_kn), keys, n_k, dims, head_dim,
                  EVEN_D, True)
    v = load_tile(tile_pointers(v_start, k_first, local_keys, dims, stride_vn), keys, n_k, dims, head_dim,
                  EVEN_D, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    start, first_full, end_full, hi = query_blocks(k_first, n_q, n_k, window_left, window_right, BLOCK_N, BLOCK_M,
                                                   WINDOW_LEFT, WINDOW_RIGHT)
    # Without GQA the loop below has one trip, known at compile time, and folds away.
    members = group if GROUPED else 1
    for member in range(members):  # each query head that reads this K/V head, in order
        head = kv_head * group + member
        q_start = head_start(Q, batch, head, q_row0, stride_qb, stride_qh, stride_qn)
        o_start = head_start(O, batch, head, q_row0, stride_ob, stride_oh, stride_on)
        do_start = head_start(DO, batch, head, q_row0, stride_ob, stride_oh, stride_on)
        dq_start = head_start(DQ, batch, head, q_row0, stride_ob, stride_oh, stride_on)
        max_start = head_start(ROW_MAX, batch, head, q_row0, stride_lb, stride_lh, 1)
        sum_start = head_start(ROW_SUM, batch, head, q_row0, stride_lb, stride_lh, 1)
        if WINDOW_RIGHT:
            dk, dv = _backward_query_loop(
                dk, dv, k, v, keys, q_start, o_start, do_start, dq_start, max_start, sum_start, stride_qn,
                stride_on, start, first_full, n_q, n_k, scale, softcap, window_left, window_right, head_dim,
                BLOCK_D, EVEN_D, BLOCK_M, True, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP)
        dk, dv = _backward_query_loop(
            dk, dv, k, v, keys, q_start, o_start, do_start, dq_start, max_start, sum_start, stride_qn,
            stride_on, first_full, end_full, n_q, n_k, scale, softcap, window_left, window_right, head_dim,
            BLOCK_D, EVEN_D, BLOCK_M, False, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP)
        if WINDOW_LEFT:  # query blocks on the window's left edge
            dk, dv = _backward_query_loop(
                dk, dv, k, v, keys, q_start, o_start, do_start, dq_start, max_start, sum_start, stride_qn,
                stride_on, end_full, hi, n_q, n_k, scale, softcap, window_left, window_right, head_dim,
                BLOCK_D, EVEN_D, BLOCK_M, True, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP)
    dk *= scale
    # Line 24: write dK_j, dV_j.
    dk_start = head_start(DK, batch, kv_head, k_row0, stride_gb, stride_gh, stride_gn)
    dv_start = head_start(DV, batch, kv_head, k_row0, stride_gb, stride_gh, stride_gn)
    store_tile(tile_pointers(dk_start, k_first, local_keys, dims, stride_gn), dk.to(DK.dtype.element_ty), keys,
               n_k, dims, head_dim, EVEN_D)
    store_tile(tile_pointers(dv_start, k_first, local_keys, dims, stride_gn), dv.to(DV.dtype.element_ty), keys,
               n_k, dims, head_dim, EVEN_D)


# ---------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------

def v1_arguments(problem: Problem):
    """v1's scalar kernel arguments: natural-unit scale and softcap instead of v2's log2 ones."""
    args = dict(problem.kernel_args)
    del args["qk_scale"], args["softcap_log2"]
    args["softcap"] = problem.softcap if problem.softcap > 0 else 1.0
    return args


def v1_forward(q, k, v, problem: Problem):
    """O (contiguous, q's shape), and m (row max) and l (row sum), float32, natural units,
    laid out like lse (problem.stat_shape)."""
    q, k, v = d_contiguous(q), d_contiguous(k), d_contiguous(v)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    row_max = torch.empty(problem.stat_shape(q), device=q.device, dtype=torch.float32)
    row_sum = torch.empty_like(row_max)
    _v1_forward_kernel[problem.grid("q", "BLOCK_M", problem.q_heads)](
        q, k, v, out, row_max, row_sum, *problem.sequences(q),
        *row_strides(q), *row_strides(k), *row_strides(v), *row_strides(out), *stat_strides(row_max),
        q_heads=problem.q_heads, **v1_arguments(problem))
    return out, row_max, row_sum


def v1_backward(d_out, q, k, v, out, row_max, row_sum, problem: Problem):
    q, k, v, d_out = d_contiguous(q), d_contiguous(k), d_contiguous(v), d_out.contiguous()
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    dq_accum = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
    _v1_backward_kernel[problem.grid("k", "BLOCK_N", problem.kv_heads)](
        q, k, v, out, d_out, row_max, row_sum, dk, dv, dq_accum, *problem.sequences(q),
        *row_strides(q), *row_strides(k), *row_strides(v), *row_strides(d_out), *row_strides(dk),
        *stat_strides(row_max), kv_heads=problem.kv_heads, GROUPED=problem.group > 1, **v1_arguments(problem))
    return dq_accum.to(q.dtype), dk, dv


# forward / backward / SAVED_LIKE: the Function's two halves as plain functions, for
# flashtile.ops (torch.library), where the op, not an autograd Function, keeps the saved tensors.
SAVED_LIKE = ("lse", "lse")  # row_max and row_sum, float32, shaped like lse


def forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left, window_right,
            softcap):
    """(out, lse, (row_max, row_sum)): v1's backward reads m and l, not lse."""
    problem = Problem.of(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
                         window_right, softcap)
    out, row_max, row_sum = v1_forward(q, k, v, problem)
    lse = torch.where(row_sum > 0, row_max + torch.log(row_sum), float("-inf"))
    return out, lse, (row_max, row_sum)


def backward(d_out, q, k, v, out, lse, saved, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
             window_left, window_right, softcap):
    """(dq, dk, dv) from `forward`'s results."""
    problem = Problem.of(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
                         window_right, softcap)
    row_max, row_sum = saved
    return v1_backward(d_out, q, k, v, out, row_max, row_sum, problem)


class FlashAttentionV1Function(torch.autograd.Function):
    """FlashAttention-1, the registry's contract (flashtile/registry.py); lse = m + log(l) is
    returned for callers who ask for it (not differentiable); v1 itself keeps m and l."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                window_left, window_right, softcap):
        problem = Problem.of(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                             window_left, window_right, softcap)
        out, row_max, row_sum = v1_forward(q, k, v, problem)
        ctx.save_for_backward(q, k, v, out, row_max, row_sum)
        ctx.problem = problem
        lse = torch.where(row_sum > 0, row_max + torch.log(row_sum), float("-inf"))
        ctx.mark_non_differentiable(lse)
        skip_unused_gradients(ctx)
        return out, lse

    @staticmethod
    def backward(ctx, d_out, _d_lse):
        q, k, v, out, row_max, row_sum = ctx.saved_tensors
        dq, dk, dv = v1_backward(output_gradient(d_out, out), q, k, v, out, row_max, row_sum, ctx.problem)
        return (dq, dk, dv) + (None,) * 8


settle_cache_keys(globals())
