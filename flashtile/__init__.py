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
    classes = {
        "FlashAttentionV1Function": "v1",
        "FlashAttentionV2Function": "v2",
        "FlashAttentionV2AtomicFunction": "v2_atomic",
    }
    if name in classes:
        import importlib

        module = importlib.import_module(f".triton_kernels.{classes[name]}", __name__)
        return getattr(module, name)
    if name == "CudaReferenceAttentionFunction":  # impl="cuda" (flashtile/cuda_reference.py)
        from .cuda_reference import CudaReferenceAttentionFunction

        return CudaReferenceAttentionFunction
    raise AttributeError(f"module 'flashtile' has no attribute {name!r}")


__all__ = ["attention", "attention_reference", "attention_flops", "IMPLEMENTATIONS",
           "FlashAttentionV1Function", "FlashAttentionV2Function", "FlashAttentionV2AtomicFunction",
           "CudaReferenceAttentionFunction"]
