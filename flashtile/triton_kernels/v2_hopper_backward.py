"""v2's backward in one pass for Hopper (sm_90) in Gluon, deterministic: FlashAttention-2's
Algorithm 2 as the paper writes it (one program per key block; S and dP computed once, five
products a (key block, query block) pair against the seven of v2.py's two passes; dQ_i += dS_i K_j
added into a float32 buffer), with dQ's adds made in a fixed order (FlashAttention-3's
deterministic backward), so that dQ's bits repeat from run to run as v2.py's do.

- Compute warps (two warpgroups, 64 keys each; at D 256 64 keys in all, see below): S^T = K Q^T,
  P, dP^T = V dO^T while dV += P^T dO is issued, dS, dK += dS^T Q while dS^T is stored for dQ's
  product, and dQ's share dS K, staged in a ring of DQ_STAGES float32 boxes in shared memory
  (at D 256 in the step's Q and dO slots).
- A one-warp writer partition adds each staged share into the buffer by TMA
  (`cp.reduce.async.bulk.tensor` .add). With DETERMINISTIC it first waits for this key block's
  turn at the dQ block (a counter per (batch, head, query block): the key blocks that see the
  block add in the order of their index) and passes the turn on once the add has been written.
  The compute warps wait for neither, unless DQ_STAGES shares are pending.
- A one-warp loader partition streams Q_i and dO_i through a ring of NUM_STAGES slots by TMA,
  each slot once the compute warps signal that the step that used it is done (the same signal
  hands the step's share to the writer; at D 256, once the writer has added the share staged
  in the slot), so the compute warps issue no copy.
- Every program visits its query blocks from the last to the first, so that the programs of one
  head that run together reach the same dQ block at about the same time.

K_j and V_j stay in shared memory.
Key-major: S^T and dP^T are BLOCK_N x BLOCK_M, so P^T and dS^T are the A operands of dV's and
dK's products straight from registers. The compute warps have 240 registers a thread
(setmaxnreg), and D 128 keeps within them only by starting the dP^T accumulator at -D and,
without a softcap, the S^T accumulator at -L / scale.

At D 256 two warpgroups of 64 keys each would hold dK and dV in 256 float32 registers a thread.
There a program owns 64 keys, and its warpgroups split the head dim of dK and dV, and the
queries of S^T and dP^T: P^T and dS^T then go through shared memory to dV's and dK's products.
There is no room for a dQ ring beside the 2 x 64 KB Q and dO ring (213228 bytes in all), so a step's
dQ share is staged in the step's own Q and dO slots, once its products are done with them, and
the loader refills a slot once the writer has added the share.

On the H200 this runs at 1.05-1.13x of v2.py's two passes at D 128, and at 0.98-1.71x at D 256,
where both sides see at least 4096 keys or queries; at 0.81-0.97x at D 64 or N 1024
(docs/results.md, "The one-pass backward by default at D 128", "The one-pass backward at
D 256"). By default it serves v2 only there (`supports_backward`).
"""
import os

import torch
from triton._C.libtriton import ir
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language._core import builtin
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

from ._common import Problem, is_visible, key_range, query_range, tanh
from ._launch import cdiv
from .v2_hopper import _barriers, _descriptor, _invalidate, _load_pair, _ring, _tile, supports

# (keys a program owns, queries a step, warps). At D 64 and 128 the two warpgroups own 64 keys
# each. At D 256 that would be two 64 x 256 float32 accumulators (dK, dV), 256 registers a
# thread: there the program owns 64 keys and its warpgroups split the head dim of dK and dV
# (and the queries of S^T and dP^T) between them.
BACKWARD_BLOCKS = {64: (128, 64, 8), 128: (128, 64, 8), 256: (64, 64, 8)}
# Columns of dQ's share formed at a time (a warpgroup takes half of them), and of a box of the
# float32 dQ buffer that TMA adds (two boxes a step at D 256).
DQ_SLICES = {64: 64, 128: 64, 256: 128}
DQ_BOX_COLUMNS = 128


def dq_box_columns(head_dim: int) -> int:
    """Columns of a box of the float32 dQ buffer (the launcher's descriptor and the AOT signature)."""
    return min(head_dim, DQ_BOX_COLUMNS)
