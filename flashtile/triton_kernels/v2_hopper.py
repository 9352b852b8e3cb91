"""v2's forward for Hopper (sm_90) in Gluon: the same algorithm as v2.py's forward
(FlashAttention-2, Algorithm 1, scores in log2 units), written with the machine's own moves,
which `tl` leaves to the compiler:
- tiles come in by TMA (tensor-memory-accelerator copies, one thread issues a whole tile) into
  NVMMA-swizzled shared memory; K and V stream through rings of NUM_STAGES slots, each with an
  mbarrier that the copy completes;
- both products are warpgroup MMAs (`wgmma`), P straight from registers, converted to the
  A-operand layout, never stored.
Two schedules of it, by head dim (FORWARD_BLOCKS):
- the ping-pong kernel (D 128, 256), FlashAttention-3's (§3.1-3.2): a loader warp streams K and
  V; two compute warpgroups of 64 query rows take turns at the tensor cores, each issuing its
  S_j = Q K_j^T together with the previous block's P~ V, so that one's softmax runs while the
  other's products do;
- the lockstep kernel (D 64): 8 warps that issue their own copies and wait for each product,
  two programs an SM.
Tiles are (1, 1, rows, D) boxes of the (B, H, N, D) tensors: rows past N read as zeros and
are not written back, so any N works without a mask on the loads or stores.
It serves what TMA can address and what is not too small to be worth its launch (`supports`);
everything else runs v2.py. Speed against v2.py's kernels and cuDNN: docs/results.md, "v2's
forward in Gluon on Hopper", "D 256 in Gluon" and "The ping-pong forward".

Contract: as v2.v2_forward (O contiguous, lse float32 natural log, -inf for a row that sees no
key, whose O is 0).
"""
import functools
import os

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ._common import LN_2, Problem, device_capability, is_visible, key_range, tanh
from ._launch import cdiv

