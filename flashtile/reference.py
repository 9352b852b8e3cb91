"""The one reference every implementation is judged by, and the one FLOP formula.

`attention_reference` is the obvious algorithm, in three visible steps (scores, a
softmax that tolerates rows with no visible key, the weighted sum), written with
plain PyTorch ops so that autograd gives the reference gradients. Called on float64
copies it is the truth; called on fp16/bf16 inputs it is "PyTorch's own computation
in the same precision", whose error sets the tolerance (FlashAttention-2's test rule).
"""
import math

import torch


def causal_visible(n_q: int, n_k: int, device=None) -> torch.Tensor:
    """(n_q, n_k) bool: query i sees key j iff j <= i + n_k - n_q.

    Bottom-right alignment, as FlashAttention-2 since 2.1: the last query sees every key.
    With n_q > n_k the first n_q - n_k queries see no key at all.
    """
    i = torch.arange(n_q, device=device)[:, None]
    j = torch.arange(n_k, device=device)[None, :]
    return j <= i + (n_k - n_q)


def attention_reference(q, k, v, causal=False, scale=None, upcast=True):
    """softmax(scale * q k^T) v over the last two dims; returns (out, lse).

    upcast=True computes in float64 (the truth); upcast=False stays in the inputs' dtype.
    Rows that see no key give out = 0 and lse = -inf (and zero gradients), never NaN.
    lse is the natural-log log-sum-exp of the scaled scores, float32 or float64.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if upcast:
        q, k, v = q.double(), k.double(), v.double()
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:
        visible = causal_visible(q.shape[-2], k.shape[-2], q.device)
        scores = scores.masked_fill(~visible, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)  # masked entries: exp(-inf) = 0
    row_sum = weights.sum(dim=-1, keepdim=True)
    sees_a_key = row_sum > 0
    probs = weights / torch.where(sees_a_key, row_sum, torch.ones_like(row_sum))
    out = torch.matmul(probs.to(v.dtype), v)
    lse = torch.where(sees_a_key, row_max + torch.log(row_sum), torch.full_like(row_sum, float("-inf")))
    return out, lse.squeeze(-1).detach().to(torch.float64 if upcast else torch.float32)


def attention_flops(batch, heads, n_q, n_k, head_dim, causal=False, mode="fwd"):
    """FLOPs as the FlashAttention papers count them.

    forward: 4 * B * H * Nq * Nk * D (two matmuls of 2 * Nq * Nk * D each), halved when
    causal; backward: 2.5x forward (five matmuls to the forward's two); "fwd_bwd" is
    their sum, 3.5x forward.
    """
    fwd = 4.0 * batch * heads * n_q * n_k * head_dim * (0.5 if causal else 1.0)
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd_bwd": 3.5 * fwd}[mode]
