"""impl="cuda": the hand-written tiled CUDA reference (cuda_reference/, bindings/).

FlashAttention-2's forward and backward (Dao 2023, Alg. 1 and 2) in plain CUDA C++, float32
arithmetic throughout, float32 outputs: its error against float64 is float32 rounding
(~1e-6 relative), far below the fp16/bf16 kernels'. It is built at install time as the
extension `flashtile._cuda_reference`: with nvcc and a CUDA build of torch, the CUDA kernels
plus the host build of the same algorithm; otherwise the host build alone, which runs on
CPU tensors (the CPU CI machine). Which one is installed: `is_built()`, `built_with_cuda()`.

`CudaReferenceAttentionFunction.apply(q, k, v, causal=False, scale=None)` returns (out, lse)
like the Triton implementations: out in the inputs' dtype (the float32 result rounded once),
lse float32. `forward_float32` / `backward_float32` give the unrounded float32 results.
"""
import importlib

import torch

_EXTENSION_NAME = "flashtile._cuda_reference"
_import_error = None


def _load():
    """The extension module, or None (the import error is kept for the message)."""
    global _import_error
    try:
        return importlib.import_module(_EXTENSION_NAME)
    except ImportError as error:
        _import_error = error
        return None


def is_built() -> bool:
    """Whether the extension (CUDA or host build) is importable."""
    return _load() is not None


def built_with_cuda() -> bool:
    """Whether the installed extension has the CUDA kernels (else it is the host build)."""
    module = _load()
    return module is not None and bool(module.with_cuda)


def extension():
    """The extension module; RuntimeError saying it was not built if it is not importable."""
    module = _load()
    if module is None:
        raise RuntimeError(
            "impl='cuda': flashtile's CUDA reference extension (flashtile._cuda_reference) was not built. "
            "It is compiled by `pip install -e . --no-build-isolation` when torch is importable at install "
            "time (with nvcc and a CUDA build of torch: the CUDA kernels; otherwise the CPU host build); "
            "reinstall with FLASHTILE_BUILD_EXTENSION=1 to see why the build failed. "
            f"(import error: {_import_error})")
    return module


def _check_device(q):
    if q.is_cuda and not built_with_cuda():
        raise RuntimeError(
            "impl='cuda' got CUDA tensors, but flashtile's CUDA reference was built without CUDA (the host "
            "build: torch without CUDA or no nvcc at install time); it runs on CPU tensors only")


def forward_float32(q, k, v, causal, scale):
    """(out, lse), both float32, of the reference; inputs as the bindings check them."""
    module = extension()
    _check_device(q)
    return tuple(module.forward(q, k, v, causal, float(scale)))


def backward_float32(d_out, q, k, v, out, lse, causal, scale):
    """(dq, dk, dv) float32; `out` and `lse` are forward_float32's (out unrounded)."""
    module = extension()
    _check_device(q)
    return tuple(module.backward(d_out, q, k, v, out, lse, causal, float(scale)))


class CudaReferenceAttentionFunction(torch.autograd.Function):
    """The CUDA reference: `CudaReferenceAttentionFunction.apply(q, k, v, causal=False,
    scale=None)` returns (out, lse); lse is not differentiable. Inputs are checked as
    flashtile.attention checks them for impl="cuda" (fp16, bf16 or fp32; CUDA tensors, or
    CPU tensors for the host build)."""

    @staticmethod
    def forward(ctx, q, k, v, causal=False, scale=None):
        from .interface import check_inputs

        scale = check_inputs(q, k, v, causal, scale, "cuda", False)
        out32, lse = forward_float32(q, k, v, causal, scale)
        # The backward's D_i = rowsum(dO_i * O_i) uses the float32 O, not the rounded copy.
        ctx.save_for_backward(q, k, v, out32, lse)
        ctx.causal, ctx.scale = causal, scale
        ctx.mark_non_differentiable(lse)
        return out32.to(q.dtype), lse

    @staticmethod
    def backward(ctx, d_out, _d_lse):
        q, k, v, out32, lse = ctx.saved_tensors
        if d_out is None:
            d_out = torch.zeros_like(q)
        dq, dk, dv = backward_float32(d_out.to(q.dtype), q, k, v, out32, lse, ctx.causal, ctx.scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None