# Where it serves by default: D 128 and 256, and at least this many queries and keys a query
# sees. The H200 measured it ahead of the two passes at N 4096 and 16384, behind at N 1024 and
# at D 64 (docs/results.md, "The one-pass backward by default at D 128" and "The one-pass
# backward at D 256").
DEFAULT_HEAD_DIMS, DEFAULT_MIN_ROWS = (128, 256), 4096
NUM_STAGES = 2
DQ_STAGES = NUM_STAGES  # shares of dQ staged for TMA's add at once: one a ring slot
# A thread of the one-warp dQ writer or loader (setmaxnreg); the compute warps get the rest.
WORKER_REGISTERS = gl.constexpr(24)


def supports_backward(q, k, v, problem: Problem) -> bool:
    """Whether `v2_hopper_backward` serves v2's backward of this call, where v2_hopper.supports
    the call: by default at DEFAULT_HEAD_DIMS with at least DEFAULT_MIN_ROWS queries and keys
    seen; with FLASHTILE_ONE_PASS_BACKWARD=1 at every head dim of BACKWARD_BLOCKS; with =0 never."""
    asked = os.environ.get("FLASHTILE_ONE_PASS_BACKWARD", "")
    if asked == "0" or problem.head_dim not in BACKWARD_BLOCKS:
        return False
    if asked != "1" and (problem.head_dim not in DEFAULT_HEAD_DIMS
                         or min(problem.n_q, problem.keys_seen()) < DEFAULT_MIN_ROWS):
        return False
    return supports(q, k, v, problem)


@gluon.jit
def _wait_for_turn(counter, turn):
    """Spin until the counter (int32, global) reads `turn`; acquire, so the adds of the programs
    before are seen."""
    seen = gl.atomic_add(counter, 0, sem="acquire")
    while seen != turn:
        seen = gl.atomic_add(counter, 0, sem="acquire")


@builtin
def _tma_add(tensor_desc, coord, src, _semantic=None):
    """Add the shared-memory box src into the tensor at coord, by TMA (`cp.reduce.async.bulk.tensor`
    .add: one thread issues it, the copy engine adds at L2, rows outside the tensor are dropped),
    in the bulk group that tma.store_wait waits on. Triton 3.6 builds this op but Gluon has no
    wrapper for it."""
    coord = _semantic._convert_to_ir_values(coord, require_i64=False)
    _semantic.builder.create_async_tma_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord, src.handle)


@gluon.jit
def _bulk_writes_done(like):
    """Wait until this thread's bulk copies have written global memory (`cp.async.bulk.wait_group
    0`; tma.store_wait waits only until they have read shared memory). `like`: any tensor, for
    the inline asm's shape."""
    gl.inline_asm_elementwise("cp.async.bulk.wait_group 0; mov.b32 $0, 0;", "=r,r", [like], dtype=gl.int32,
                              is_pure=False, pack=1)


@gluon.jit
def _step_rows(step, per_head, last_first, head0, BLOCK_M: gl.constexpr):
    """(query head, first query) of a program's step: the group's heads in turn, each one's
    query blocks from the last."""
    member = step // per_head
    return head0 + member, last_first - (step - member * per_head) * BLOCK_M


@gluon.jit
def _dq_box(dq_desc, dq_boxes, q_boxes, do_boxes, slot, part: gl.constexpr, IN_RING: gl.constexpr):
    """Where part `part` (DQ_BOX_COLUMNS columns) of a step's share of dQ is staged: in the
    dQ ring's slot, or, IN_RING (D 256), in the step's own Q (part 0) or dO (part 1) slot, whose
    tiles the step no longer reads by then (a 64 x 256 16-bit tile has the bytes of a 64 x 128
    float32 one). This saves the 2 x 64 KB that a dQ ring would take at D 256."""
    if IN_RING:
        if part == 0:
            return q_boxes.index(slot)._reinterpret(gl.float32, dq_desc.block_type.shape, dq_desc.layout)
        else:
            return do_boxes.index(slot)._reinterpret(gl.float32, dq_desc.block_type.shape, dq_desc.layout)
    else:
        return dq_boxes.index(slot)


