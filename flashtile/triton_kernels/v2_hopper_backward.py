"""A one-pass backward for Hopper (sm_90) in Gluon: FlashAttention-2's Algorithm 2 as the paper
writes it (one program per key block; S and dP computed once; dQ_i += dS_i K_j added into a
float32 buffer), with the products of one step overlapped rather than run one after another:
- S^T = K Q^T and dP^T = V dO^T are issued together; P is exponentiated while dP^T's product
  runs, and dV += P^T dO runs while dS is formed;
- dK += dS^T Q runs while dS^T is stored to shared memory for dQ's product.
Five products a (key block, query block) pair, against the seven of v2.py's two passes.

With DETERMINISTIC the key blocks add into a dQ block one at a time, in the order of their index
(FlashAttention-3's deterministic backward): a counter per (batch, head, query block) says whose
turn it is, so the float32 sums are formed in the same order on every run and dQ's bits repeat.
To keep the waits short, every program visits its query blocks from the last to the first: the
programs of one head that run together then reach the same query block at about the same time.

Q_i and dO_i stream through a ring of NUM_STAGES slots by TMA; K_j and V_j stay in shared memory.
Key-major: S^T and dP^T are BLOCK_N x BLOCK_M, so P^T and dS^T are the A operands of dV's and
dK's products straight from registers.
"""
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

# (keys a program owns, queries a step, warps): one warpgroup per 64 keys.
BACKWARD_BLOCKS = {64: (128, 64, 8), 128: (128, 64, 8)}
NUM_STAGES = 2
DQ_SLICE = 64  # dQ's share is added DQ_SLICE columns at a time, which keeps it in few registers


def supports_backward(q, k, v, problem: Problem) -> bool:
    """Whether `v2_hopper_backward` serves this call: as v2_hopper.supports, at a head dim of
    BACKWARD_BLOCKS."""
    return problem.head_dim in BACKWARD_BLOCKS and supports(q, k, v, problem)


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
def _add_pairs(pointers, values, mask):
    """values added into pointers' float32s, two neighbours at a time (`red.global.add.v2.f32`,
    sm_90: no value returned, half the operations of scalar atomics), where mask is set. The
    pairs are a thread's consecutive elements: in a wgmma accumulator, two neighbouring columns."""
    return gl.inline_asm_elementwise(
        """{ .reg .pred p; setp.ne.b32 p, $4, 0; @p red.relaxed.gpu.global.add.v2.f32 [$2], {$6, $7};
        mov.b32 $0, 0; mov.b32 $1, 0; }""",
        "=r,=r,l,l,r,r,r,r", [pointers.to(gl.int64), mask.to(gl.int32), values], dtype=gl.int32, is_pure=False, pack=2)


