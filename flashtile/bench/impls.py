"""What the benchmark measures: flashtile's implementations, named only by the registry, and
PyTorch's peers, defined here once.

Every contender is made by `attention_fn(name, ...)`, which returns f(q, k, v) -> out for
q (B, Hq, Nq, D) and k, v (B, Hkv, Nk, D). A contender that cannot express the requested work
raises Unsupported when called, and the point is recorded as not applicable.

Peers:
- sdpa_flash, sdpa_cudnn, sdpa_efficient: torch.nn.functional.scaled_dot_product_attention
  restricted to one backend (sdpa_kernel), enable_gqa when Hq != Hkv. No window, no softcap.
- flex: FlexAttention, torch.compile(flex_attention) on the GPU with a block mask for
  causal / window (create_block_mask, made once per shape, outside the timings) and a tanh
  score_mod for softcap. On the CPU it runs uncompiled (Inductor's CPU compile alone takes
  longer than a quick run) and has no backward.
- naive: flashtile.reference.attention_reference in the inputs' dtype, softmax(scores) v in
  plain PyTorch ops with the N x N scores stored (every feature, and the memory to show it).
"""
import functools
import warnings

import torch

from ..reference import attention_reference
from ..registry import IMPLEMENTATIONS, TRITON_IMPLEMENTATIONS

SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION",
                 "sdpa_efficient": "EFFICIENT_ATTENTION"}
PEERS = tuple(SDPA_BACKENDS) + ("flex", "naive")
ALL_IMPLS = IMPLEMENTATIONS + PEERS
# The SDPA backends that exist on a CPU build of PyTorch (cuDNN and efficient are CUDA only).
CPU_SDPA = ("sdpa_flash",)


class Unsupported(Exception):
    """This contender cannot do the requested work (a table shows n.a. with the reason)."""


def cuda_reference_built() -> bool:
    """True when the CUDA reference's extension is built in this install."""
    try:
        from .. import cuda_reference

        return bool(cuda_reference.is_built())
    except Exception:  # noqa: BLE001 - a half-built or broken extension counts as not built
        return False


def default_impls(on_gpu: bool):
    """Every contender that can run on this machine."""
    names = [name for name in IMPLEMENTATIONS if name in TRITON_IMPLEMENTATIONS or cuda_reference_built()]
    peers = [name for name in PEERS if on_gpu or name not in SDPA_BACKENDS or name in CPU_SDPA]
    return names + peers


def attention_fn(name, causal=False, window_size=(-1, -1), softcap=0.0):
    """f(q, k, v) -> out computing attention with these options, by contender `name`."""
    window_size = tuple(window_size)
    if name in IMPLEMENTATIONS:
        return _flashtile_fn(name, causal, window_size, softcap)
    if name in SDPA_BACKENDS:
        return _sdpa_fn(SDPA_BACKENDS[name], causal, window_size, softcap)
    if name == "flex":
        return flex_fn(mask_mod=window_mask_mod(causal, window_size), score_mod=softcap_score_mod(softcap))
    if name == "naive":
        return lambda q, k, v: attention_reference(q, k, v, causal=causal, upcast=False,
                                                   window_size=window_size, softcap=softcap)[0]
    raise ValueError(f"unknown implementation {name!r}; known: {', '.join(ALL_IMPLS)}")


def _flashtile_fn(name, causal, window_size, softcap):
    import flashtile

    # The feature arguments only when used, so that plain attention is called exactly as a user would.
    features = {}
    if window_size != (-1, -1):
        features["window_size"] = window_size
    if softcap:
        features["softcap"] = softcap
    return lambda q, k, v: flashtile.attention(q, k, v, causal=causal, impl=name, **features)


def _sdpa_fn(backend_name, causal, window_size, softcap):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def sdpa(q, k, v):
        if window_size != (-1, -1) or softcap:
            raise Unsupported("SDPA has no sliding window or softcap")
        if causal and q.shape[-2] != k.shape[-2]:
            raise Unsupported("SDPA's is_causal is top-left aligned; flashtile's causal is bottom-right")
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])

    return sdpa


@functools.lru_cache(maxsize=None)
def window_mask_mod(causal, window_size):
    """FlexAttention's mask_mod for flashtile's (left, right) window (causal is right = 0),
    bottom-right aligned: query i at p = i + Nk - Nq sees key j iff p - left <= j <= p + right.
    Returns (n_q, n_k) -> mask_mod, or None when every key is visible. Both cached: the same
    function objects for the same work, so that the compiled flex_attention is reused across
    parts instead of compiled again for a new closure."""
    left, right = (window_size[0], 0) if causal else window_size
    if (left, right) == (-1, -1):
        return None

    @functools.lru_cache(maxsize=None)
    def for_shape(n_q, n_k):
        def mask_mod(b, h, q_idx, kv_idx):
            position = q_idx + (n_k - n_q)
            conditions = ([kv_idx >= position - left] if left >= 0 else []) + \
                         ([kv_idx <= position + right] if right >= 0 else [])
            return functools.reduce(lambda a, b: a & b, conditions)

        return mask_mod

    return for_shape


def softcap_score_mod(softcap):
    """FlexAttention's score_mod for a softcap c > 0: c * tanh(score / c) (flex has scaled the score)."""
    if not softcap:
        return None
    return lambda score, b, h, q_idx, kv_idx: softcap * torch.tanh(score / softcap)


@functools.lru_cache(maxsize=None)
def _flex_attention(compiled):
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    # One compiled kernel per shape and mask: the benchmark's grid needs more recompilations
    # than dynamo's default limit (8), past which it would silently fall back to eager flex.
    for limit in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 1024))
    return torch.compile(flex_attention, dynamic=False)


def flex_fn(mask_mod=None, score_mod=None):
    """f(q, k, v) -> out by FlexAttention. mask_mod: (n_q, n_k) -> mask_mod, or None.
    The block mask is made on the first call of each shape and reused (not timed after that)."""
    def flex(q, k, v):
        n_q, n_k = q.shape[-2], k.shape[-2]
        block_mask = None if mask_mod is None else _block_mask(mask_mod, n_q, n_k, q.device)
        on_gpu = q.device.type == "cuda"

        def run(q, k, v):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # flex's warning that it runs uncompiled (the CPU, on purpose)
                return _flex_attention(on_gpu)(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                               enable_gqa=q.shape[1] != k.shape[1])

        if on_gpu:
            return run(q, k, v)
        # Flex refuses CPU inputs that require grad, even for the forward (and under no_grad):
        # run it on the values, and let only an actual backward fail.
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            return _ForwardOnly.apply(q, k, v, run)
        return run(q.detach(), k.detach(), v.detach())

    return flex


@functools.lru_cache(maxsize=64)
def _block_mask(mask_mod, n_q, n_k, device):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(mask_mod(n_q, n_k), None, None, n_q, n_k, device=device)


class _ForwardOnly(torch.autograd.Function):
    """run(q, k, v) as the forward of a node whose backward raises Unsupported."""

    @staticmethod
    def forward(ctx, q, k, v, run):
        return run(q.detach(), k.detach(), v.detach())

    @staticmethod
    def backward(ctx, grad_out):
        raise Unsupported("FlexAttention has no backward on the CPU")