NUM_STAGES = 2
# (query rows a program owns, key rows it loops over) by head dim, and the kernel that serves it:
# - D 128 and 256: the ping-pong kernel, two compute warpgroups of 64 query rows each, one
#   program an SM (240 registers a thread); 1.03-1.13x the lockstep kernel at N >= 4096 on the
#   H200 (results/h200/ping_pong_forward/ab_ping_pong.jsonl);
# - D 64: the lockstep kernel, two programs an SM of 8 warps each: there the products are short
#   beside the softmax, which ping-pong cannot hide behind them (0.73-0.93x the lockstep kernel
#   with two warpgroups, 0.50-1.01x with three).
PING_PONG_BLOCKS = {128: (128, 128), 256: (128, 64)}
LOCKSTEP_BLOCKS = {64: (128, 128)}
FORWARD_BLOCKS = {**LOCKSTEP_BLOCKS, **PING_PONG_BLOCKS}
LOCKSTEP_WARPS = 8
# Registers a thread (setmaxnreg) of a ping-pong compute warpgroup and of its loader warp: with
# the default partition's 240, 64K in all.
COMPUTE_REGISTERS, LOADER_REGISTERS = gl.constexpr(240), gl.constexpr(24)
GL_DTYPES = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}
BOX_DTYPES = {**GL_DTYPES, torch.float32: gl.float32}  # the backward's float32 dQ buffer too
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
def _barriers(count: gl.constexpr, arrivals: gl.constexpr = 1):
    """`count` mbarriers, each completing a phase at `arrivals` arrivals (or a TMA copy's bytes)."""
    bars = gl.allocate_shared_memory(gl.int64, [count, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(count):
        mbarrier.init(bars.index(i), count=arrivals)
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
def _kv_loader(rings, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr):
    """The one-warp partition that streams K_j and V_j through their rings: K_j's slot once every
    warpgroup has S_{j - NUM_STAGES}, V_j's once each has added P V of that block."""
    k_desc, v_desc, k_boxes, v_boxes, k_ready, v_ready, k_free, v_free, batch, kv_head, kv_start, n_steps = rings
    for step in range(n_steps):
        slot = step % NUM_STAGES
        free_phase = ((step // NUM_STAGES) & 1) ^ 1  # a fresh barrier passes this parity: the ring starts empty
        row = kv_start + step * BLOCK_N
        mbarrier.wait(k_free.index(slot), phase=free_phase)
        mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [batch, kv_head, row, 0], k_ready.index(slot), k_boxes.index(slot))
        mbarrier.wait(v_free.index(slot), phase=free_phase)
        mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [batch, kv_head, row, 0], v_ready.index(slot), v_boxes.index(slot))


@gluon.jit
def _take_turn(turns, turn, WARPGROUP: gl.constexpr):
    """Wait until the other warpgroup has issued its products of its turn before (warpgroup 0
    goes first): FlashAttention-3's ping-pong (§3.1), so that one warpgroup's softmax runs while
    the other's products use the tensor cores. A fresh barrier passes parity 1 at once."""
    mbarrier.wait(turns.index(WARPGROUP), phase=(turn & 1) ^ (1 - WARPGROUP))


@gluon.jit
def _pass_turn(turns, WARPGROUP: gl.constexpr):
    mbarrier.arrive(turns.index(1 - WARPGROUP), count=1)


@gluon.jit
def _release(bars, slot):
    """Both products that read a slot have completed in every warp of this warpgroup (the waits
    before): one arrival of the two that free it."""
    gl.thread_barrier()
    mbarrier.arrive(bars.index(slot), count=1)


@gluon.jit
def _online_softmax(s, acc, row_max, row_sum, queries, kv_first, all_lo, all_hi, n_q, n_k, qk_scale, softcap_log2,
                    window_left, window_right, BLOCK_N: gl.constexpr, WINDOW_LEFT: gl.constexpr,
                    WINDOW_RIGHT: gl.constexpr, SOFTCAP: gl.constexpr, dtype: gl.constexpr):
    """Line 9 of Algorithm 1 and the first half of line 10 on S = Q K_j^T: returns P~ (in dtype,
    as the A operand of P~ V), O~ rescaled, m and l."""
    s_cols: gl.constexpr = gl.SliceLayout(0, s.type.layout)
    o_rows: gl.constexpr = gl.SliceLayout(1, acc.type.layout)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc.type.layout, k_width=2)
    # In log2 units; with a softcap c, c tanh(scale q.k / c) log2(e) (v2.py's scores_in_log2).
    scores = s * qk_scale
    if SOFTCAP:
        scores = tanh(scores) * softcap_log2
    # Mask the blocks that cross an edge of what every query of the program sees, or the end of K.
    if (kv_first < all_lo) | (kv_first + BLOCK_N > all_hi):
        keys = gl.expand_dims(kv_first + gl.arange(0, BLOCK_N, layout=s_cols), 0)
        visible = is_visible(queries, keys, n_q, n_k, window_left, window_right, WINDOW_LEFT, WINDOW_RIGHT)
        scores = gl.where(visible, scores, float("-inf"))
    # m_new = max(m, rowmax(S)), P~ = exp2(S - m_new), l = exp2(m - m_new) l + rowsum(P~).
    # A row that has seen no key keeps m = -inf and shifts by 0: P~ and the correction are 0.
    new_max = gl.maximum(row_max, gl.max(scores, 1))
    shift = gl.where(new_max == float("-inf"), 0.0, new_max)
    p = gl.exp2(scores - gl.expand_dims(shift, 1))
    correction = gl.exp2(row_max - shift)
    row_sum = row_sum * correction + gl.sum(p, 1)
    # O~ = diag(correction) O~; the caller adds P~ V.
    acc = acc * gl.expand_dims(gl.convert_layout(correction, o_rows), 1)
    return gl.convert_layout(p.to(dtype), p_layout), acc, new_max, row_sum


@gluon.jit
def _write_out(o_desc, q_box, acc, row_max, row_sum, LSE, stride_lb, stride_lh, batch, head, rows_first, n_q):
    """Lines 12-13 of Algorithm 1 for the rows from rows_first: O = diag(l)^-1 O~ and
    L = m + log(l); a row that saw no key: O = 0, L = -inf. O goes out through Q's box, read no
    more (same box and layout)."""
    s_rows: gl.constexpr = row_sum.type.layout
    o_rows: gl.constexpr = gl.SliceLayout(1, acc.type.layout)
    sees_a_key = row_sum > 0
    out = acc / gl.expand_dims(gl.convert_layout(gl.where(sees_a_key, row_sum, 1.0), o_rows), 1)
    lse = gl.where(sees_a_key, (row_max + gl.log2(row_sum)) * LN_2, float("-inf"))
    rows = rows_first + gl.arange(0, row_sum.shape[0], layout=s_rows)
    gl.store(LSE + batch * stride_lb + head * stride_lh + rows, lse, mask=rows < n_q)
    q_box.reshape(acc.shape).store(out.to(o_desc.dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [batch, head, rows_first, 0], q_box)
    tma.store_wait(pendings=0)


@gluon.jit
def _warpgroup_rows(shared, program, WARPGROUP: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr,
                    HEAD_D: gl.constexpr, NUM_STAGES: gl.constexpr, WINDOW_LEFT: gl.constexpr,
                    WINDOW_RIGHT: gl.constexpr, SOFTCAP: gl.constexpr):
    """One compute warpgroup: Algorithm 1 over its ROWS queries of the program's block. Each turn
    issues S_j = Q K_j^T and the previous block's O~ += P~_{j-1} V_{j-1} together
    (FlashAttention-3's intra-warpgroup order, §3.2, but both waited for at once), then the
    softmax of S_j runs while the other warpgroup's turn keeps the tensor cores busy.
    shared: the descriptors, shared memory and barriers; program: the scalars, as the kernel
    passes them."""
    o_desc, q_boxes, k_boxes, v_boxes, q_bars, k_ready, v_ready, k_free, v_free, turns = shared
    (LSE, stride_lb, stride_lh, batch, head, q_first, kv_start, n_steps, all_lo, all_hi, n_q, n_k, qk_scale,
     softcap_log2, window_left, window_right) = program
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_D, 16])
    s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)
    dtype: gl.constexpr = o_desc.dtype
    rows_first = q_first + WARPGROUP * ROWS
    q_box = q_boxes.index(WARPGROUP)
    q_tile = q_box.reshape([ROWS, HEAD_D])

    # Line 5: O~ = 0, l = 0, m = -inf (log2 units).
    row_max = gl.full([ROWS], float("-inf"), gl.float32, layout=s_rows)
    row_sum = gl.zeros([ROWS], gl.float32, layout=s_rows)
    acc = gl.zeros([ROWS, HEAD_D], gl.float32, layout=o_layout)
    s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)
    queries = gl.expand_dims(rows_first + gl.arange(0, ROWS, layout=s_rows), 1)
    mbarrier.wait(q_bars.index(WARPGROUP), phase=0)

    if n_steps > 0:
        # The first block: S_0 alone.
        mbarrier.wait(k_ready.index(0), phase=0)
        _take_turn(turns, 0, WARPGROUP)
        s = warpgroup_mma(q_tile, _tile(k_boxes, 0, BLOCK_N, HEAD_D).permute((1, 0)), s_zero, use_acc=False,
                          is_async=True)
        _pass_turn(turns, WARPGROUP)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
        _release(k_free, 0)
        p, acc, row_max, row_sum = _online_softmax(s, acc, row_max, row_sum, queries, kv_start, all_lo, all_hi, n_q,
                                                   n_k, qk_scale, softcap_log2, window_left, window_right, BLOCK_N,
                                                   WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP, dtype)
        for step in range(1, n_steps):
            slot = step % NUM_STAGES
            last = (step - 1) % NUM_STAGES
            kv_first = kv_start + step * BLOCK_N
            mbarrier.wait(k_ready.index(slot), phase=(step // NUM_STAGES) & 1)
            mbarrier.wait(v_ready.index(last), phase=((step - 1) // NUM_STAGES) & 1)
            # Line 8 for this block and line 10's product for the one before.
            _take_turn(turns, step, WARPGROUP)
            s = warpgroup_mma(q_tile, _tile(k_boxes, slot, BLOCK_N, HEAD_D).permute((1, 0)), s_zero, use_acc=False,
                              is_async=True)
            acc = warpgroup_mma(p, _tile(v_boxes, last, BLOCK_N, HEAD_D), acc, is_async=True)
            _pass_turn(turns, WARPGROUP)
            s, acc, p = warpgroup_mma_wait(num_outstanding=0, deps=(s, acc, p))
            _release(k_free, slot)
            _release(v_free, last)
            p, acc, row_max, row_sum = _online_softmax(s, acc, row_max, row_sum, queries, kv_first, all_lo, all_hi,
                                                       n_q, n_k, qk_scale, softcap_log2, window_left, window_right,
                                                       BLOCK_N, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP, dtype)
        # Line 10's product for the last block, in a turn of its own.
        last = (n_steps - 1) % NUM_STAGES
        mbarrier.wait(v_ready.index(last), phase=((n_steps - 1) // NUM_STAGES) & 1)
        _take_turn(turns, n_steps, WARPGROUP)
        acc = warpgroup_mma(p, _tile(v_boxes, last, BLOCK_N, HEAD_D), acc, is_async=True)
        _pass_turn(turns, WARPGROUP)
        acc, p = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p))

    _write_out(o_desc, q_box, acc, row_max, row_sum, LSE, stride_lb, stride_lh, batch, head, rows_first, n_q)


@gluon.jit
def _ping_pong_kernel(q_desc, k_desc, v_desc, o_desc, LSE, stride_lb, stride_lh, q_heads, group, n_q,
                      n_k, qk_scale, softcap_log2, window_left, window_right, BLOCK_M: gl.constexpr,
                      BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, NUM_STAGES: gl.constexpr,
                      WINDOW_LEFT: gl.constexpr, WINDOW_RIGHT: gl.constexpr, SOFTCAP: gl.constexpr,
                      num_warps: gl.constexpr):
    """One query block of one head: two compute warpgroups of BLOCK_M / 2 rows each (the default
    partition and a worker) that share K_j and V_j, and a loader warp."""
    batch, head, kv_head, q_first, kv_start, n_steps, all_lo, all_hi = _query_block(
        q_heads, group, n_q, n_k, window_left, window_right, BLOCK_M, BLOCK_N, WINDOW_LEFT, WINDOW_RIGHT)
    ROWS: gl.constexpr = BLOCK_M // 2
    q_boxes = _ring(q_desc, 2)  # one Q box a warpgroup
    k_boxes = _ring(k_desc, NUM_STAGES)
    v_boxes = _ring(v_desc, NUM_STAGES)
    q_bars = _barriers(2)
    k_ready = _barriers(NUM_STAGES)
    v_ready = _barriers(NUM_STAGES)
    k_free = _barriers(NUM_STAGES, 2)  # freed by both warpgroups
    v_free = _barriers(NUM_STAGES, 2)
    turns = _barriers(2)
    # Line 4: load Q_i, each warpgroup's rows into its box.
    for part in gl.static_range(2):
        mbarrier.expect(q_bars.index(part), q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [batch, head, q_first + part * ROWS, 0], q_bars.index(part),
                                        q_boxes.index(part))
    shared = (o_desc, q_boxes, k_boxes, v_boxes, q_bars, k_ready, v_ready, k_free, v_free, turns)
    program = (LSE, stride_lb, stride_lh, batch, head, q_first, kv_start, n_steps, all_lo, all_hi, n_q, n_k,
               qk_scale, softcap_log2, window_left, window_right)
    rings = (k_desc, v_desc, k_boxes, v_boxes, k_ready, v_ready, k_free, v_free, batch, kv_head, kv_start, n_steps)
    gl.warp_specialize([
        (_warpgroup_rows, (shared, program, 0, ROWS, BLOCK_N, HEAD_D, NUM_STAGES, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP)),
        (_warpgroup_rows, (shared, program, 1, ROWS, BLOCK_N, HEAD_D, NUM_STAGES, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP)),
        (_kv_loader, (rings, BLOCK_N, NUM_STAGES)),
    ], [4, 1], [COMPUTE_REGISTERS, LOADER_REGISTERS])
    _invalidate(q_bars, 2)
    _invalidate(k_ready, NUM_STAGES)
    _invalidate(v_ready, NUM_STAGES)
    _invalidate(k_free, NUM_STAGES)
    _invalidate(v_free, NUM_STAGES)
    _invalidate(turns, 2)


@gluon.jit
def _lockstep_kernel(q_desc, k_desc, v_desc, o_desc, LSE, stride_lb, stride_lh, q_heads, group, n_q, n_k, qk_scale,
                     softcap_log2, window_left, window_right, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                     HEAD_D: gl.constexpr, NUM_STAGES: gl.constexpr, WINDOW_LEFT: gl.constexpr,
                     WINDOW_RIGHT: gl.constexpr, SOFTCAP: gl.constexpr, num_warps: gl.constexpr):
    """One query block of one head, all warps in step: two warpgroups, each owning half the rows,
    wait for each product before the softmax, and refill the ring themselves. Two programs share
    an SM, so that one's softmax runs beside the other's products."""
    batch, head, kv_head, q_first, kv_start, n_steps, all_lo, all_hi = _query_block(
        q_heads, group, n_q, n_k, window_left, window_right, BLOCK_M, BLOCK_N, WINDOW_LEFT, WINDOW_RIGHT)
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, HEAD_D, 16])
    s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)
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
        # Line 8: S = Q K^T (K^T a permuted view of the K tile).
        s = warpgroup_mma(q_tile, _tile(k_boxes, slot, BLOCK_N, HEAD_D).permute((1, 0)), s_zero, use_acc=False,
                          is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
        p, acc, row_max, row_sum = _online_softmax(s, acc, row_max, row_sum, queries, kv_first, all_lo, all_hi, n_q,
                                                   n_k, qk_scale, softcap_log2, window_left, window_right, BLOCK_N,
                                                   WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP, dtype)
        # Line 10: O~ += P~ V, P~ from registers.
        acc = warpgroup_mma(p, _tile(v_boxes, slot, BLOCK_N, HEAD_D), acc, is_async=True)
        acc, p = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p))

    _invalidate(q_bar, 1)
    _invalidate(kv_bars, NUM_STAGES)
    _write_out(o_desc, q_box, acc, row_max, row_sum, LSE, stride_lb, stride_lh, batch, head, q_first, n_q)


