"""The one reference every implementation is judged by, and the one FLOP formula.

`attention_reference` is the obvious algorithm, in three visible steps (scores, a
softmax that tolerates rows with no visible key, the weighted sum), written with
plain PyTorch ops so that autograd gives the reference gradients. Called on float64
copies it is the truth; called on fp16/bf16 inputs it is "PyTorch's own computation
in the same precision", whose error sets the tolerance (FlashAttention-2's test rule).

The model features are spelled out here in their plainest form, as the definition the
kernels must meet:
- grouped-query attention: K/V heads are repeated (`repeat_interleave`) to the query heads;
  query head h reads K/V head h // (Hq // Hkv). Autograd sums dK/dV over each group.
- a window (left, right): query i, at position p = i + Nk - Nq (bottom-right aligned, as
  causal), sees key j iff p - left <= j <= p + right; -1 leaves a side unbounded, and
  causal is right = 0.
- softcap c > 0: scores become c * tanh(scale * q.k / c).
- varlen: `varlen_attention_reference` runs each packed sequence on its own.
"""
import math

import torch


def visible_keys(n_q: int, n_k: int, window=(-1, -1), device=None) -> torch.Tensor:
    """(n_q, n_k) bool: whether query i sees key j under a (left, right) window.

    Positions are bottom-right aligned (FlashAttention-2 since 2.1): query i sits at
    p = i + n_k - n_q, so the last query is level with the last key. window (-1, 0) is
    causal; (-1, -1) sees everything. With n_q > n_k and right = 0, the first n_q - n_k
    queries see no key at all.
    """
    left, right = window
    i = torch.arange(n_q, device=device)[:, None]
    j = torch.arange(n_k, device=device)[None, :]
    position = i + (n_k - n_q)
    visible = torch.ones(n_q, n_k, dtype=torch.bool, device=device)
    if left >= 0:
        visible &= j >= position - left
    if right >= 0:
        visible &= j <= position + right
    return visible


def causal_visible(n_q: int, n_k: int, device=None) -> torch.Tensor:
    """(n_q, n_k) bool: query i sees key j iff j <= i + n_k - n_q (the window (-1, 0))."""
    return visible_keys(n_q, n_k, (-1, 0), device)


def effective_window(causal: bool, window_size=(-1, -1)):
    """(left, right) with causal folded in: causal means right = 0 (as FlashAttention-2)."""
    left, right = window_size
    return (left, 0) if causal else (left, right)


def attention_reference(q, k, v, causal=False, scale=None, upcast=True, window_size=(-1, -1), softcap=0.0):
    """softmax(scores) v over the last two dims; returns (out, lse).

    q: (..., Hq, Nq, D); k, v: (..., Hkv, Nk, D) with Hq a multiple of Hkv.
    scores = scale * q k^T, or softcap * tanh(scale * q k^T / softcap) when softcap > 0,
    with keys outside the window (causal folded in as right = 0) masked out.
    upcast=True computes in float64 (the truth); upcast=False stays in the inputs' dtype.
    Rows that see no key give out = 0 and lse = -inf (and zero gradients), never NaN.
    lse is the natural-log log-sum-exp of the scores, float32 or float64.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if upcast:
        q, k, v = q.double(), k.double(), v.double()
    if q.dim() >= 3 and k.shape[-3] != q.shape[-3]:
        group = q.shape[-3] // k.shape[-3]
        k = k.repeat_interleave(group, dim=-3)
        v = v.repeat_interleave(group, dim=-3)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    window = effective_window(causal, window_size)
    if window != (-1, -1):
        visible = visible_keys(q.shape[-2], k.shape[-2], window, q.device)
        scores = scores.masked_fill(~visible, float("-inf"))
    if scores.shape[-1] == 0:  # no keys at all (an empty sequence in a varlen batch)
        row_max = scores.new_full(scores.shape[:-1] + (1,), float("-inf"))
    else:
        row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)  # masked entries: exp(-inf) = 0
    row_sum = weights.sum(dim=-1, keepdim=True)
    sees_a_key = row_sum > 0
    probs = weights / torch.where(sees_a_key, row_sum, torch.ones_like(row_sum))
    out = torch.matmul(probs.to(v.dtype), v)
    lse = torch.where(sees_a_key, row_max + torch.log(row_sum), torch.full_like(row_sum, float("-inf")))
    return out, lse.squeeze(-1).detach().to(torch.float64 if upcast else torch.float32)


def varlen_attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=False, scale=None, upcast=True,
                               window_size=(-1, -1), softcap=0.0):
    """attention_reference on each packed sequence: q (total_q, Hq, D), k, v (total_k, Hkv, D).

    Sequence b is rows cu_seqlens_q[b]:cu_seqlens_q[b+1] of q and cu_seqlens_k[b]:... of k, v.
    Returns out (total_q, Hq, D) and lse (Hq, total_q), FlashAttention-2's varlen layouts.
    """
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for b in range(len(starts_q) - 1):
        q_b = q[starts_q[b]:starts_q[b + 1]].transpose(0, 1)  # (Hq, n_q, D)
        k_b = k[starts_k[b]:starts_k[b + 1]].transpose(0, 1)
        v_b = v[starts_k[b]:starts_k[b + 1]].transpose(0, 1)
        out, lse = attention_reference(q_b, k_b, v_b, causal, scale, upcast, window_size, softcap)
        outs.append(out.transpose(0, 1))
        lses.append(lse)
    return torch.cat(outs, 0), torch.cat(lses, 1)


def visible_pairs(n_q: int, n_k: int, causal=False, window_size=(-1, -1)) -> int:
    """How many (query, key) pairs are visible: what a kernel that skips hidden blocks works on."""
    left, right = effective_window(causal, window_size)
    if (left, right) == (-1, -1):
        return n_q * n_k
    total = 0
    for i in range(n_q):
        p = i + n_k - n_q
        lo = 0 if left < 0 else max(0, p - left)
        hi = n_k - 1 if right < 0 else min(n_k - 1, p + right)
        total += max(0, hi - lo + 1)
    return total


def attention_flops(batch, heads, n_q, n_k, head_dim, causal=False, mode="fwd", window_size=(-1, -1)):
    """FLOPs as the FlashAttention papers count them.

    forward: 4 * B * H * Nq * Nk * D (two matmuls of 2 * Nq * Nk * D each), halved when
    causal (the papers' convention); with a window, counted over the visible keys;
    backward: 2.5x forward (five matmuls to the forward's two); "fwd_bwd" is their sum,
    3.5x forward.
    """
    if tuple(window_size) == (-1, -1):
        pairs = n_q * n_k * (0.5 if causal else 1.0)
    else:
        pairs = visible_pairs(n_q, n_k, causal, window_size)
    fwd = 4.0 * batch * heads * pairs * head_dim
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd_bwd": 3.5 * fwd}[mode]
