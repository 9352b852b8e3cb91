"""v2's forward for Hopper (sm_90) in Gluon: the same algorithm as v2.py's forward
(FlashAttention-2, Algorithm 1, scores in log2 units), written with the machine's own moves,
which `tl` leaves to the compiler:
- tiles come in by TMA (tensor-memory-accelerator copies, one thread issues a whole tile) into
  NVMMA-swizzled shared memory; K and V stream through a ring of NUM_STAGES slots, each with an
  mbarrier that the copy completes;
- both products are warpgroup MMAs (`wgmma`), P straight from registers, converted to the
  A-operand layout, never stored;
- 8 warps are two warpgroups, each owning half of the program's rows.
Tiles are (1, 1, rows, D) boxes of the (B, H, N, D) tensors: rows past N read as zeros and
are not written back, so any N works without a mask on the loads or stores.
On the H100 this forward runs 8-21% faster than v2.py's at N >= 4096 (docs/results.md,
"v2's forward in Gluon on Hopper"). It serves what TMA can address and what is not too small
to be worth its launch (`supports`); everything else runs v2.py. v2's backward stays v2.py's:
a Gluon two-pass backward written the same way was slower (same section).

v2_atomic's one-pass backward (Algorithm 2 as written, dQ added with float32 atomics) is here
too, in the same style (`v2_hopper_atomic_backward`): it computes S and dP once, 5 products
where v2's two passes compute 7.

Contracts: as v2.v2_forward (O contiguous, lse float32 natural log, -inf for a row that sees no
key, whose O is 0) and as v2.dkdv with a dq_accum.
"""
import functools
import os

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ._common import LN_2, Problem, device_capability, is_visible, key_range, query_range, tanh

NUM_WARPS = 8
NUM_STAGES = 2
# (query rows a program owns, key rows it loops over) by head dim: the fastest of (128 or 64
# rows, 64 or 128 keys) on the H100 (results/h100/gluon_forward/sweep_configs.jsonl).
FORWARD_BLOCKS = {64: (128, 128), 128: (128, 64),
                  256: (128, 64)}  # D 256: 204 registers, 197 KB shared (not yet timed)
GL_DTYPES = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}
# Work (query rows x the keys one query sees x D, a quarter of the forward's FLOPs without a
# causal mask) below which v2.py's kernel serves the call: there the call is bound by host time,
# and launching this kernel costs about 50 us more of it (0.148 against 0.097 ms a forward at
# B 1, H 2, N 128 on the H100, results/h100/gluon_forward/ab_host.jsonl). 2^34 is a 256-key
# window at N 16384, H 32, D 128: below it, the Gluon forward's 10-25% saves less than 50 us.
MIN_WORK = 2 ** 34


def supports(q, k, v, problem: Problem) -> bool:
    """True when the Gluon forward can run the call and is worth its launch: sm_90, dense, fp16
    or bf16, D 64, 128 or 256, at least MIN_WORK of work, and tensors TMA can address (last dim
    contiguous, 16-byte aligned base and strides). FLASHTILE_GLUON=0 turns it off (v2.py's
    kernels everywhere), as FLASHTILE_PORTABLE=1 does."""
    if os.environ.get("FLASHTILE_GLUON", "1") == "0":
        return False
    if problem.batch * problem.q_heads * problem.n_q * problem.keys_seen() * problem.head_dim < MIN_WORK:
        return False
    if problem.varlen or problem.head_dim not in FORWARD_BLOCKS or q.dtype not in GL_DTYPES:
        return False
    if not q.is_cuda or device_capability(q.device) != 90:
        return False
    return all(tma_addressable(t) for t in (q, k, v))


def tma_addressable(t) -> bool:
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(s * t.element_size() % 16 == 0
                                                                for s in t.stride()[:-1])


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------

