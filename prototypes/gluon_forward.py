"""A Hopper-only FlashAttention-2 forward in Gluon (prototype, branch gluon-fwd; issue 13).

Not wired into flashtile: a first step toward a Gluon kernel with explicit TMA, mbarriers and
warpgroup MMAs, to be compared with v2's forward on an H100. Limits of the prototype: fp16,
D = 64 or 128, not causal, no features, and Nq, Nk multiples of the blocks (the K/V descriptor
is 2-D over (B * H * N, D), so a partial block would read the next head's rows).

Structure (FlashAttention-2, Algorithm 1; scores in log2 units as in v2.py):
- one program per (query block of BLOCK_M rows, batch * head); num_warps = 8 is two warpgroups,
  each owning 64 query rows of every wgmma (NVMMADistributedLayout, warps_per_cta [8, 1]);
- Q is loaded once by TMA; K and V blocks stream through a ring of NUM_STAGES shared-memory
  slots, each slot with its own mbarrier; the load of block j + NUM_STAGES - 1 is issued
  before block j is used, so NUM_STAGES - 1 loads are in flight;
- S = Q K^T by wgmma from shared memory (K^T as a permuted view), the online softmax on S's
  register layout, P converted to the A-operand register layout, O += P V by wgmma.
No warp specialisation yet: that (a producer warp and ping-pong of the two consumer
warpgroups, FlashAttention-3 section 3.1) is the next step once this one is measured.
"""
import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

LOG2_E = 1.4426950408889634