@gluon.jit
def _add_dq_share(dq_desc, dq_boxes, q_boxes, do_boxes, slot, TURNS, stride_tb, stride_th, batch, head, q_first,
                  key_block, n_q, n_k, window_left, window_right, like, BLOCK_N: gl.constexpr,
                  BLOCK_M: gl.constexpr, HEAD_D: gl.constexpr, IN_RING: gl.constexpr, DETERMINISTIC: gl.constexpr,
                  WINDOW_LEFT: gl.constexpr, WINDOW_RIGHT: gl.constexpr):
    """Line 15's write: the staged share of dQ_i added into the float32 buffer by TMA. With
    DETERMINISTIC, in this key block's turn at the dQ block (the key blocks before it that the
    block's queries see add first; key_range's lo is the first key block to visit the block),
    passed on once the add has been written."""
    if DETERMINISTIC:
        first_key, _all_lo, _all_hi, _hi = key_range(q_first, n_q, n_k, window_left, window_right, BLOCK_M,
                                                     WINDOW_LEFT, WINDOW_RIGHT)
        counter = TURNS + batch * stride_tb + head * stride_th + q_first // BLOCK_M
        _wait_for_turn(counter, key_block - first_key // BLOCK_N)
    BOX_COLUMNS: gl.constexpr = dq_desc.block_type.shape[3]
    for part in gl.static_range(HEAD_D // BOX_COLUMNS):
        _tma_add(dq_desc, [batch, head, q_first, part * BOX_COLUMNS],
                 _dq_box(dq_desc, dq_boxes, q_boxes, do_boxes, slot, part, IN_RING))
    if DETERMINISTIC:
        _bulk_writes_done(like)
        gl.thread_barrier()
        gl.atomic_add(counter, 1, sem="release")
    else:
        tma.store_wait(pendings=0)


@gluon.jit
def _dq_writer(dq_desc, dq_boxes, q_boxes, do_boxes, step_done, dq_free, TURNS, stride_tb, stride_th, batch, head0,
               last_first, per_head, n_steps, key_block, n_q, n_k, window_left, window_right, BLOCK_N: gl.constexpr,
               BLOCK_M: gl.constexpr, HEAD_D: gl.constexpr, DQ_STAGES: gl.constexpr, IN_RING: gl.constexpr,
               DETERMINISTIC: gl.constexpr, WINDOW_LEFT: gl.constexpr, WINDOW_RIGHT: gl.constexpr):
    """The one-warp partition that adds the staged shares of dQ, so that the compute warps never
    wait on an add (or, with DETERMINISTIC, on their turn) unless DQ_STAGES shares are pending.
    dq_free tells the compute warps (or, IN_RING, the loader) that a stage is free again."""
    like = gl.arange(0, 32, layout=gl.BlockedLayout([1], [32], [1], [0]))
    for step in range(n_steps):
        slot = step % DQ_STAGES
        mbarrier.wait(step_done.index(slot), phase=(step // DQ_STAGES) & 1)
        head, q_first = _step_rows(step, per_head, last_first, head0, BLOCK_M)
        _add_dq_share(dq_desc, dq_boxes, q_boxes, do_boxes, slot, TURNS, stride_tb, stride_th, batch, head, q_first,
                      key_block, n_q, n_k, window_left, window_right, like, BLOCK_N, BLOCK_M, HEAD_D, IN_RING,
                      DETERMINISTIC, WINDOW_LEFT, WINDOW_RIGHT)
        mbarrier.arrive(dq_free.index(slot), count=1)


@gluon.jit
def _loader(q_desc, do_desc, q_boxes, do_boxes, bars, slot_free, batch, head0, last_first, per_head, n_steps,
            BLOCK_M: gl.constexpr, NUM_STAGES: gl.constexpr):
    """The one-warp partition that streams Q_i and dO_i into the ring: each slot once the step
    that used it is done with it (slot_free: the compute warps' signal, or the writer's where
    dQ's share is staged in the slot), so that the compute warps never issue a copy (nor meet
    the CTA barriers around one)."""
    for step in range(n_steps):
        slot = step % NUM_STAGES
        mbarrier.wait(slot_free.index(slot), phase=((step // NUM_STAGES) & 1) ^ 1)
        head, q_first = _step_rows(step, per_head, last_first, head0, BLOCK_M)
        _load_pair(q_desc, do_desc, q_boxes, do_boxes, bars, batch, head, q_first, step, n_steps, NUM_STAGES)


@gluon.jit
def _key_block_steps(dq_desc, k_box, v_box, q_boxes, do_boxes, pt_smem, ds_smem, dq_boxes, kv_bar, bars, step_done,
                     dq_free, L2, DELTA, stride_sb, stride_sh, batch, head0, k_first, last_first, per_head, n_steps,
                     n_q, n_k, scale, qk_scale, softcap_log2, window_left, window_right, BLOCK_N: gl.constexpr,
                     BLOCK_M: gl.constexpr, HEAD_D: gl.constexpr, NUM_STAGES: gl.constexpr,
                     DQ_SLICE: gl.constexpr, DQ_STAGES: gl.constexpr, SPLIT: gl.constexpr,
                     WINDOW_LEFT: gl.constexpr, WINDOW_RIGHT: gl.constexpr, SOFTCAP: gl.constexpr,
                     num_warps: gl.constexpr):
    """The compute warps' loop over query blocks (Algorithm 2, lines 8-17): returns dK (unscaled)
    and dV. Each step's share of dQ is staged in shared memory for the writer.
    With SPLIT (D 256) the warpgroups share the program's 64 keys: each takes half the queries
    of S^T and dP^T and half the head dim of dK and dV, so P^T and dS^T, the A operands of dV's
    and dK's products, go through shared memory; dQ's share is staged in the step's Q and dO
    slots (_dq_box)."""
    # Warpgroups along the keys, and along the queries of S^T / the head dim of dK and dV.
    KEY_GROUPS: gl.constexpr = 1 if SPLIT else num_warps // 4
    DIM_GROUPS: gl.constexpr = num_warps // 4 // KEY_GROUPS
    st_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4 * KEY_GROUPS, DIM_GROUPS],
                                                        instr_shape=[16, BLOCK_M // DIM_GROUPS, 16])
    kv_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4 * KEY_GROUPS, DIM_GROUPS],
                                                        instr_shape=[16, HEAD_D // DIM_GROUPS, 16])
    # dQ's share is BLOCK_M x DQ_SLICE at a time; with two warpgroups each takes half the columns.
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, num_warps // 4],
                                                        instr_shape=[16, DQ_SLICE // (num_warps // 4), 16])
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=kv_layout, k_width=2)
    st_rows: gl.constexpr = gl.SliceLayout(1, st_layout)
    st_cols: gl.constexpr = gl.SliceLayout(0, st_layout)
    dtype: gl.constexpr = k_box.dtype
    DQ_BOX: gl.constexpr = dq_desc.block_type.shape[3]

    k_tile = k_box.reshape([BLOCK_N, HEAD_D])
    v_tile = v_box.reshape([BLOCK_N, HEAD_D])
    dk = gl.zeros([BLOCK_N, HEAD_D], gl.float32, layout=kv_layout)
    dv = gl.zeros([BLOCK_N, HEAD_D], gl.float32, layout=kv_layout)
    st_zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=st_layout)
    dq_zero = gl.zeros([BLOCK_M, DQ_SLICE], gl.float32, layout=dq_layout)
    keys = gl.expand_dims(k_first + gl.arange(0, BLOCK_N, layout=st_rows), 1)
    mbarrier.wait(kv_bar.index(0), phase=0)

    for step in range(n_steps):
        slot = step % NUM_STAGES
        head, q_first = _step_rows(step, per_head, last_first, head0, BLOCK_M)
        # Row statistics of these queries: L (log2 units) and D, padded (v2_row_stats): every
        # block read lies inside them, and rows past Nq have L = +inf, so P = 0 there.
        queries = q_first + gl.arange(0, BLOCK_M, layout=st_cols)
        stats = (batch * stride_sb + head * stride_sh) + queries
        lse = gl.load(L2 + stats)
        delta = gl.load(DELTA + stats)
        mbarrier.wait(bars.index(slot), phase=(step // NUM_STAGES) & 1)
        q_tile = _tile(q_boxes, slot, BLOCK_M, HEAD_D)
        do_tile = _tile(do_boxes, slot, BLOCK_M, HEAD_D)
        # Line 10: S^T = K Q^T.
        if SOFTCAP:
            st = warpgroup_mma(k_tile, q_tile.permute((1, 0)), st_zero, use_acc=False, is_async=True)
        else:  # S - L / scale in one product: the accumulator starts at -L / scale (log2 units)
            st = warpgroup_mma(k_tile, q_tile.permute((1, 0)), st_zero - gl.expand_dims(lse / qk_scale, 0),
                               is_async=True)
        st = warpgroup_mma_wait(num_outstanding=0, deps=(st, ))
        # Line 11: P = exp2(S - L), in log2 units (with a softcap c: c tanh(scale q.k / c) log2(e)).
        # dP^T is issued only after P: with both accumulators in flight D 128 spills.
        scores_t = st * qk_scale
        capped_t = scores_t
        if SOFTCAP:
            capped_t = tanh(scores_t)
            scores_t = capped_t * softcap_log2
        if WINDOW_LEFT or WINDOW_RIGHT:  # every step: a branch on the window's edges spills at D 128
            visible = is_visible(gl.expand_dims(queries, 0), keys, n_q, n_k, window_left, window_right,
                                 WINDOW_LEFT, WINDOW_RIGHT)
            scores_t = gl.where(visible, scores_t, float("-inf"))
        # Without a window nothing is masked: keys past Nk are TMA's zero rows, whose P reaches
        # only their own rows of dK and dV (not written back) and dQ through K's zero rows.
        if SOFTCAP:
            scores_t = scores_t - gl.expand_dims(lse, 0)
        p_t = gl.exp2(scores_t)
        # Line 13: dP^T = V dO^T, issued before line 12's dV += P^T dO (P^T from registers, or
        # with SPLIT from shared memory: each warpgroup holds half its queries).
        # dP^T - D in one product: the accumulator starts at -D (broadcast), so D needs no
        # registers of its own while the product runs.
        if SPLIT:
            dpt = warpgroup_mma(v_tile, do_tile.permute((1, 0)), st_zero - gl.expand_dims(delta, 0), is_async=True)
            pt_smem.store(p_t.to(dtype))
            fence_async_shared()
            gl.thread_barrier()
            dv = warpgroup_mma(pt_smem, do_tile, dv, is_async=True)
        else:
            p_operand = gl.convert_layout(p_t.to(dtype), op_layout)
            dpt = warpgroup_mma(v_tile, do_tile.permute((1, 0)), st_zero - gl.expand_dims(delta, 0), is_async=True)
            dv = warpgroup_mma(p_operand, do_tile, dv, is_async=True)
        if SOFTCAP:  # the softcap's derivative 1 - tanh^2, folded into P
            p_t = p_t * (1.0 - capped_t * capped_t)
        dpt = warpgroup_mma_wait(num_outstanding=1, deps=(dpt, ))
        # Line 14: dS = P * (dP - D), while dV's product runs.
        ds_t = (p_t * dpt).to(dtype)
        # Line 16: dK += dS^T Q (times scale, once at the end), dS^T from registers (with SPLIT
        # from shared memory); dS^T to shared memory, for dQ.
        if SPLIT:
            ds_smem.store(ds_t)
            fence_async_shared()
            gl.thread_barrier()
            dk = warpgroup_mma(ds_smem, q_tile, dk, is_async=True)
        else:
            ds_operand = gl.convert_layout(ds_t, op_layout)
            dk = warpgroup_mma(ds_operand, q_tile, dk, is_async=True)
            ds_smem.store(ds_t)
            fence_async_shared()
            gl.thread_barrier()
        # Line 15: dQ_i += dS_i K_j (times scale): dS_i the transposed view of dS^T in shared
        # memory, DQ_SLICE columns at a time, staged in shared memory for TMA's add.
        dq_slot = step % DQ_STAGES
        for col in gl.static_range(0, HEAD_D, DQ_SLICE):
            dq_share = warpgroup_mma(ds_smem.permute((1, 0)), k_tile.slice(col, DQ_SLICE, dim=1), dq_zero,
                                     use_acc=False, is_async=True)
            if col == 0:  # every product of the step is done: dV's and dK's, and their operands are free
                if SPLIT:
                    dq_share, dk, dv = warpgroup_mma_wait(num_outstanding=0, deps=(dq_share, dk, dv))
                    # Both warpgroups are done reading this step's Q and dO slots, which now
                    # take the share.
                    gl.thread_barrier()
                else:
                    dq_share, dk, dv, p_operand, ds_operand = warpgroup_mma_wait(
                        num_outstanding=0, deps=(dq_share, dk, dv, p_operand, ds_operand))
                    # The writer has added the stage's previous share.
                    mbarrier.wait(dq_free.index(dq_slot), phase=((step // DQ_STAGES) & 1) ^ 1)
            else:
                dq_share = warpgroup_mma_wait(num_outstanding=0, deps=(dq_share, ))
            dq_stage = _dq_box(dq_desc, dq_boxes, q_boxes, do_boxes, dq_slot, col // DQ_BOX, SPLIT)
            dq_stage.reshape([BLOCK_M, DQ_BOX]).slice(col % DQ_BOX, DQ_SLICE, dim=1).store(dq_share * scale)
        fence_async_shared()
        # Every warp is done with the step: its ring slot (its last products, dK's and dV's, were
        # waited for above) and its dS^T, and its share is staged. One signal for the writer and
        # the loader (with SPLIT, the writer alone): a step's stage and slot have the same index
        # (DQ_STAGES == NUM_STAGES).
        gl.thread_barrier()
        mbarrier.arrive(step_done.index(slot), count=1)
    dk, dv = warpgroup_mma_wait(num_outstanding=0, deps=(dk, dv))
    return dk, dv


@gluon.jit
def _v2_hopper_backward_kernel(q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, dq_desc, L2, DELTA, TURNS,
                               stride_sb, stride_sh, stride_tb, stride_th, kv_heads, group, n_q, n_k, scale, qk_scale,
                               softcap_log2, window_left, window_right, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr,
                               HEAD_D: gl.constexpr, NUM_STAGES: gl.constexpr, DQ_SLICE: gl.constexpr,
                               DQ_STAGES: gl.constexpr, DETERMINISTIC: gl.constexpr,
                               WINDOW_LEFT: gl.constexpr, WINDOW_RIGHT: gl.constexpr, SOFTCAP: gl.constexpr,
                               num_warps: gl.constexpr):
    """dK, dV of one key block of one K/V head and its share of dQ (Algorithm 2, lines 6-18).
    Programs run key block major, (batch, K/V head) fastest, so that the programs running
    together belong to many heads. The group's query heads (GQA) and their query blocks are one
    flat loop, each head's blocks from the last."""
    bh_count = gl.num_programs(0) // gl.cdiv(n_k, BLOCK_N)
    bh = gl.program_id(0) % bh_count
    key_block = gl.program_id(0) // bh_count
    batch = bh // kv_heads
    kv_head = bh % kv_heads
    k_first = key_block * BLOCK_N
    lo, _all_lo, _all_hi, hi = query_range(k_first, n_q, n_k, window_left, window_right, BLOCK_N,
                                         WINDOW_LEFT, WINDOW_RIGHT)
    q_start = lo // BLOCK_M * BLOCK_M
    blocks = gl.maximum(gl.cdiv(hi - q_start, BLOCK_M), 0)
    per_head = gl.maximum(blocks, 1)
    last_first = q_start + (blocks - 1) * BLOCK_M  # the first query of the last block
    n_steps = group * blocks
    head0 = kv_head * group
    dtype: gl.constexpr = q_desc.dtype
    # Fewer keys than the warpgroups' 64 rows each: they split the head dim (D 256).
    SPLIT: gl.constexpr = BLOCK_N < 16 * num_warps

    # Lines 6-7: load K_j, V_j (kept); dK_j = dV_j = 0. Q_i and dO_i stream through the ring.
    k_box = gl.allocate_shared_memory(dtype, k_desc.block_type.shape, k_desc.layout)
    v_box = gl.allocate_shared_memory(dtype, v_desc.block_type.shape, v_desc.layout)
    q_boxes = _ring(q_desc, NUM_STAGES)
    do_boxes = _ring(do_desc, NUM_STAGES)
    # dS^T goes through shared memory: dQ's product contracts over all BLOCK_N keys, which the
    # warpgroups hold between them (with SPLIT, P^T too). dQ's shares go out through a ring of
    # float32 stages (with SPLIT, through the Q and dO ring).
    st_shared: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], dtype)
    ds_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_M], st_shared)
    # (warp_specialize takes no None: the side that is not allocated is passed something unread.)
    if SPLIT:
        pt_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_M], st_shared)
        dq_boxes = q_boxes
    else:
        pt_smem = ds_smem
        dq_boxes = _ring(dq_desc, DQ_STAGES)
    kv_bar = _barriers(1)
    bars = _barriers(NUM_STAGES)
    step_done = _barriers(NUM_STAGES)
    dq_free = _barriers(DQ_STAGES)
    mbarrier.expect(kv_bar.index(0), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [batch, kv_head, k_first, 0], kv_bar.index(0), k_box)
    tma.async_copy_global_to_shared(v_desc, [batch, kv_head, k_first, 0], kv_bar.index(0), v_box)

    dk, dv = gl.warp_specialize([
        (_key_block_steps, (dq_desc, k_box, v_box, q_boxes, do_boxes, pt_smem, ds_smem, dq_boxes, kv_bar, bars,
                            step_done, dq_free, L2, DELTA, stride_sb, stride_sh, batch, head0, k_first, last_first,
                            per_head, n_steps, n_q, n_k, scale, qk_scale, softcap_log2, window_left, window_right,
                            BLOCK_N, BLOCK_M, HEAD_D, NUM_STAGES, DQ_SLICE, DQ_STAGES, SPLIT, WINDOW_LEFT,
                            WINDOW_RIGHT, SOFTCAP, num_warps)),
        (_dq_writer, (dq_desc, dq_boxes, q_boxes, do_boxes, step_done, dq_free, TURNS, stride_tb, stride_th, batch,
                      head0, last_first, per_head, n_steps, key_block, n_q, n_k, window_left, window_right, BLOCK_N,
                      BLOCK_M, HEAD_D, DQ_STAGES, SPLIT, DETERMINISTIC, WINDOW_LEFT, WINDOW_RIGHT)),
        # With SPLIT a slot is free once the writer has added the dQ share staged in it.
        (_loader, (q_desc, do_desc, q_boxes, do_boxes, bars, dq_free if SPLIT else step_done, batch, head0,
                   last_first, per_head, n_steps, BLOCK_M, NUM_STAGES)),
    ], [1, 1], [WORKER_REGISTERS, WORKER_REGISTERS])
    _invalidate(kv_bar, 1)
    _invalidate(bars, NUM_STAGES)
    _invalidate(step_done, NUM_STAGES)
    _invalidate(dq_free, DQ_STAGES)
    # Line 18: write dK_j (dS was taken w.r.t. the scaled scores: dK = scale dS^T Q) and dV_j,
    # through the K and V tiles' shared memory, read no more.
    k_tile = k_box.reshape([BLOCK_N, HEAD_D])
    v_tile = v_box.reshape([BLOCK_N, HEAD_D])
    k_tile.store((dk * scale).to(dtype))
    v_tile.store(dv.to(dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(dk_desc, [batch, kv_head, k_first, 0], k_box)
    tma.async_copy_shared_to_global(dv_desc, [batch, kv_head, k_first, 0], v_box)
    tma.store_wait(pendings=0)


def v2_hopper_backward(q, k, v, d_out, lse2, delta, problem: Problem, deterministic=True, blocks=None):
    """dQ, dK, dV from v2.v2_row_stats' (lse2, delta), for a call that `supports_backward`
    accepts (d_out contiguous). With `deterministic` (v2's), dQ's bits repeat from run to run;
    without it the adds come in any order (for comparison). blocks: (keys a program owns,
    queries a step, warps), BACKWARD_BLOCKS' by default."""
    keys_owned, queries_step, warps = blocks or BACKWARD_BLOCKS[problem.head_dim]
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    dq_accum = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
    turns = lse2  # not read without `deterministic`
    if deterministic:
        turns = torch.zeros((problem.batch, problem.q_heads, cdiv(problem.n_q, queries_step)), device=q.device,
                            dtype=torch.int32)
    grid = (problem.batch * problem.kv_heads * cdiv(problem.n_k, keys_owned),)
    args = problem.kernel_args
    _v2_hopper_backward_kernel[grid](
        _descriptor(q, queries_step), _descriptor(k, keys_owned), _descriptor(v, keys_owned),
        _descriptor(d_out, queries_step), _descriptor(dk, keys_owned), _descriptor(dv, keys_owned),
        _descriptor(dq_accum, queries_step, dq_box_columns(problem.head_dim)), lse2, delta, turns,
        lse2.stride(0), lse2.stride(1), turns.stride(0), turns.stride(1), problem.kv_heads, problem.group,
        problem.n_q, problem.n_k, problem.scale, args["qk_scale"], args["softcap_log2"], args["window_left"],
        args["window_right"], keys_owned, queries_step, problem.head_dim, NUM_STAGES, DQ_SLICES[problem.head_dim],
        DQ_STAGES, deterministic, args["WINDOW_LEFT"], args["WINDOW_RIGHT"], args["SOFTCAP"], num_warps=warps)
    return dq_accum.to(q.dtype), dk, dv