@gluon.jit
def _load_pair(a_desc, b_desc, a_boxes, b_boxes, bars, batch, head, row, step, n_steps, NUM_STAGES: gl.constexpr):
    """Issue the TMA copies of the (1, 1, rows, D) boxes at (batch, head, row) of two tensors
    (K and V) into slot step % NUM_STAGES; nothing when step >= n_steps."""
    slot = step % NUM_STAGES
    pred = step < n_steps
    mbarrier.expect(bars.index(slot), a_desc.block_type.nbytes + b_desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(a_desc, [batch, head, row, 0], bars.index(slot), a_boxes.index(slot), pred=pred)
    tma.async_copy_global_to_shared(b_desc, [batch, head, row, 0], bars.index(slot), b_boxes.index(slot), pred=pred)


@gluon.jit
def _ring(desc, NUM_STAGES: gl.constexpr):
    """NUM_STAGES shared-memory boxes shaped like desc's."""
    return gl.allocate_shared_memory(desc.dtype, [NUM_STAGES] + desc.block_type.shape, desc.layout)


@gluon.jit
def _barriers(count: gl.constexpr):
    bars = gl.allocate_shared_memory(gl.int64, [count, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(count):
        mbarrier.init(bars.index(i), count=1)
    return bars


@gluon.jit
def _invalidate(bars, count: gl.constexpr):
    for i in gl.static_range(count):
        mbarrier.invalidate(bars.index(i))


@gluon.jit
def _tile(boxes, slot, rows: gl.constexpr, HEAD_D: gl.constexpr):
    """Slot `slot` of a ring of (1, 1, rows, D) boxes, as the (rows, D) tile the products take."""
    return boxes.index(slot).reshape([rows, HEAD_D])


@gluon.jit
def _query_block(q_heads, group, n_q, n_k, window_left, window_right, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                 WINDOW_LEFT: gl.constexpr, WINDOW_RIGHT: gl.constexpr):
    """A program's (batch, head, K/V head, first query, first key block's row,
    key blocks to visit, all_lo, all_hi). Programs run over (batch, head, query block), blocks
    fastest; with a right edge (causal) the longest blocks first, as v2.py's `program_rows`."""
    num_blocks = gl.cdiv(n_q, BLOCK_M)
    bh = gl.program_id(0) // num_blocks
    block = gl.program_id(0) % num_blocks
    if WINDOW_RIGHT:
        block = num_blocks - 1 - block
    head = bh % q_heads
    q_first = block * BLOCK_M
    lo, all_lo, all_hi, hi = key_range(q_first, n_q, n_k, window_left, window_right, BLOCK_M, WINDOW_LEFT, WINDOW_RIGHT)
    kv_start = lo // BLOCK_N * BLOCK_N
    n_steps = gl.maximum(gl.cdiv(hi - kv_start, BLOCK_N), 0)
    return bh // q_heads, head, head // group, q_first, kv_start, n_steps, all_lo, all_hi


# ---------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------

@gluon.jit
def _v2_hopper_forward_kernel(q_desc, k_desc, v_desc, o_desc, LSE, stride_lb, stride_lh,
                              q_heads, group, n_q, n_k, qk_scale, softcap_log2, window_left, window_right,
                              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr,
                              NUM_STAGES: gl.constexpr, WINDOW_LEFT: gl.constexpr, WINDOW_RIGHT: gl.constexpr,
                              SOFTCAP: gl.constexpr, num_warps: gl.constexpr):
    batch, head, kv_head, q_first, kv_start, n_steps, all_lo, all_hi = _query_block(
        q_heads, group, n_q, n_k, window_left, window_right, BLOCK_M, BLOCK_N, WINDOW_LEFT, WINDOW_RIGHT)

    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, HEAD_D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)
    s_cols: gl.constexpr = gl.SliceLayout(0, s_layout)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    dtype: gl.constexpr = q_desc.dtype

    q_box = gl.allocate_shared_memory(dtype, q_desc.block_type.shape, q_desc.layout)
    k_boxes = _ring(k_desc, NUM_STAGES)
    v_boxes = _ring(v_desc, NUM_STAGES)
    q_bar = _barriers(1)
    kv_bars = _barriers(NUM_STAGES)
    q_tile = q_box.reshape([BLOCK_M, HEAD_D])

    # Line 4: load Q_i; and the first NUM_STAGES - 1 blocks of K and V.
    mbarrier.expect(q_bar.index(0), q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [batch, head, q_first, 0], q_bar.index(0), q_box)
    for step in gl.static_range(NUM_STAGES - 1):
        _load_pair(k_desc, v_desc, k_boxes, v_boxes, kv_bars, batch, kv_head, kv_start + step * BLOCK_N, step,
                   n_steps, NUM_STAGES)
    # Line 5: O~ = 0, l = 0, m = -inf (log2 units).
    row_max = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=s_rows)
    row_sum = gl.zeros([BLOCK_M], gl.float32, layout=s_rows)
    acc = gl.zeros([BLOCK_M, HEAD_D], gl.float32, layout=o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    queries = gl.expand_dims(q_first + gl.arange(0, BLOCK_M, layout=s_rows), 1)
    mbarrier.wait(q_bar.index(0), phase=0)

    for step in range(n_steps):
        slot = step % NUM_STAGES
        kv_first = kv_start + step * BLOCK_N
        # Refill the slot that the previous block used: both warpgroups have waited for their
        # products of it (the CTA barrier) before one thread issues the copy.
        gl.thread_barrier()
        _load_pair(k_desc, v_desc, k_boxes, v_boxes, kv_bars, batch, kv_head, kv_first + (NUM_STAGES - 1) * BLOCK_N,
                   step + NUM_STAGES - 1, n_steps, NUM_STAGES)
        mbarrier.wait(kv_bars.index(slot), phase=(step // NUM_STAGES) & 1)
        k_tile = _tile(k_boxes, slot, BLOCK_N, HEAD_D)
        # Line 8: S = Q K^T (K^T a permuted view of the K tile), in log2 units.
        s = warpgroup_mma(q_tile, k_tile.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
        # In log2 units; with a softcap c, c tanh(scale q.k / c) log2(e) (v2.py's scores_in_log2).
        scores = s * qk_scale
        if SOFTCAP:
            scores = tanh(scores) * softcap_log2
        # Mask the blocks that cross an edge of what every query sees, or the end of K.
        if (kv_first < all_lo) | (kv_first + BLOCK_N > all_hi):
            keys = gl.expand_dims(kv_first + gl.arange(0, BLOCK_N, layout=s_cols), 0)
            visible = is_visible(queries, keys, n_q, n_k, window_left, window_right, WINDOW_LEFT, WINDOW_RIGHT)
            scores = gl.where(visible, scores, float("-inf"))
        # Line 9: m_new = max(m, rowmax(S)), P~ = exp2(S - m_new), l = exp2(m - m_new) l + rowsum(P~).
        # A row that has seen no key keeps m = -inf and shifts by 0: P~ and the correction are 0.
        new_max = gl.maximum(row_max, gl.max(scores, 1))
        shift = gl.where(new_max == float("-inf"), 0.0, new_max)
        p = gl.exp2(scores - gl.expand_dims(shift, 1))
        correction = gl.exp2(row_max - shift)
        row_sum = row_sum * correction + gl.sum(p, 1)
        row_max = new_max
        # Line 10: O~ = diag(correction) O~ + P~ V, P~ from registers.
        acc = acc * gl.expand_dims(gl.convert_layout(correction, o_rows), 1)
        p_operand = gl.convert_layout(p.to(dtype), p_layout)
        acc = warpgroup_mma(p_operand, _tile(v_boxes, slot, BLOCK_N, HEAD_D), acc, is_async=True)
        acc, p_operand = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_operand))

    _invalidate(q_bar, 1)
    _invalidate(kv_bars, NUM_STAGES)
    # Lines 12-13: O = diag(l)^-1 O~, L = m + log(l); a row that saw no key: O = 0, L = -inf.
    sees_a_key = row_sum > 0
    out = acc / gl.expand_dims(gl.convert_layout(gl.where(sees_a_key, row_sum, 1.0), o_rows), 1)
    lse = gl.where(sees_a_key, (row_max + gl.log2(row_sum)) * LN_2, float("-inf"))
    rows = q_first + gl.arange(0, BLOCK_M, layout=s_rows)
    gl.store(LSE + batch * stride_lb + head * stride_lh + rows, lse, mask=rows < n_q)
    # Q's tile is read no more: O goes out through the same shared memory (same box and layout).
    q_tile.store(out.to(dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [batch, head, q_first, 0], q_box)
    tma.store_wait(pendings=0)


# ---------------------------------------------------------------------------------------
# Backward in one pass (v2_atomic)
# ---------------------------------------------------------------------------------------

@gluon.jit
def _v2_hopper_atomic_backward_kernel(q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, L2, DELTA, DQ_ACC,
                                      stride_sb, stride_sh, stride_qb, stride_qh, stride_qn,
                                      kv_heads, group, n_q, n_k, scale, qk_scale, softcap_log2, window_left,
                                      window_right, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr,
                                      HEAD_D: gl.constexpr, NUM_STAGES: gl.constexpr, WINDOW_LEFT: gl.constexpr,
                                      WINDOW_RIGHT: gl.constexpr, SOFTCAP: gl.constexpr, num_warps: gl.constexpr):
    """dK, dV of one key block of one K/V head and its share of dQ (Algorithm 2 of FlashAttention-2
    as written: lines 6-18, dQ_i += dS_i K_j added into a float32 buffer with atomics), key-major:
    S^T and dP^T are BLOCK_N x BLOCK_M. One pass computes S and dP once, 5 products where v2's two
    passes compute 7; the atomics make the sum's order, and so dQ's last bits, vary from run to run.
    The group's query heads (GQA) and their query blocks are one flat loop."""
    num_blocks = gl.cdiv(n_k, BLOCK_N)
    bh = gl.program_id(0) // num_blocks
    batch = bh // kv_heads
    kv_head = bh % kv_heads
    k_first = (gl.program_id(0) % num_blocks) * BLOCK_N
    lo, all_lo, all_hi, hi = query_range(k_first, n_q, n_k, window_left, window_right, BLOCK_N,
                                         WINDOW_LEFT, WINDOW_RIGHT)
    q_start = lo // BLOCK_M * BLOCK_M
    blocks = gl.maximum(gl.cdiv(hi - q_start, BLOCK_M), 0)
    n_steps = group * blocks
    head0 = kv_head * group

    st_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                        instr_shape=[16, BLOCK_M, 16])
    kv_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                        instr_shape=[16, HEAD_D, 16])
    # dQ's share is BLOCK_M x D, DQ_SLICE columns at a time: the two warpgroups split each slice.
    DQ_SLICE: gl.constexpr = 64
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, num_warps // 4],
                                                        instr_shape=[16, DQ_SLICE // (num_warps // 4), 16])
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=kv_layout, k_width=2)
    st_rows: gl.constexpr = gl.SliceLayout(1, st_layout)
    st_cols: gl.constexpr = gl.SliceLayout(0, st_layout)
    dtype: gl.constexpr = q_desc.dtype

    # Lines 6-7: load K_j, V_j (kept); dK_j = dV_j = 0. Q_i and dO_i stream through the ring.
    k_box = gl.allocate_shared_memory(dtype, k_desc.block_type.shape, k_desc.layout)
    v_box = gl.allocate_shared_memory(dtype, v_desc.block_type.shape, v_desc.layout)
    q_boxes = _ring(q_desc, NUM_STAGES)
    do_boxes = _ring(do_desc, NUM_STAGES)
    # dS^T goes through shared memory: dQ's product contracts over all BLOCK_N keys, and each
    # warpgroup holds half of them.
    ds_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_M],
                                        gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], dtype))
    kv_bar = _barriers(1)
    bars = _barriers(NUM_STAGES)
    mbarrier.expect(kv_bar.index(0), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [batch, kv_head, k_first, 0], kv_bar.index(0), k_box)
    tma.async_copy_global_to_shared(v_desc, [batch, kv_head, k_first, 0], kv_bar.index(0), v_box)
    for step in gl.static_range(NUM_STAGES - 1):
        _load_pair(q_desc, do_desc, q_boxes, do_boxes, bars, batch, head0 + step // gl.maximum(blocks, 1),
                   q_start + step % gl.maximum(blocks, 1) * BLOCK_M, step, n_steps, NUM_STAGES)
    k_tile = k_box.reshape([BLOCK_N, HEAD_D])
    v_tile = v_box.reshape([BLOCK_N, HEAD_D])
    dk = gl.zeros([BLOCK_N, HEAD_D], gl.float32, layout=kv_layout)
    dv = gl.zeros([BLOCK_N, HEAD_D], gl.float32, layout=kv_layout)
    keys = gl.expand_dims(k_first + gl.arange(0, BLOCK_N, layout=st_rows), 1)
    dq_rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, dq_layout))
    dq_cols = gl.expand_dims(gl.arange(0, DQ_SLICE, layout=gl.SliceLayout(0, dq_layout)), 0)
    mbarrier.wait(kv_bar.index(0), phase=0)

    for step in range(n_steps):
        slot = step % NUM_STAGES
        member = step // blocks
        q_first = q_start + (step - member * blocks) * BLOCK_M
        ahead = step + NUM_STAGES - 1
        # Both warpgroups are done with the ring slot and dS^T of the previous step.
        gl.thread_barrier()
        _load_pair(q_desc, do_desc, q_boxes, do_boxes, bars, batch, head0 + ahead // blocks,
                   q_start + ahead % blocks * BLOCK_M, ahead, n_steps, NUM_STAGES)
        # Row statistics of these queries: L (log2 units) and D, padded (v2_row_stats): every
        # block read lies inside them, and rows past Nq have L = +inf, so P = 0 there.
        queries = q_first + gl.arange(0, BLOCK_M, layout=st_cols)
        stats = (batch * stride_sb + (head0 + member) * stride_sh) + queries
        lse = gl.load(L2 + stats)
        delta = gl.load(DELTA + stats)
        mbarrier.wait(bars.index(slot), phase=(step // NUM_STAGES) & 1)
        q_tile = _tile(q_boxes, slot, BLOCK_M, HEAD_D)
        do_tile = _tile(do_boxes, slot, BLOCK_M, HEAD_D)
        # Line 10: S^T = K Q^T, in log2 units (with a softcap c: c tanh(scale q.k / c) log2(e)).
        st = warpgroup_mma(k_tile, q_tile.permute((1, 0)), gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=st_layout),
                           use_acc=False, is_async=True)
        st = warpgroup_mma_wait(num_outstanding=0, deps=(st, ))
        scores_t = st * qk_scale
        capped_t = scores_t
        if SOFTCAP:
            capped_t = tanh(scores_t)
            scores_t = capped_t * softcap_log2
        if (q_first < all_lo) | (q_first + BLOCK_M > all_hi):  # an edge of the window
            visible = is_visible(gl.expand_dims(queries, 0), keys, n_q, n_k, window_left, window_right,
                                 WINDOW_LEFT, WINDOW_RIGHT)
            scores_t = gl.where(visible, scores_t, float("-inf"))
        # Line 11: P = exp2(S - L); line 12: dV += P^T dO.
        p_t = gl.exp2(scores_t - gl.expand_dims(lse, 0))
        p_operand = gl.convert_layout(p_t.to(dtype), op_layout)
        dv = warpgroup_mma(p_operand, do_tile, dv, is_async=True)
        if SOFTCAP:  # the softcap's derivative 1 - tanh^2, folded into P while dV's product runs
            p_t = p_t * (1.0 - capped_t * capped_t)
        # Line 13: dP^T = V dO^T; line 14: dS = P * (dP - D).
        dpt = warpgroup_mma(v_tile, do_tile.permute((1, 0)), gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=st_layout),
                            use_acc=False, is_async=True)
        dv, dpt, p_operand = warpgroup_mma_wait(num_outstanding=0, deps=(dv, dpt, p_operand))
        ds_t = (p_t * (dpt - gl.expand_dims(delta, 0))).to(dtype)
        # Line 16: dK += dS^T Q (times scale, once at the end), dS^T from registers.
        ds_operand = gl.convert_layout(ds_t, op_layout)
        dk = warpgroup_mma(ds_operand, q_tile, dk, is_async=True)
        ds_smem.store(ds_t)
        dk, ds_operand = warpgroup_mma_wait(num_outstanding=0, deps=(dk, ds_operand))
        # Line 15: dQ_i += dS_i K_j (times scale), dS_i the transposed view of dS^T in shared memory;
        # in column slices of DQ_SLICE, which keeps the share and its addresses in few registers.
        fence_async_shared()
        gl.thread_barrier()
        rows = q_first + dq_rows
        dq_row_ptrs = DQ_ACC + batch * stride_qb + (head0 + member) * stride_qh + gl.expand_dims(rows, 1) * stride_qn
        for col in gl.static_range(0, HEAD_D, DQ_SLICE):
            dq_share = warpgroup_mma(ds_smem.permute((1, 0)), k_tile.slice(col, DQ_SLICE, dim=1),
                                     gl.zeros([BLOCK_M, DQ_SLICE], gl.float32, layout=dq_layout), use_acc=False,
                                     is_async=True)
            dq_share = warpgroup_mma_wait(num_outstanding=0, deps=(dq_share, ))
            # Relaxed atomics: only the sum matters once the kernel has finished. Rows past Nq
            # are not added (their P is 0, but the buffer ends at Nq).
            gl.atomic_add(dq_row_ptrs + (col + dq_cols), dq_share * scale, mask=gl.expand_dims(rows < n_q, 1),
                          sem="relaxed")

    _invalidate(kv_bar, 1)
    _invalidate(bars, NUM_STAGES)
    # Line 18: write dK_j (dS was taken w.r.t. the scaled scores: dK = scale dS^T Q) and dV_j,
    # through the K and V tiles' shared memory, read no more.
    k_tile.store((dk * scale).to(dtype))
    v_tile.store(dv.to(dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(dk_desc, [batch, kv_head, k_first, 0], k_box)
    tma.async_copy_shared_to_global(dv_desc, [batch, kv_head, k_first, 0], v_box)
    tma.store_wait(pendings=0)


# ---------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _box_layout(rows, head_dim, dtype):
    """The shared-memory layout of a (1, 1, rows, D) box: cached, since working it out costs
    about 9 us of host time, a descriptor's worth of launch time four times over."""
    return gl.NVMMASharedLayout.get_default_for([1, 1, rows, head_dim], GL_DTYPES[dtype])


def _descriptor(t, rows):
    """A TMA descriptor over a (B, H, N, D) tensor, boxes of (1, 1, rows, D)."""
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, t.shape[-1]],
                            _box_layout(rows, t.shape[-1], t.dtype))