@gluon.jit
def _load_kv(k_desc, v_desc, k_smem, v_smem, kv_bars, kv_row0, block, n_blocks, BLOCK_N: gl.constexpr,
             NUM_STAGES: gl.constexpr):
    """Issue the TMA copies of K and V block `block` into its slot (nothing past n_blocks)."""
    slot = block % NUM_STAGES
    pred = block < n_blocks
    mbarrier.expect(kv_bars.index(slot), k_desc.block_type.nbytes + v_desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(k_desc, [kv_row0 + block * BLOCK_N, 0], kv_bars.index(slot), k_smem.index(slot),
                                    pred=pred)
    tma.async_copy_global_to_shared(v_desc, [kv_row0 + block * BLOCK_N, 0], kv_bars.index(slot), v_smem.index(slot),
                                    pred=pred)


@gluon.jit
def _scores(s, j, first_pos, qk_scale, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, full_blocks,
            CAUSAL: gl.constexpr, s_layout: gl.constexpr):
    """S_j in log2 units, with the causal mask on the blocks that cross the diagonal."""
    scores = s * qk_scale
    if CAUSAL:
        if j >= full_blocks:
            rows = first_pos + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
            cols = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            visible = gl.expand_dims(cols, 0) <= gl.expand_dims(rows, 1)
            scores = gl.where(visible, scores, float("-inf"))
    return scores


@gluon.jit
def gluon_forward_kernel(q_desc, k_desc, v_desc, o_desc, LSE, n_q, n_k, qk_scale,
                         BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr,
                         NUM_STAGES: gl.constexpr, CAUSAL: gl.constexpr, num_warps: gl.constexpr):
    block = gl.program_id(0)
    if CAUSAL:  # the longest query blocks first
        block = gl.num_programs(0) - 1 - block
    bh = gl.program_id(1)
    q_row = bh * n_q + block * BLOCK_M
    kv_row0 = bh * n_k
    first_pos = block * BLOCK_M + n_k - n_q  # position of the block's first query
    n_blocks = n_k // BLOCK_N
    full_blocks = n_blocks
    if CAUSAL:
        n_blocks = gl.minimum(n_blocks, (first_pos + BLOCK_M - 1) // BLOCK_N + 1)
        full_blocks = (first_pos + 1) // BLOCK_N

    # Register layouts of the two products' accumulators: S (BLOCK_M x BLOCK_N) and O (BLOCK_M x D).
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, HEAD_D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)

    q_smem = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [NUM_STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [NUM_STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    kv_bars = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(kv_bars.index(i), count=1)

    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row, 0], q_bar, q_smem)
    # Prologue: the first NUM_STAGES - 1 blocks of K and V.
    for first in gl.static_range(NUM_STAGES - 1):
        _load_kv(k_desc, v_desc, k_smem, v_smem, kv_bars, kv_row0, first, n_blocks, BLOCK_N, NUM_STAGES)

    row_max = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=s_rows)
    row_sum = gl.zeros([BLOCK_M], gl.float32, layout=s_rows)
    acc = gl.zeros([BLOCK_M, HEAD_D], gl.float32, layout=o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    mbarrier.wait(q_bar, phase=0)

    for j in range(n_blocks):
        stage = j % NUM_STAGES
        # Refill the slot that block j - 1 used. Each warpgroup waited for its own products
        # of block j - 1; the barrier makes sure both have before one thread issues the copy.
        gl.thread_barrier()
        _load_kv(k_desc, v_desc, k_smem, v_smem, kv_bars, kv_row0, j + NUM_STAGES - 1, n_blocks, BLOCK_N, NUM_STAGES)
        mbarrier.wait(kv_bars.index(stage), phase=(j // NUM_STAGES) & 1)
        # Line 8: S = Q K^T (K^T: a permuted view of the K tile, no copy).
        s = warpgroup_mma(q_smem, k_smem.index(stage).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
        # Line 9: the online softmax, log2 units.
        scores = _scores(s, j, first_pos, qk_scale, BLOCK_M, BLOCK_N, full_blocks, CAUSAL, s_layout)
        new_max = gl.maximum(row_max, gl.max(scores, 1))
        p = gl.exp2(scores - gl.expand_dims(new_max, 1))
        correction = gl.exp2(row_max - new_max)
        row_sum = row_sum * correction + gl.sum(p, 1)
        row_max = new_max
        # Line 10: O~ = diag(correction) O~ + P V, P from registers.
        acc = acc * gl.expand_dims(gl.convert_layout(correction, o_rows), 1)
        p16 = gl.convert_layout(p.to(gl.float16), p_layout)
        acc = warpgroup_mma(p16, v_smem.index(stage), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))

    mbarrier.invalidate(q_bar)
    for i in gl.static_range(NUM_STAGES):
        mbarrier.invalidate(kv_bars.index(i))

    # Lines 12-13: O = O~ / l, L = m + log2(l) (stored in natural log).
    out = acc / gl.expand_dims(gl.convert_layout(row_sum, o_rows), 1)
    lse = (row_max + gl.log2(row_sum)) * 0.6931471805599453
    rows = q_row + gl.arange(0, BLOCK_M, layout=s_rows)
    gl.store(LSE + rows, lse)
    # Q's tile is no longer read: O goes out through the same shared memory (same layout).
    q_smem.store(out.to(gl.float16))
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [q_row, 0], q_smem)
    tma.store_wait(pendings=0)


# ---------------------------------------------------------------------------------------
# Pipelined (FlashAttention-3, section 3.2, "intra-warpgroup overlapping"): S_j = Q K_j^T is
# issued together with O~ += P_{j-1} V_{j-1}, and the softmax of S_j runs while the second
# product is still on the tensor cores. The rescale of O~ by exp2(m_old - m_new) waits for it.
# Slots: block j's K and V share slot j % NUM_STAGES; the slot of block j - 1 is refilled
# (with block j - 1 + NUM_STAGES) once P_{j-1} V_{j-1} has completed in both warpgroups.
# ---------------------------------------------------------------------------------------

@gluon.jit
def gluon_forward_pipelined_kernel(q_desc, k_desc, v_desc, o_desc, LSE, n_q, n_k, qk_scale,
                                   BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr,
                                   NUM_STAGES: gl.constexpr, CAUSAL: gl.constexpr, num_warps: gl.constexpr):
    block = gl.program_id(0)
    if CAUSAL:  # the longest query blocks first
        block = gl.num_programs(0) - 1 - block
    bh = gl.program_id(1)
    q_row = bh * n_q + block * BLOCK_M
    kv_row0 = bh * n_k
    first_pos = block * BLOCK_M + n_k - n_q  # position of the block's first query
    n_blocks = n_k // BLOCK_N
    full_blocks = n_blocks
    if CAUSAL:
        n_blocks = gl.minimum(n_blocks, (first_pos + BLOCK_M - 1) // BLOCK_N + 1)
        full_blocks = (first_pos + 1) // BLOCK_N

    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, HEAD_D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)

    q_smem = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [NUM_STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [NUM_STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    kv_bars = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for slot in gl.static_range(NUM_STAGES):
        mbarrier.init(kv_bars.index(slot), count=1)
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row, 0], q_bar, q_smem)
    for first in gl.static_range(NUM_STAGES):
        _load_kv(k_desc, v_desc, k_smem, v_smem, kv_bars, kv_row0, first, n_blocks, BLOCK_N, NUM_STAGES)

    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    acc = gl.zeros([BLOCK_M, HEAD_D], gl.float32, layout=o_layout)
    mbarrier.wait(q_bar, phase=0)
    # Block 0: S_0 and its softmax; P_0 waits in registers for the first iteration.
    mbarrier.wait(kv_bars.index(0), phase=0)
    s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
    scores = _scores(s, 0, first_pos, qk_scale, BLOCK_M, BLOCK_N, full_blocks, CAUSAL, s_layout)
    row_max = gl.max(scores, 1)
    p = gl.exp2(scores - gl.expand_dims(row_max, 1))
    row_sum = gl.sum(p, 1)
    p16 = gl.convert_layout(p.to(gl.float16), p_layout)

    for j in range(1, n_blocks):
        stage = j % NUM_STAGES
        prev = (j - 1) % NUM_STAGES
        mbarrier.wait(kv_bars.index(stage), phase=(j // NUM_STAGES) & 1)
        s = warpgroup_mma(q_smem, k_smem.index(stage).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        acc = warpgroup_mma(p16, v_smem.index(prev), acc, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=1, deps=(s, ))  # S_j done; P_{j-1} V_{j-1} may still run
        scores = _scores(s, j, first_pos, qk_scale, BLOCK_M, BLOCK_N, full_blocks, CAUSAL, s_layout)
        new_max = gl.maximum(row_max, gl.max(scores, 1))
        p = gl.exp2(scores - gl.expand_dims(new_max, 1))
        correction = gl.exp2(row_max - new_max)
        row_sum = row_sum * correction + gl.sum(p, 1)
        row_max = new_max
        acc, p16 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p16))
        acc = acc * gl.expand_dims(gl.convert_layout(correction, o_rows), 1)
        p16 = gl.convert_layout(p.to(gl.float16), p_layout)
        # Both warpgroups are past P_{j-1} V_{j-1} (and S_{j-1}) before the slot is refilled.
        gl.thread_barrier()
        _load_kv(k_desc, v_desc, k_smem, v_smem, kv_bars, kv_row0, j - 1 + NUM_STAGES, n_blocks, BLOCK_N, NUM_STAGES)

    last = (n_blocks - 1) % NUM_STAGES
    acc = warpgroup_mma(p16, v_smem.index(last), acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p16))[0]
    mbarrier.invalidate(q_bar)
    for slot in gl.static_range(NUM_STAGES):
        mbarrier.invalidate(kv_bars.index(slot))

    out = acc / gl.expand_dims(gl.convert_layout(row_sum, o_rows), 1)
    lse = (row_max + gl.log2(row_sum)) * 0.6931471805599453
    rows = q_row + gl.arange(0, BLOCK_M, layout=row_max.type.layout)
    gl.store(LSE + rows, lse)
    # Q's tile is no longer read: O goes out through the same shared memory (same layout).
    q_smem.store(out.to(gl.float16))
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [q_row, 0], q_smem)
    tma.store_wait(pendings=0)


# ---------------------------------------------------------------------------------------
# Warp-specialised: a one-warp producer partition issues every TMA load; the eight-warp
# default partition (two warpgroups) only waits, multiplies and exponentiates. Each K/V slot
# has a "ready" barrier (the producer's copies landed) and an "empty" one (the consumers'
# products that read it have completed). mbarriers start with phase 1 complete, so the
# producer's first wait on an empty slot passes at once (Gluon tutorial 08's convention).
# ---------------------------------------------------------------------------------------

@gluon.jit
def _load_partition(descs, barriers, buffers, q_row, kv_row0, n_blocks, BLOCK_N: gl.constexpr):
    q_desc, k_desc, v_desc = descs
    q_bar, kv_ready, kv_empty = barriers
    q_smem, k_bufs, v_bufs = buffers
    num_buffers: gl.constexpr = k_bufs.type.shape[0]
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row, 0], q_bar, q_smem)
    for j in range(n_blocks):
        index = j % num_buffers
        phase = j // num_buffers & 1
        mbarrier.wait(kv_empty.index(index), phase ^ 1)
        mbarrier.expect(kv_ready.index(index), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [kv_row0 + j * BLOCK_N, 0], kv_ready.index(index),
                                        k_bufs.index(index))
        tma.async_copy_global_to_shared(v_desc, [kv_row0 + j * BLOCK_N, 0], kv_ready.index(index),
                                        v_bufs.index(index))


