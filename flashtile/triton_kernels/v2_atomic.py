"""FlashAttention-2 with a single-kernel backward that accumulates dQ with atomic adds.

The forward is v2's (v2.py). The backward is FlashAttention-2's Algorithm 2 as the paper
writes it: one program per key block computes dK and dV over all query blocks and, in the
same pass, adds its contribution dQ_i += scale * dS_ij K_j to every query row it touches
(line 15, "Load dQ_i from HBM ... update ... write back", done here with atomic adds into a
float32 buffer, as in the paper's implementation). It is v2's dK/dV kernel compiled with
ATOMIC_DQ.

Against v2's deterministic backward this computes S and dP once instead of twice (5 matmuls
instead of 7) and needs no separate dQ kernel, at the cost of
- a float32 dQ buffer of q's size (O(N) per head), and
- non-determinism: floating-point addition is not associative and the order in which key
  blocks add into a dQ row changes between runs, so dQ may differ in its last bits from
  run to run (dK and dV do not: each is summed by one program, over the group in order).
"""
import torch

from ._common import Problem, d_contiguous, output_gradient
from . import v2
from .v2 import FlashAttentionV2Function, dkdv, v2_row_stats


def v2_atomic_backward(d_out, q, k, v, out, lse, problem: Problem):
    q, k, v, d_out = d_contiguous(q), d_contiguous(k), d_contiguous(v), d_out.contiguous()
    lse2, delta = v2_row_stats(out, d_out, lse, problem)
    dq_accum = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
    dk, dv = dkdv(q, k, v, d_out, lse2, delta, problem, dq_accum=dq_accum)
    return dq_accum.to(q.dtype), dk, dv


# forward / backward / SAVED_LIKE: the Function's two halves as plain functions, for
# flashtile.ops (torch.library). The forward is v2's.
SAVED_LIKE = v2.SAVED_LIKE
forward = v2.forward


def backward(d_out, q, k, v, out, lse, saved, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
             window_left, window_right, softcap):
    """(dq, dk, dv) from `forward`'s results."""
    problem = Problem.of(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
                         window_right, softcap)
    return v2_atomic_backward(d_out, q, k, v, out, lse, problem)


class FlashAttentionV2AtomicFunction(torch.autograd.Function):
    """FlashAttention-2 forward, atomic-dQ backward; the registry's contract (flashtile/registry.py)."""

    # The forward is v2's, saved tensors included.
    forward = staticmethod(FlashAttentionV2Function.forward)

    @staticmethod
    def backward(ctx, d_out, _d_lse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = v2_atomic_backward(output_gradient(d_out, out), q, k, v, out, lse, ctx.problem)
        return (dq, dk, dv) + (None,) * 8
