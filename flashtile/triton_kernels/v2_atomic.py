"""FlashAttention-2 with a single-kernel backward that accumulates dQ with atomic adds.

The forward is v2's (v2.py). The backward is FlashAttention-2's Algorithm 2 as the paper
writes it: one program per key block computes dK and dV over all query blocks and, in the
same pass, adds its contribution dQ_i += scale * dS_ij K_j to every query row it touches
(line 14, "Read dQ_i from HBM, update, write back", done here with atomic adds into a
float32 buffer, as in the paper's implementation).

Against v2's deterministic backward this computes S and dP once instead of twice (5 matmuls
instead of 7) and needs no separate dQ kernel, at the cost of
- a float32 dQ buffer of B*H*Nq*D elements (O(N) per head), and
- non-determinism: floating-point addition is not associative and the order in which key
  blocks add into a dQ row changes between runs, so dQ may differ in its last bits from
  run to run (dK and dV do not).
"""
import torch
import triton
import triton.language as tl

from ._common import LOG2_E, autotuned, seq_bucket
from .v2 import FlashAttentionV2Function, dkdv_program, shape_args, v2_delta


@autotuned("backward", owned="BLOCK_N", looped="BLOCK_M", reset_to_zero=["DQ_ACCUM"])
@triton.jit
def _v2_atomic_backward_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACCUM,
                               stride_qb, stride_qh, stride_qn, stride_qd,
                               stride_kb, stride_kh, stride_kn, stride_kd,
                               stride_vb, stride_vh, stride_vn, stride_vd,
                               stride_dob, stride_doh, stride_don, stride_dod,
                               stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                               stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                               n_heads, n_q, n_k, scale, qk_scale, q_bucket, k_bucket,
                               head_dim, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, IS_CAUSAL: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    dkdv_program(Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACCUM,
                 stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                 stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_don, stride_dod,
                 stride_dkb, stride_dkh, stride_dkn, stride_dkd, stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                 n_heads, n_q, n_k, scale, qk_scale, head_dim, BLOCK_D, EVEN_D, IS_CAUSAL, BLOCK_M, BLOCK_N, True)


def v2_atomic_backward(d_out, q, k, v, out, lse, causal, scale):
    (B, H, n_q, n_k, D), dims = shape_args(q, k)
    delta = v2_delta(out, d_out)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    dq_accum = torch.zeros((B, H, n_q, D), device=q.device, dtype=torch.float32)
    key_grid = lambda meta: (triton.cdiv(n_k, meta["BLOCK_N"]) * B * H,)
    _v2_atomic_backward_kernel[key_grid](
        q, k, v, d_out, lse, delta, dk, dv, dq_accum,
        *q.stride(), *k.stride(), *v.stride(), *d_out.stride(), *dk.stride(), *dv.stride(),
        H, n_q, n_k, scale, scale * LOG2_E.value, seq_bucket(n_q), seq_bucket(n_k),
        IS_CAUSAL=causal, **dims)
    return dq_accum.to(q.dtype), dk, dv


class FlashAttentionV2AtomicFunction(torch.autograd.Function):
    """FlashAttention-2 forward, atomic-dQ backward:
    `FlashAttentionV2AtomicFunction.apply(q, k, v, causal=False, scale=None)` -> (out, lse)."""

    # The forward is v2's, input checks and saved tensors included.
    forward = staticmethod(FlashAttentionV2Function.forward)

    @staticmethod
    def backward(ctx, d_out, _d_lse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = v2_atomic_backward(d_out, q, k, v, out, lse, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None