@gluon.jit
def _compute_partition(barriers, buffers, n_blocks, qk_scale, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                       HEAD_D: gl.constexpr, WARPS: gl.constexpr):
    q_bar, kv_ready, kv_empty = barriers
    q_smem, k_bufs, v_bufs = buffers
    num_buffers: gl.constexpr = k_bufs.type.shape[0]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                       instr_shape=[16, HEAD_D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    row_max = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=s_rows)
    row_sum = gl.zeros([BLOCK_M], gl.float32, layout=s_rows)
    acc = gl.zeros([BLOCK_M, HEAD_D], gl.float32, layout=o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    mbarrier.wait(q_bar, phase=0)
    for j in range(n_blocks):
        index = j % num_buffers
        mbarrier.wait(kv_ready.index(index), j // num_buffers & 1)
        s = warpgroup_mma(q_smem, k_bufs.index(index).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
        scores = s * qk_scale
        new_max = gl.maximum(row_max, gl.max(scores, 1))
        p = gl.exp2(scores - gl.expand_dims(new_max, 1))
        correction = gl.exp2(row_max - new_max)
        row_sum = row_sum * correction + gl.sum(p, 1)
        row_max = new_max
        acc = acc * gl.expand_dims(gl.convert_layout(correction, o_rows), 1)
        p16 = gl.convert_layout(p.to(gl.float16), p_layout)
        acc = warpgroup_mma(p16, v_bufs.index(index), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        # Both warpgroups' products of this slot have completed: hand it back.
        gl.thread_barrier()
        mbarrier.arrive(kv_empty.index(index), count=1)
    return acc, row_max, row_sum


@gluon.jit
def gluon_forward_ws_kernel(q_desc, k_desc, v_desc, o_desc, LSE, n_q, n_k, qk_scale,
                            BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr,
                            NUM_STAGES: gl.constexpr, num_warps: gl.constexpr):
    block = gl.program_id(0)
    bh = gl.program_id(1)
    q_row = bh * n_q + block * BLOCK_M
    kv_row0 = bh * n_k
    n_blocks = n_k // BLOCK_N
    q_smem = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
    k_bufs = gl.allocate_shared_memory(k_desc.dtype, [NUM_STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_bufs = gl.allocate_shared_memory(v_desc.dtype, [NUM_STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    kv_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for slot in gl.static_range(NUM_STAGES):
        mbarrier.init(kv_ready.index(slot), count=1)
        mbarrier.init(kv_empty.index(slot), count=1)
    barriers = (q_bar, kv_ready, kv_empty)
    buffers = (q_smem, k_bufs, v_bufs)
    acc, row_max, row_sum = gl.warp_specialize([
        (_compute_partition, (barriers, buffers, n_blocks, qk_scale, BLOCK_M, BLOCK_N, HEAD_D, num_warps)),
        (_load_partition, ((q_desc, k_desc, v_desc), barriers, buffers, q_row, kv_row0, n_blocks, BLOCK_N)),
    ], [1], [24])
    o_layout: gl.constexpr = acc.type.layout
    out = acc / gl.expand_dims(gl.convert_layout(row_sum, gl.SliceLayout(1, o_layout)), 1)
    lse = (row_max + gl.log2(row_sum)) * 0.6931471805599453
    rows = q_row + gl.arange(0, BLOCK_M, layout=row_max.type.layout)
    gl.store(LSE + rows, lse)
    o_smem = gl.allocate_shared_memory(o_desc.dtype, o_desc.block_type.shape, o_desc.layout)
    o_smem.store(out.to(gl.float16))
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [q_row, 0], o_smem)
    tma.store_wait(pendings=0)


# ---------------------------------------------------------------------------------------
# Two consumer partitions (FlashAttention-3's layout, section 3.1, without its explicit ping-pong
# ordering): the CTA's 128 query rows are two 64-row halves, each in its own 4-warp partition
# with its own Q tile, accumulator and epilogue; a 1-warp partition issues every TMA load.
# Barriers inside a partition are the partition's own, so the two consumers are not held in
# step by CTA-wide bar.syncs (what kept the 8-warp loop's warpgroups together) and drift apart:
# one's softmax can run while the other's products are on the tensor cores. A K/V slot is
# handed back when both consumers have arrived on its "empty" barrier (count 2).
# ---------------------------------------------------------------------------------------

@gluon.jit
def _two_loader(q_desc, k_desc, v_desc, q_smems, k_bufs, v_bufs, q_bars, kv_ready, kv_empty, q_row, kv_row0,
                n_steps, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    num_buffers: gl.constexpr = k_bufs.type.shape[0]
    HALF_M: gl.constexpr = BLOCK_M // 2
    for half in gl.static_range(2):
        mbarrier.expect(q_bars.index(half), q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [q_row + half * HALF_M, 0], q_bars.index(half), q_smems.index(half))
    for j in range(n_steps):
        index = j % num_buffers
        mbarrier.wait(kv_empty.index(index), (j // num_buffers & 1) ^ 1)
        mbarrier.expect(kv_ready.index(index), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [kv_row0 + j * BLOCK_N, 0], kv_ready.index(index), k_bufs.index(index))
        tma.async_copy_global_to_shared(v_desc, [kv_row0 + j * BLOCK_N, 0], kv_ready.index(index), v_bufs.index(index))


@gluon.jit
def _two_consumer(half: gl.constexpr, o_desc, LSE, q_smems, k_bufs, v_bufs, q_bars, kv_ready, kv_empty, q_row,
                  first_pos, n_steps, full_blocks, qk_scale, HALF_M: gl.constexpr, BLOCK_N: gl.constexpr,
                  HEAD_D: gl.constexpr, CAUSAL: gl.constexpr):
    num_buffers: gl.constexpr = k_bufs.type.shape[0]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    q_smem = q_smems.index(half)
    my_first = first_pos + half * HALF_M
    row_max = gl.full([HALF_M], float("-inf"), gl.float32, layout=s_rows)
    row_sum = gl.zeros([HALF_M], gl.float32, layout=s_rows)
    acc = gl.zeros([HALF_M, HEAD_D], gl.float32, layout=o_layout)
    s_zero = gl.zeros([HALF_M, BLOCK_N], gl.float32, layout=s_layout)
    mbarrier.wait(q_bars.index(half), phase=0)
    for j in range(n_steps):
        index = j % num_buffers
        mbarrier.wait(kv_ready.index(index), j // num_buffers & 1)
        s = warpgroup_mma(q_smem, k_bufs.index(index).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
        scores = _scores(s, j, my_first, qk_scale, HALF_M, BLOCK_N, full_blocks, CAUSAL, s_layout)
        new_max = gl.maximum(row_max, gl.max(scores, 1))
        shift = gl.where(new_max == float("-inf"), 0.0, new_max)
        p = gl.exp2(scores - gl.expand_dims(shift, 1))
        correction = gl.exp2(row_max - shift)
        row_sum = row_sum * correction + gl.sum(p, 1)
        row_max = new_max
        acc = acc * gl.expand_dims(gl.convert_layout(correction, o_rows), 1)
        p16 = gl.convert_layout(p.to(gl.float16), p_layout)
        acc = warpgroup_mma(p16, v_bufs.index(index), acc, is_async=True)
        acc, p16 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p16))
        gl.thread_barrier()  # this partition's four warps are past the slot
        mbarrier.arrive(kv_empty.index(index), count=1)
    out = acc / gl.expand_dims(gl.convert_layout(row_sum, o_rows), 1)
    lse = (row_max + gl.log2(row_sum)) * 0.6931471805599453
    rows = q_row + half * HALF_M + gl.arange(0, HALF_M, layout=s_rows)
    gl.store(LSE + rows, lse)
    q_smem.store(out.to(gl.float16))
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [q_row + half * HALF_M, 0], q_smem)
    tma.store_wait(pendings=0)


@gluon.jit
def _two_consumer_0(o_desc, LSE, q_smems, k_bufs, v_bufs, q_bars, kv_ready, kv_empty, q_row, first_pos, n_steps,
                    full_blocks, qk_scale, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr,
                    CAUSAL: gl.constexpr):
    _two_consumer(0, o_desc, LSE, q_smems, k_bufs, v_bufs, q_bars, kv_ready, kv_empty, q_row, first_pos, n_steps,
                  full_blocks, qk_scale, BLOCK_M // 2, BLOCK_N, HEAD_D, CAUSAL)


@gluon.jit
def _two_consumer_1(o_desc, LSE, q_smems, k_bufs, v_bufs, q_bars, kv_ready, kv_empty, q_row, first_pos, n_steps,
                    full_blocks, qk_scale, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr,
                    CAUSAL: gl.constexpr):
    _two_consumer(1, o_desc, LSE, q_smems, k_bufs, v_bufs, q_bars, kv_ready, kv_empty, q_row, first_pos, n_steps,
                  full_blocks, qk_scale, BLOCK_M // 2, BLOCK_N, HEAD_D, CAUSAL)


@gluon.jit
def gluon_forward_two_consumers_kernel(q_desc, k_desc, v_desc, o_desc, LSE, n_q, n_k, qk_scale,
                                       BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr,
                                       NUM_STAGES: gl.constexpr, CAUSAL: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                                       num_warps: gl.constexpr):
    """BLOCK_M = 128 query rows a CTA (two halves of 64); launched with num_warps = 4 (the
    default partition, consumer 0), plus 4 warps for consumer 1 and 1 for the loader."""
    block = gl.program_id(0)
    if CAUSAL:
        block = gl.num_programs(0) - 1 - block
    bh = gl.program_id(1)
    q_row = bh * n_q + block * BLOCK_M
    kv_row0 = bh * n_k
    first_pos = block * BLOCK_M + n_k - n_q
    n_steps = n_k // BLOCK_N
    full_blocks = n_steps
    if CAUSAL:
        n_steps = gl.minimum(n_steps, (first_pos + BLOCK_M - 1) // BLOCK_N + 1)
        full_blocks = (first_pos + 1) // BLOCK_N
    q_smems = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape, q_desc.layout)
    k_bufs = gl.allocate_shared_memory(k_desc.dtype, [NUM_STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_bufs = gl.allocate_shared_memory(v_desc.dtype, [NUM_STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    kv_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(q_bars.index(i), count=1)
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(kv_ready.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=2)
    gl.warp_specialize([
        (_two_consumer_0, (o_desc, LSE, q_smems, k_bufs, v_bufs, q_bars, kv_ready, kv_empty, q_row, first_pos, n_steps,
                           full_blocks, qk_scale, BLOCK_M, BLOCK_N, HEAD_D, CAUSAL)),
        (_two_consumer_1, (o_desc, LSE, q_smems, k_bufs, v_bufs, q_bars, kv_ready, kv_empty, q_row, first_pos, n_steps,
                           full_blocks, qk_scale, BLOCK_M, BLOCK_N, HEAD_D, CAUSAL)),
        (_two_loader, (q_desc, k_desc, v_desc, q_smems, k_bufs, v_bufs, q_bars, kv_ready, kv_empty, q_row, kv_row0,
                       n_steps, BLOCK_M, BLOCK_N)),
    ], [4, 1], [CONSUMER_REGS, 24])


def descriptors(q, k, v, out, block_m, block_n):
    """2-D TMA descriptors over (B * H * N, D) of contiguous (B, H, N, D) fp16 tensors."""
    d = q.shape[-1]
    q_layout = gl.NVMMASharedLayout.get_default_for([block_m, d], gl.float16)
    kv_layout = gl.NVMMASharedLayout.get_default_for([block_n, d], gl.float16)
    flat = lambda t: t.reshape(-1, d)  # noqa: E731
    return (TensorDescriptor(flat(q), list(flat(q).shape), list(flat(q).stride()), [block_m, d], q_layout),
            TensorDescriptor(flat(k), list(flat(k).shape), list(flat(k).stride()), [block_n, d], kv_layout),
            TensorDescriptor(flat(v), list(flat(v).shape), list(flat(v).stride()), [block_n, d], kv_layout),
            TensorDescriptor(flat(out), list(flat(out).shape), list(flat(out).stride()), [block_m, d], q_layout))


def gluon_forward(q, k, v, scale=None, block_m=128, block_n=128, num_stages=2, num_warps=8, warp_specialized=False,
                  pipelined=False, causal=False, maxnreg=None, two_consumers=False, consumer_regs=232):
    """(out, lse) of non-causal attention; q, k, v contiguous fp16 (B, H, N, D).
    warp_specialized: the producer/consumer kernel (maxnreg 168: 12 warps of 168 registers fit
    the SM's 64 K, and the compiler moves the producer's to the consumers)."""
    b, h, n_q, d = q.shape
    n_k = k.shape[2]
    assert q.dtype == torch.float16 and d in (64, 128), "prototype: fp16, D 64 or 128"
    assert n_q % block_m == 0 and n_k % block_n == 0, "prototype: lengths multiples of the blocks"
    scale = d ** -0.5 if scale is None else scale
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    lse = torch.empty(b, h, n_q, device=q.device, dtype=torch.float32)
    grid = (n_q // block_m, b * h)
    if two_consumers:
        descs = descriptors(q, k, v, out, block_m // 2, block_n)
        two_consumer_kernel = gluon_forward_two_consumers_kernel
        two_consumer_kernel[grid](*descs, lse, n_q, n_k, scale * LOG2_E, block_m, block_n, d, num_stages, causal,
                                  consumer_regs, num_warps=4, maxnreg=maxnreg or 224)
    elif pipelined:
        gluon_forward_pipelined_kernel[grid](*descriptors(q, k, v, out, block_m, block_n), lse, n_q, n_k,
                                             scale * LOG2_E, block_m, block_n, d, num_stages, causal,
                                             num_warps=num_warps)
    elif warp_specialized:
        assert not causal
        gluon_forward_ws_kernel[grid](*descriptors(q, k, v, out, block_m, block_n), lse, n_q, n_k, scale * LOG2_E,
                                      block_m, block_n, d, num_stages, num_warps=num_warps, maxnreg=168)
    else:
        gluon_forward_kernel[grid](*descriptors(q, k, v, out, block_m, block_n), lse, n_q, n_k, scale * LOG2_E,
                                   block_m, block_n, d, num_stages, causal, num_warps=num_warps,
                                   **({} if maxnreg is None else dict(maxnreg=maxnreg)))
    return out, lse
