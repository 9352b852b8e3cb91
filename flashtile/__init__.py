"""flashtile: FlashAttention-1 and FlashAttention-2 in Triton, forward and backward.

    import flashtile
    out = flashtile.attention(q, k, v, causal=True)            # v2
    out, lse = flashtile.attention(q, k, v, impl="v1", return_lse=True)
    out = flashtile.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=True)
"""
from .interface import attention, varlen_attention
from .reference import attention_flops, attention_reference
from .registry import IMPLEMENTATIONS, REGISTRY

__version__ = "0.2.0"


def __getattr__(name):
    # The autograd Function classes, importable from the top level without importing (and
    # compiling) every kernel module when flashtile itself is imported.
    for entry in REGISTRY.values():
        if entry.function == name:
            return entry.load()
    raise AttributeError(f"module 'flashtile' has no attribute {name!r}")


__all__ = ["attention", "varlen_attention", "attention_reference", "attention_flops", "IMPLEMENTATIONS",
           "FlashAttentionV1Function", "FlashAttentionV2Function", "FlashAttentionV2AtomicFunction",
           "CudaReferenceAttentionFunction"]