def v2_hopper_forward(q, k, v, problem: Problem):
    """O and lse as v2.v2_forward, for a call that `supports` accepts."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(problem.stat_shape(q), device=q.device, dtype=torch.float32)
    block_m, block_n = FORWARD_BLOCKS[problem.head_dim]
    grid = (problem.batch * problem.q_heads * ((problem.n_q + block_m - 1) // block_m),)
    args = problem.kernel_args
    _v2_hopper_forward_kernel[grid](
        _descriptor(q, block_m), _descriptor(k, block_n), _descriptor(v, block_n), _descriptor(out, block_m),
        lse, lse.stride(0), lse.stride(1), problem.q_heads, problem.group, problem.n_q, problem.n_k,
        args["qk_scale"], args["softcap_log2"], args["window_left"], args["window_right"],
        block_m, block_n, problem.head_dim, NUM_STAGES, args["WINDOW_LEFT"], args["WINDOW_RIGHT"], args["SOFTCAP"],
        num_warps=NUM_WARPS)
    return out, lse


ATOMIC_BACKWARD_BLOCKS = {64: (128, 64), 128: (128, 64)}  # (keys a program owns, queries it loops over)


def supports_atomic_backward(q, k, v, problem: Problem) -> bool:
    """Whether v2_hopper_atomic_backward serves v2_atomic's backward of this call: as `supports`,
    at a head dim of ATOMIC_BACKWARD_BLOCKS."""
    return problem.head_dim in ATOMIC_BACKWARD_BLOCKS and supports(q, k, v, problem)


def v2_hopper_atomic_backward(q, k, v, d_out, lse2, delta, problem: Problem, dq_accum):
    """dK, dV (contiguous, k's shape) as v2.dkdv with a dq_accum: dQ's shares, times the scale,
    added into the float32 dq_accum (contiguous, q's shape, zeroed). For a call that `supports`
    accepts at a head dim of ATOMIC_BACKWARD_BLOCKS, d_out contiguous."""
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    keys_owned, queries_looped = ATOMIC_BACKWARD_BLOCKS[problem.head_dim]
    grid = (problem.batch * problem.kv_heads * ((problem.n_k + keys_owned - 1) // keys_owned),)
    args = problem.kernel_args
    _v2_hopper_atomic_backward_kernel[grid](
        _descriptor(q, queries_looped), _descriptor(k, keys_owned), _descriptor(v, keys_owned),
        _descriptor(d_out, queries_looped), _descriptor(dk, keys_owned), _descriptor(dv, keys_owned),
        lse2, delta, dq_accum, lse2.stride(0), lse2.stride(1), *dq_accum.stride()[:3],
        problem.kv_heads, problem.group, problem.n_q, problem.n_k, problem.scale,
        args["qk_scale"], args["softcap_log2"], args["window_left"], args["window_right"],
        keys_owned, queries_looped, problem.head_dim, NUM_STAGES, args["WINDOW_LEFT"], args["WINDOW_RIGHT"],
        args["SOFTCAP"], num_warps=NUM_WARPS)
    return dk, dv