@gluon.jit
def _v2_hopper_backward_kernel(q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, dq_desc, L2, DELTA, DQ_ACC, TURNS,
                               stride_sb, stride_sh, stride_qb, stride_qh, stride_qn, stride_tb, stride_th,
                               kv_heads, group, n_q, n_k, scale, qk_scale, softcap_log2, window_left,
                               window_right, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, HEAD_D: gl.constexpr,
                               NUM_STAGES: gl.constexpr, DQ_SLICE: gl.constexpr, DETERMINISTIC: gl.constexpr, DQ_ADD: gl.constexpr,
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
    lo, all_lo, all_hi, hi = query_range(k_first, n_q, n_k, window_left, window_right, BLOCK_N,
                                         WINDOW_LEFT, WINDOW_RIGHT)
    q_start = lo // BLOCK_M * BLOCK_M
    blocks = gl.maximum(gl.cdiv(hi - q_start, BLOCK_M), 0)
    last_first = q_start + (blocks - 1) * BLOCK_M  # the first query of the last block
    n_steps = group * blocks
    head0 = kv_head * group

    st_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                        instr_shape=[16, BLOCK_M, 16])
    kv_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                        instr_shape=[16, HEAD_D, 16])
    # dQ's share is BLOCK_M x DQ_SLICE at a time; with two warpgroups each takes half the columns.
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
    # dS^T goes through shared memory: dQ's product contracts over all BLOCK_N keys, which the
    # warpgroups hold between them.
    ds_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_M],
                                        gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], dtype))
    if DQ_ADD == 3:  # dQ's share goes out through shared memory, added by TMA
        dq_box = gl.allocate_shared_memory(gl.float32, dq_desc.block_type.shape, dq_desc.layout)
        dq_stage = dq_box.reshape([BLOCK_M, HEAD_D])
    kv_bar = _barriers(1)
    bars = _barriers(NUM_STAGES)
    mbarrier.expect(kv_bar.index(0), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [batch, kv_head, k_first, 0], kv_bar.index(0), k_box)
    tma.async_copy_global_to_shared(v_desc, [batch, kv_head, k_first, 0], kv_bar.index(0), v_box)
    per_head = gl.maximum(blocks, 1)
    for step in gl.static_range(NUM_STAGES - 1):
        _load_pair(q_desc, do_desc, q_boxes, do_boxes, bars, batch, head0 + step // per_head,
                   last_first - step % per_head * BLOCK_M, step, n_steps, NUM_STAGES)
    k_tile = k_box.reshape([BLOCK_N, HEAD_D])
    v_tile = v_box.reshape([BLOCK_N, HEAD_D])
    dk = gl.zeros([BLOCK_N, HEAD_D], gl.float32, layout=kv_layout)
    dv = gl.zeros([BLOCK_N, HEAD_D], gl.float32, layout=kv_layout)
    st_zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=st_layout)
    dq_zero = gl.zeros([BLOCK_M, DQ_SLICE], gl.float32, layout=dq_layout)
    keys = gl.expand_dims(k_first + gl.arange(0, BLOCK_N, layout=st_rows), 1)
    dq_rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, dq_layout))
    dq_cols = gl.expand_dims(gl.arange(0, DQ_SLICE, layout=gl.SliceLayout(0, dq_layout)), 0)
    mbarrier.wait(kv_bar.index(0), phase=0)

    for step in range(n_steps):
        slot = step % NUM_STAGES
        member = step // per_head
        q_first = last_first - (step - member * per_head) * BLOCK_M
        ahead = step + NUM_STAGES - 1
        # Every warp is done with the ring slot and dS^T of the previous step.
        gl.thread_barrier()
        _load_pair(q_desc, do_desc, q_boxes, do_boxes, bars, batch, head0 + ahead // per_head,
                   last_first - ahead % per_head * BLOCK_M, ahead, n_steps, NUM_STAGES)
        # Row statistics of these queries: L (log2 units) and D, padded (v2_row_stats): every
        # block read lies inside them, and rows past Nq have L = +inf, so P = 0 there.
        queries = q_first + gl.arange(0, BLOCK_M, layout=st_cols)
        stats = (batch * stride_sb + (head0 + member) * stride_sh) + queries
        lse = gl.load(L2 + stats)
        delta = gl.load(DELTA + stats)
        mbarrier.wait(bars.index(slot), phase=(step // NUM_STAGES) & 1)
        q_tile = _tile(q_boxes, slot, BLOCK_M, HEAD_D)
        do_tile = _tile(do_boxes, slot, BLOCK_M, HEAD_D)
        # Line 10: S^T = K Q^T; line 13: dP^T = V dO^T, issued behind it.
        st = warpgroup_mma(k_tile, q_tile.permute((1, 0)), st_zero, use_acc=False, is_async=True)
        dpt = warpgroup_mma(v_tile, do_tile.permute((1, 0)), st_zero, use_acc=False, is_async=True)
        st = warpgroup_mma_wait(num_outstanding=1, deps=(st, ))
        # Line 11: P = exp2(S - L), in log2 units (with a softcap c: c tanh(scale q.k / c) log2(e)),
        # while dP^T's product runs.
        scores_t = st * qk_scale
        capped_t = scores_t
        if SOFTCAP:
            capped_t = tanh(scores_t)
            scores_t = capped_t * softcap_log2
        if (q_first < all_lo) | (q_first + BLOCK_M > all_hi):  # an edge of the window
            visible = is_visible(gl.expand_dims(queries, 0), keys, n_q, n_k, window_left, window_right,
                                 WINDOW_LEFT, WINDOW_RIGHT)
            scores_t = gl.where(visible, scores_t, float("-inf"))
        p_t = gl.exp2(scores_t - gl.expand_dims(lse, 0))
        # Line 12: dV += P^T dO, P^T from registers.
        p_operand = gl.convert_layout(p_t.to(dtype), op_layout)
        dv = warpgroup_mma(p_operand, do_tile, dv, is_async=True)
        if SOFTCAP:  # the softcap's derivative 1 - tanh^2, folded into P
            p_t = p_t * (1.0 - capped_t * capped_t)
        dpt = warpgroup_mma_wait(num_outstanding=1, deps=(dpt, ))
        # Line 14: dS = P * (dP - D), while dV's product runs.
        ds_t = (p_t * (dpt - gl.expand_dims(delta, 0))).to(dtype)
        # Line 16: dK += dS^T Q (times scale, once at the end), dS^T from registers; dS^T to
        # shared memory behind it, for dQ.
        ds_operand = gl.convert_layout(ds_t, op_layout)
        dk = warpgroup_mma(ds_operand, q_tile, dk, is_async=True)
        ds_smem.store(ds_t)
        fence_async_shared()
        gl.thread_barrier()
        # Line 15: dQ_i += dS_i K_j (times scale): dS_i the transposed view of dS^T in shared
        # memory, DQ_SLICE columns at a time. Rows past Nq are not added (their P is 0, but the
        # buffer ends at Nq).
        head = head0 + member
        rows = q_first + dq_rows
        dq_row_ptrs = DQ_ACC + batch * stride_qb + head * stride_qh + gl.expand_dims(rows, 1) * stride_qn
        row_mask = gl.expand_dims(rows < n_q, 1)
        if DETERMINISTIC:
            # This key block's turn at the dQ block: the key blocks before it that the block's
            # queries see add first (key_range's lo: the first key block to visit the block).
            first_key, _all_lo, _all_hi, _hi = key_range(q_first, n_q, n_k, window_left, window_right, BLOCK_M,
                                                         WINDOW_LEFT, WINDOW_RIGHT)
            counter = TURNS + batch * stride_tb + head * stride_th + q_first // BLOCK_M
            turn = key_block - first_key // BLOCK_N
        for col in gl.static_range(0, HEAD_D, DQ_SLICE):
            dq_share = warpgroup_mma(ds_smem.permute((1, 0)), k_tile.slice(col, DQ_SLICE, dim=1), dq_zero,
                                     use_acc=False, is_async=True)
            if col == 0:  # every product of the step is done: dV's and dK's, and their operands are free
                dq_share, dk, dv, p_operand, ds_operand = warpgroup_mma_wait(
                    num_outstanding=0, deps=(dq_share, dk, dv, p_operand, ds_operand))
                if DETERMINISTIC:
                    _wait_for_turn(counter, turn)
            else:
                dq_share = warpgroup_mma_wait(num_outstanding=0, deps=(dq_share, ))
            if DQ_ADD == 0:
                gl.atomic_add(dq_row_ptrs + (col + dq_cols), dq_share * scale, mask=row_mask, sem="relaxed")
            elif DQ_ADD == 1:
                _add_pairs(dq_row_ptrs + (col + dq_cols), dq_share * scale, row_mask & (dq_cols >= 0))
            elif DQ_ADD == 3:
                if col == 0:  # the previous step's add has read the stage
                    tma.store_wait(pendings=0)
                    gl.thread_barrier()
                dq_stage.slice(col, DQ_SLICE, dim=1).store(dq_share * scale)
        if DQ_ADD == 3:
            fence_async_shared()
            gl.thread_barrier()
            _tma_add(dq_desc, [batch, head, q_first, 0], dq_box)
        if DETERMINISTIC:
            # Every warp's adds are issued, and TMA's written (the CTA barrier), before one
            # thread passes the turn on with a release.
            if DQ_ADD == 3:
                _bulk_writes_done(row_mask)
            gl.thread_barrier()
            gl.atomic_add(counter, 1, sem="release")

    dk, dv = warpgroup_mma_wait(num_outstanding=0, deps=(dk, dv))
    if DQ_ADD == 3:
        tma.store_wait(pendings=0)
    _invalidate(kv_bar, 1)
    _invalidate(bars, NUM_STAGES)
    # Line 18: write dK_j (dS was taken w.r.t. the scaled scores: dK = scale dS^T Q) and dV_j,
    # through the K and V tiles' shared memory, read no more.
    gl.thread_barrier()
    k_tile.store((dk * scale).to(dtype))
    v_tile.store(dv.to(dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(dk_desc, [batch, kv_head, k_first, 0], k_box)
    tma.async_copy_shared_to_global(dv_desc, [batch, kv_head, k_first, 0], v_box)
    tma.store_wait(pendings=0)


def v2_hopper_backward(q, k, v, d_out, lse2, delta, problem: Problem, deterministic=True, blocks=None, dq_add=3):
    """dQ, dK, dV from v2.v2_row_stats' (lse2, delta), for a call that `supports_backward`
    accepts (d_out contiguous). With `deterministic`, dQ's bits repeat from run to run."""
    keys_owned, queries_step, warps = blocks or BACKWARD_BLOCKS[problem.head_dim]
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    dq_accum = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
    turns = dq_accum
    if deterministic:
        turns = torch.zeros((problem.batch, problem.q_heads, cdiv(problem.n_q, queries_step)), device=q.device,
                            dtype=torch.int32)
    grid = (problem.batch * problem.kv_heads * cdiv(problem.n_k, keys_owned),)
    args = problem.kernel_args
    _v2_hopper_backward_kernel[grid](
        _descriptor(q, queries_step), _descriptor(k, keys_owned), _descriptor(v, keys_owned),
        _descriptor(d_out, queries_step), _descriptor(dk, keys_owned), _descriptor(dv, keys_owned),
        _descriptor(dq_accum, queries_step),
        lse2, delta, dq_accum, turns, lse2.stride(0), lse2.stride(1), *dq_accum.stride()[:3],
        turns.stride(0), turns.stride(1), problem.kv_heads, problem.group, problem.n_q, problem.n_k, problem.scale,
        args["qk_scale"], args["softcap_log2"], args["window_left"], args["window_right"],
        keys_owned, queries_step, problem.head_dim, NUM_STAGES, DQ_SLICE, deterministic, dq_add,
        args["WINDOW_LEFT"], args["WINDOW_RIGHT"], args["SOFTCAP"], num_warps=warps)
    return dq_accum.to(q.dtype), dk, dv
