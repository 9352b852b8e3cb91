"""v2's forward for Hopper (sm_90) in Gluon: the same algorithm as v2.py's forward (FlashAttention-2,
Algorithm 1, scores in log2 units), written with the machine's own moves, which `tl` leaves to
the compiler:
- Q, K and V come in by TMA (tensor-memory-accelerator copies, one thread issues a whole tile)
  into NVMMA-swizzled shared memory; K and V blocks stream through a ring of NUM_STAGES slots,
  each with an mbarrier that the copy completes;
- both products are warpgroup MMAs (`wgmma`): S = Q K^T from shared memory, O~ += P V with P
  straight from registers, converted to the A-operand layout, never stored;
- 8 warps are two warpgroups, each owning 64 of the block's 128 query rows.
On the H100 this runs v2's forward 15-24% faster at D 128 (docs/results.md, "A Hopper forward
in Gluon"). It serves what TMA can address; everything else runs v2.py's kernel (`supports`).

Same contract as v2.v2_forward: O (contiguous, q's shape) and lse (float32, natural log, -inf
for a row that sees no key, whose O is 0).
"""
import os

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ._common import LN_2, LOG2_E, Problem, device_capability

BLOCK_M = 128
NUM_WARPS = 8
NUM_STAGES = 2
# BLOCK_N by head dim: the fastest of 64 / 128 on the H100 (results/h100/gluon_forward/).
BLOCK_N = {64: 128, 128: 64}
GL_DTYPES = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}


def supports(q, k, v, problem: Problem) -> bool:
    """True when this kernel can run the call: sm_90, dense, fp16 or bf16, D 64 or 128, and
    tensors TMA can address (last dim contiguous, 16-byte aligned base and strides).
    FLASHTILE_GLUON=0 turns it off (v2.py's kernel everywhere), as FLASHTILE_PORTABLE=1 does."""
    if os.environ.get("FLASHTILE_GLUON", "1") == "0":
        return False
    if problem.varlen or problem.head_dim not in BLOCK_N or q.dtype not in GL_DTYPES:
        return False
    if not q.is_cuda or device_capability(q.device) != 90:
        return False
    for t in (q, k, v):
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(s * t.element_size() % 16 for s in t.stride()[:-1]):
            return False
    return True


