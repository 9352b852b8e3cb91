"""flashtile: FlashAttention-1 and FlashAttention-2 in Triton, forward and backward.

    import flashtile
    out = flashtile.attention(q, k, v, causal=True)            # v2
    out, lse = flashtile.attention(q, k, v, impl="v1", return_lse=True)
"""
from .interface import IMPLEMENTATIONS, attention
from .reference import attention_flops, attention_reference

__version__ = "0.1.0"


def __getattr__(name):
    # The autograd Function classes, importable from the top level without importing
    # (and autotuning) every kernel module when flashtile itself is imported.
    modules = {
        "FlashAttentionV1Function": ".triton_kernels.v1",
        "FlashAttentionV2Function": ".triton_kernels.v2",
        "FlashAttentionV2AtomicFunction": ".triton_kernels.v2_atomic",
        "CudaReferenceAttentionFunction": ".cuda_reference",  # impl="cuda"
    }
    if name in modules:
        import importlib

        return getattr(importlib.import_module(modules[name], __name__), name)
    raise AttributeError(f"module 'flashtile' has no attribute {name!r}")


__all__ = ["attention", "attention_reference", "attention_flops", "IMPLEMENTATIONS",
           "FlashAttentionV1Function", "FlashAttentionV2Function", "FlashAttentionV2AtomicFunction",
           "CudaReferenceAttentionFunction"]
