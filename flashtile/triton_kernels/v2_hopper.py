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
On the H100 this forward runs 8-21% faster than v2.py's at N >= 4096 and D 64 or 128, and
27-46% faster at D 256 (docs/results.md, "v2's forward in Gluon on Hopper" and "D 256 in
Gluon ..."). It serves what TMA can address and what is not too small to be worth its launch
(`supports`); everything else runs v2.py. The backward stays v2.py's: a two-pass Gluon
backward written the same way was slower, and so was a one-pass one for v2_atomic (same
sections).

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

NUM_WARPS = 8
NUM_STAGES = 2
# (query rows a program owns, key rows it loops over) by head dim: the fastest of (128 or 64
# rows, 64 or 128 keys) on the H100 (results/h100/gluon_forward/sweep_configs.jsonl).
FORWARD_BLOCKS = {64: (128, 128), 128: (128, 64),
                  256: (128, 64)}  # D 256: 204 registers, 197 KB shared (timed alone: ab_d256_d9c7393.jsonl)
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
# Launcher
# ---------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _box_layout(rows, head_dim, dtype):
    """The shared-memory layout of a (1, 1, rows, D) box: cached, since working it out costs
    about 9 us of host time, a descriptor's worth of launch time four times over."""
    return gl.NVMMASharedLayout.get_default_for([1, 1, rows, head_dim], BOX_DTYPES[dtype])


def _descriptor(t, rows):
    """A TMA descriptor over a (B, H, N, D) tensor, boxes of (1, 1, rows, D)."""
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, t.shape[-1]],
                            _box_layout(rows, t.shape[-1], t.dtype))


def v2_hopper_forward(q, k, v, problem: Problem):
    """O and lse as v2.v2_forward, for a call that `supports` accepts."""
    out = torch.empty_like(q, memory_format=torch.contiguous_format)  # cheaper on the host than torch.empty
    lse = q.new_empty(problem.stat_shape(q), dtype=torch.float32)
    block_m, block_n = FORWARD_BLOCKS[problem.head_dim]
    grid = (problem.batch * problem.q_heads * cdiv(problem.n_q, block_m),)
    args = problem.kernel_args
    _v2_hopper_forward_kernel[grid](
        _descriptor(q, block_m), _descriptor(k, block_n), _descriptor(v, block_n), _descriptor(out, block_m),
        lse, lse.stride(0), lse.stride(1), problem.q_heads, problem.group, problem.n_q, problem.n_k,
        args["qk_scale"], args["softcap_log2"], args["window_left"], args["window_right"],
        block_m, block_n, problem.head_dim, NUM_STAGES, args["WINDOW_LEFT"], args["WINDOW_RIGHT"], args["SOFTCAP"],
        num_warps=NUM_WARPS)
    return out, lse