@gluon.jit
def _load_kv(k_desc, v_desc, k_smem, v_smem, kv_bars, batch, kv_head, kv_row, step, n_steps,
             NUM_STAGES: gl.constexpr):
    """Issue the TMA copies of the K and V block at row kv_row into slot step % NUM_STAGES
    (nothing when step >= n_steps)."""
    slot = step % NUM_STAGES
    pred = step < n_steps
    mbarrier.expect(kv_bars.index(slot), k_desc.block_type.nbytes + v_desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(k_desc, [batch, kv_head, kv_row, 0], kv_bars.index(slot), k_smem.index(slot),
                                    pred=pred)
    tma.async_copy_global_to_shared(v_desc, [batch, kv_head, kv_row, 0], kv_bars.index(slot), v_smem.index(slot),
                                    pred=pred)


@gluon.jit
def _v2_hopper_forward_kernel(q_desc, k_desc, v_desc, o_desc, LSE, stride_lb, stride_lh,
                              q_heads, group, n_q, n_k, qk_scale, softcap_log2, window_left, window_right,
                              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr,
                              NUM_STAGES: gl.constexpr, WINDOW_LEFT: gl.constexpr, WINDOW_RIGHT: gl.constexpr,
                              SOFTCAP: gl.constexpr, num_warps: gl.constexpr):
    # Programs run over (batch, head, query block), blocks fastest; with a right edge (causal)
    # the longest blocks first, as v2.py's `program_rows`.
    num_blocks = gl.cdiv(n_q, BLOCK_M)
    bh = gl.program_id(0) // num_blocks
    block = gl.program_id(0) % num_blocks
    if WINDOW_RIGHT:
        block = num_blocks - 1 - block
    batch = bh // q_heads
    head = bh % q_heads
    kv_head = head // group
    q_first = block * BLOCK_M

    # Keys the block's queries see (v2.py's `key_range`): query i at p = i + Nk - Nq sees
    # [p - left, p + right]; [all_lo, all_hi) is seen by every query of the block.
    first_pos = q_first + n_k - n_q
    last_pos = first_pos + BLOCK_M - 1
    lo = 0
    hi = n_k
    all_lo = 0
    all_hi = n_k
    if WINDOW_LEFT:
        lo = gl.maximum(first_pos - window_left, 0)
        all_lo = last_pos - window_left
    if WINDOW_RIGHT:
        hi = gl.minimum(gl.maximum(last_pos + window_right + 1, 0), n_k)
        all_hi = gl.minimum(gl.maximum(first_pos + window_right + 1, 0), n_k)
    kv_start = lo // BLOCK_N * BLOCK_N
    n_steps = gl.maximum(gl.cdiv(hi - kv_start, BLOCK_N), 0)

    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, HEAD_D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)
    s_cols: gl.constexpr = gl.SliceLayout(0, s_layout)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    dtype: gl.constexpr = q_desc.dtype

    # TMA tiles are (1, 1, rows, D) boxes of the (B, H, N, D) tensors: rows past N read as zeros
    # and are not written back, so any N works; the products see them as (rows, D).
    q_box = gl.allocate_shared_memory(dtype, q_desc.block_type.shape, q_desc.layout)
    k_boxes = gl.allocate_shared_memory(dtype, [NUM_STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_boxes = gl.allocate_shared_memory(dtype, [NUM_STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    kv_bars = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(kv_bars.index(i), count=1)
    q_tile = q_box.reshape([BLOCK_M, HEAD_D])

    # Line 4: load Q_i; and the first NUM_STAGES - 1 blocks of K and V.
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [batch, head, q_first, 0], q_bar, q_box)
    for step in gl.static_range(NUM_STAGES - 1):
        _load_kv(k_desc, v_desc, k_boxes, v_boxes, kv_bars, batch, kv_head, kv_start + step * BLOCK_N, step, n_steps,
                 NUM_STAGES)
    # Line 5: O~ = 0, l = 0, m = -inf (log2 units).
    row_max = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=s_rows)
    row_sum = gl.zeros([BLOCK_M], gl.float32, layout=s_rows)
    acc = gl.zeros([BLOCK_M, HEAD_D], gl.float32, layout=o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    queries = first_pos + gl.arange(0, BLOCK_M, layout=s_rows)  # positions
    mbarrier.wait(q_bar, phase=0)

    for step in range(n_steps):
        slot = step % NUM_STAGES
        kv_first = kv_start + step * BLOCK_N
        # Refill the slot that the previous block used: both warpgroups have waited for their
        # products of it (the CTA barrier) before one thread issues the copy.
        gl.thread_barrier()
        _load_kv(k_desc, v_desc, k_boxes, v_boxes, kv_bars, batch, kv_head, kv_first + (NUM_STAGES - 1) * BLOCK_N,
                 step + NUM_STAGES - 1, n_steps, NUM_STAGES)
        mbarrier.wait(kv_bars.index(slot), phase=(step // NUM_STAGES) & 1)
        k_tile = k_boxes.index(slot).reshape([BLOCK_N, HEAD_D])
        v_tile = v_boxes.index(slot).reshape([BLOCK_N, HEAD_D])
        # Line 8: S = Q K^T (K^T a permuted view of the K tile), in log2 units or softcapped:
        # c tanh(scale q.k / c) log2(e) = softcap_log2 * tanh(qk_scale q.k).
        s = warpgroup_mma(q_tile, k_tile.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
        if SOFTCAP:
            scores = (1.0 - 2.0 / (1.0 + gl.exp2(s * (qk_scale * 2.0 * LOG2_E)))) * softcap_log2
        else:
            scores = s * qk_scale
        # Mask the blocks that cross an edge of what every query sees, or the end of K.
        if (kv_first < all_lo) | (kv_first + BLOCK_N > all_hi):
            keys = kv_first + gl.arange(0, BLOCK_N, layout=s_cols)
            visible = gl.expand_dims(keys < n_k, 0)
            if WINDOW_LEFT:
                visible = visible & (gl.expand_dims(keys, 0) >= gl.expand_dims(queries - window_left, 1))
            if WINDOW_RIGHT:
                visible = visible & (gl.expand_dims(keys, 0) <= gl.expand_dims(queries + window_right, 1))
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
        acc = warpgroup_mma(p_operand, v_tile, acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))

    mbarrier.invalidate(q_bar)
    for i in gl.static_range(NUM_STAGES):
        mbarrier.invalidate(kv_bars.index(i))

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


def _descriptor(t, rows):
    """A TMA descriptor over a (B, H, N, D) tensor, boxes of (1, 1, rows, D)."""
    box = [1, 1, rows, t.shape[-1]]
    layout = gl.NVMMASharedLayout.get_default_for(box, GL_DTYPES[t.dtype])
    return TensorDescriptor(t, list(t.shape), list(t.stride()), box, layout)


def v2_hopper_forward(q, k, v, problem: Problem):
    """O and lse as v2.v2_forward, for a call that `supports` accepts."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(problem.stat_shape(q), device=q.device, dtype=torch.float32)
    block_n = BLOCK_N[problem.head_dim]
    args = problem.kernel_args
    grid = (problem.batch * problem.q_heads * ((problem.n_q + BLOCK_M - 1) // BLOCK_M),)
    _v2_hopper_forward_kernel[grid](
        _descriptor(q, BLOCK_M), _descriptor(k, block_n), _descriptor(v, block_n), _descriptor(out, BLOCK_M),
        lse, lse.stride(0), lse.stride(1), problem.q_heads, args["group"], problem.n_q, problem.n_k,
        args["qk_scale"], args["softcap_log2"], args["window_left"], args["window_right"],
        BLOCK_M, block_n, problem.head_dim, NUM_STAGES, args["WINDOW_LEFT"], args["WINDOW_RIGHT"], args["SOFTCAP"],
        num_warps=NUM_WARPS)
    return out, lse