# ---------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _box_layout(rows, head_dim, dtype):
    """The shared-memory layout of a (1, 1, rows, D) box: cached, since working it out costs
    about 9 us of host time, a descriptor's worth of launch time four times over."""
    return gl.NVMMASharedLayout.get_default_for([1, 1, rows, head_dim], BOX_DTYPES[dtype])


def _descriptor(t, rows, columns=None):
    """A TMA descriptor over a (B, H, N, D) tensor, boxes of (1, 1, rows, columns or D)."""
    columns = columns or t.shape[-1]
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, columns],
                            _box_layout(rows, columns, t.dtype))


def forward_kernel(head_dim):
    """(kernel, warps, query rows of a Q or O box) of the forward at this head dim."""
    if head_dim in PING_PONG_BLOCKS:
        return _ping_pong_kernel, 4, PING_PONG_BLOCKS[head_dim][0] // 2  # the default partition: one warpgroup
    return _lockstep_kernel, LOCKSTEP_WARPS, LOCKSTEP_BLOCKS[head_dim][0]


def v2_hopper_forward(q, k, v, problem: Problem):
    """O and lse as v2.v2_forward, for a call that `supports` accepts."""
    out = torch.empty_like(q, memory_format=torch.contiguous_format)  # cheaper on the host than torch.empty
    lse = q.new_empty(problem.stat_shape(q), dtype=torch.float32)
    block_m, block_n = FORWARD_BLOCKS[problem.head_dim]
    kernel, warps, query_rows = forward_kernel(problem.head_dim)
    grid = (problem.batch * problem.q_heads * cdiv(problem.n_q, block_m),)
    args = problem.kernel_args
    kernel[grid](
        _descriptor(q, query_rows), _descriptor(k, block_n), _descriptor(v, block_n), _descriptor(out, query_rows),
        lse, lse.stride(0), lse.stride(1), problem.q_heads, problem.group, problem.n_q, problem.n_k,
        args["qk_scale"], args["softcap_log2"], args["window_left"], args["window_right"],
        block_m, block_n, problem.head_dim, NUM_STAGES, args["WINDOW_LEFT"], args["WINDOW_RIGHT"], args["SOFTCAP"],
        num_warps=warps)
    return out, lse
