"""impl="cuda": the hand-written tiled CUDA reference (cuda_reference/, bindings/).

FlashAttention-2's forward and backward (Dao 2023, Alg. 1 and 2) in plain CUDA C++, float32
arithmetic throughout, float32 outputs: its error against float64 is float32 rounding
(~1e-6 relative), far below the fp16/bf16 kernels'. It has the features of every
implementation: grouped-query attention (K/V never repeated), a (left, right) window with
bottom-right alignment (causal is right = 0; tiles outside the window are skipped), a
softcap, and the varlen layout. It is an extension built ahead of time
(`flashtile._cuda_reference`, by setup.py when the install sees torch) or else on first use
(flashtile/_extension_build.py): with nvcc and a CUDA build of torch, the CUDA kernels plus
the host build of the same algorithm; otherwise the host build alone, which runs on CPU
tensors. Which one is available: `is_built()`, `built_with_cuda()`.

`CudaReferenceAttentionFunction.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
max_seqlen_k, scale, window_left, window_right, softcap)` returns (out, lse) as the registry
says (flashtile/registry.py): out in the inputs' dtype (the float32 result rounded once), lse
float32. `forward_float32` / `backward_float32` / `float32_results` give the unrounded
float32 results.
"""
import importlib
import math
import os

import torch

_EXTENSION_NAME = "flashtile._cuda_reference"
_import_error = None  # why the extension is not available (for the message)
_jit_module = None  # the extension built on first use, once per process
_jit_error = None  # a failed build on first use, raised again rather than retried


def _load():
    """The extension module, or None when it is not available (the reason is kept).

    The ahead-of-time build (`flashtile._cuda_reference`) if installed, else the build on
    first use (flashtile/_extension_build.py: compiled once with ninja, then cached), unless
    FLASHTILE_BUILD_EXTENSION=0. A failed build on first use raises RuntimeError with the
    compiler's output: a broken reference is never silently missing."""
    global _import_error, _jit_module, _jit_error
    try:
        return importlib.import_module(_EXTENSION_NAME)
    except ImportError as error:
        _import_error = error
    if os.environ.get("FLASHTILE_BUILD_EXTENSION") == "0":
        _import_error = "not installed, and FLASHTILE_BUILD_EXTENSION=0 turns off the build on first use"
        return None
    if _jit_module is None and _jit_error is None:
        from . import _extension_build

        try:
            _jit_module = _extension_build.jit_build()
        except FileNotFoundError as error:
            _import_error = error
            return None
        except Exception as error:  # the compiler's or ninja's message
            _jit_error = RuntimeError(f"impl='cuda': compiling flashtile's CUDA reference failed: {error}")
    if _jit_error is not None:
        raise _jit_error
    return _jit_module


def is_built() -> bool:
    """Whether the extension (CUDA or host build) is available, compiling it on first use.
    False only where it cannot be built (no sources beside flashtile, or
    FLASHTILE_BUILD_EXTENSION=0); a failed compile raises RuntimeError."""
    return _load() is not None


def built_with_cuda() -> bool:
    """Whether the extension has the CUDA kernels (else it is the host build)."""
    module = _load()
    return module is not None and bool(module.with_cuda)


def extension():
    """The extension module; RuntimeError saying why when it is not available."""
    module = _load()
    if module is None:
        raise RuntimeError(
            "impl='cuda': flashtile's CUDA reference extension was not built "
            f"({_import_error}). From a checkout, `pip install -e .` compiles it on first use "
            "(needs a C++ compiler; nvcc and a CUDA build of torch for the CUDA kernels), and "
            "`pip install -e . --no-build-isolation` compiles it at install time.")
    return module


def _check_device(q):
    if q.is_cuda and not built_with_cuda():
        raise RuntimeError(
            "impl='cuda' got CUDA tensors, but flashtile's CUDA reference was built without CUDA (the host "
            "build: torch without CUDA or no nvcc at install time); it runs on CPU tensors only")


def _max_seqlen(cu_seqlens, max_seqlen):
    """max_seqlen, or when None the longest sequence of cu_seqlens (one host sync)."""
    if max_seqlen is not None:
        return int(max_seqlen)
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item()) if cu_seqlens.numel() > 1 else 0


def _problem(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left, window_right,
             softcap):
    """The bindings' trailing arguments: cu_seqlens, max_seqlen (varlen only), scale (None:
    1/sqrt(D)), window sides, softcap, converted to the types the bindings take."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if cu_seqlens_q is not None and cu_seqlens_k is not None:
        max_seqlen_q = _max_seqlen(cu_seqlens_q, max_seqlen_q)
        max_seqlen_k = _max_seqlen(cu_seqlens_k, max_seqlen_k)
    else:
        max_seqlen_q = max_seqlen_k = None  # dense: the lengths are q's and k's
    return (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, float(scale), int(window_left),
            int(window_right), float(softcap))


def forward_float32(q, k, v, *, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                    scale=None, window_left=-1, window_right=-1, softcap=0.0):
    """(out, lse), both float32, of the reference; inputs as the bindings check them.

    Dense: q (B, Hq, Nq, D), k, v (B, Hkv, Nk, D); out (B, Hq, Nq, D), lse (B, Hq, Nq).
    Varlen (cu_seqlens_* int32 (B + 1,) on q's device): q (total_q, Hq, D), k, v
    (total_k, Hkv, D); out (total_q, Hq, D), lse (Hq, total_q). max_seqlen_* None: computed.
    Window sides -1 (unbounded) or >= 0 with causal folded in as right = 0; softcap 0 is off.
    """
    module = extension()
    _check_device(q)
    return tuple(module.forward(q, k, v, *_problem(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                                                   window_left, window_right, softcap)))


def backward_float32(d_out, q, k, v, out, lse, *, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                     max_seqlen_k=None, scale=None, window_left=-1, window_right=-1, softcap=0.0):
    """(dq, dk, dv) float32 (dk, dv with k's Hkv heads); `out` and `lse` are forward_float32's
    (out unrounded); the other arguments as forward_float32's."""
    module = extension()
    _check_device(q)
    return tuple(module.backward(d_out, q, k, v, out, lse, *_problem(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                                     max_seqlen_k, scale, window_left, window_right,
                                                                     softcap)))


# forward / backward / SAVED_LIKE: the Function's two halves as plain functions, for
# flashtile.ops (torch.library), where the op, not an autograd Function, keeps the saved tensors.
SAVED_LIKE = ("out",)  # the float32 out, shaped like out


def forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left, window_right,
            softcap):
    """(out, lse, (out32,)): the backward's D_i = rowsum(dO_i * O_i) uses the float32 O."""
    out32, lse = forward_float32(q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                 max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, scale=scale,
                                 window_left=window_left, window_right=window_right, softcap=softcap)
    # copy=True: with float32 inputs, out must still be a tensor of its own (an op's outputs never alias)
    return out32.to(q.dtype, copy=True), lse, (out32,)


def backward(d_out, q, k, v, out, lse, saved, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
             window_left, window_right, softcap):
    """(dq, dk, dv) in the inputs' dtype, from `forward`'s results."""
    (out32,) = saved
    dq, dk, dv = backward_float32(d_out.to(q.dtype), q, k, v, out32, lse, cu_seqlens_q=cu_seqlens_q,
                                  cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                                  scale=scale, window_left=window_left, window_right=window_right, softcap=softcap)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class CudaReferenceAttentionFunction(torch.autograd.Function):
    """The CUDA reference as the registry's Function (flashtile/registry.py):
    `apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
    window_right, softcap)` returns (out, lse); lse is not differentiable. The inputs are
    flashtile's interface's, already checked (the bindings check again for their own callers)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
                window_right, softcap):
        problem = dict(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                       max_seqlen_k=max_seqlen_k, scale=scale, window_left=window_left, window_right=window_right,
                       softcap=softcap)
        out32, lse = forward_float32(q, k, v, **problem)
        # The backward's D_i = rowsum(dO_i * O_i) uses the float32 O, not the rounded copy.
        ctx.save_for_backward(q, k, v, out32, lse)
        ctx.problem = problem
        ctx.mark_non_differentiable(lse)
        return out32.to(q.dtype), lse

    @staticmethod
    def backward(ctx, d_out, _d_lse):
        q, k, v, out32, lse = ctx.saved_tensors
        if d_out is None:
            d_out = torch.zeros_like(q)
        dq, dk, dv = backward_float32(d_out.to(q.dtype), q, k, v, out32, lse, **ctx.problem)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)) + (None,) * 8


# ---------------------------------------------------------------------------------------
# The reference's own accuracy rule (tests/test_cuda_reference.py, tests/test_parity.py)
# ---------------------------------------------------------------------------------------
#
# Every operation is float32 (unit roundoff u = 2^-24 = 6e-8) and every input converts to
# float32 exactly, so the float32 results differ from float64 by float32 rounding alone:
# dot products of D <= 256 terms, sums over up to N ~ 4k keys or queries (accumulated in
# 32-wide tiles), exp and log. Measured on the host build: 3e-7 to 3e-6 of max|f64| for out,
# dq, dk, dv (N up to 4097, D up to 256). REFERENCE_RTOL = 2e-5 leaves 5-10x room over that,
# and is still 25x below half an fp16 ulp (2^-11 = 4.9e-4, relative) and 200x below a bf16
# one (3.9e-3): any low-precision step anywhere in the computation breaks it.
# Rounded results (out, dq, dk, dv in fp16/bf16, as flashtile.attention returns them) may
# in addition be off by the final rounding, half an ulp of the dtype at each value.
# lse is float32: m + log(l), with m one score (error ~ D u |s|) and l a sum of N terms:
# REFERENCE_LSE_ATOL = 1e-5 (~10x the 1e-6 measured) plus 2e-6 |lse| for large scores.
REFERENCE_RTOL = 2e-5
REFERENCE_LSE_ATOL = 1e-5
REFERENCE_LSE_RTOL = 2e-6


def half_ulp(dtype, reference):
    """Half the spacing of `dtype` at each element of `reference` (0 for float32/float64)."""
    if dtype in (torch.float32, torch.float64):
        return torch.zeros_like(reference)
    finfo = torch.finfo(dtype)
    magnitude = reference.abs().clamp_min(finfo.tiny)
    return 0.5 * finfo.eps * torch.exp2(torch.floor(torch.log2(magnitude)))


def reference_problems(results, f64, dtype=torch.float32):
    """What breaks the reference's rule, as a list of strings (empty: it holds).

    results, f64: dicts with "out", "lse" and optionally "dq", "dk", "dv" (as
    flashtile.testing.run_attention returns them). dtype: the dtype the results were
    rounded to (float32 for the unrounded results of forward_float32 / backward_float32).
    For out, dq, dk, dv, elementwise: |x - f64| <= half_ulp(dtype, f64) + REFERENCE_RTOL * max|f64|.
    lse: -inf exactly where f64 is -inf, else |lse - f64| <= ATOL + RTOL |f64|. No NaN.
    """
    problems = []
    for name in ("out", "dq", "dk", "dv"):
        x, truth = results.get(name), f64.get(name)
        if x is None or truth is None:
            continue
        if x.shape != truth.shape:
            problems.append(f"{name}: shape {tuple(x.shape)}, expected {tuple(truth.shape)}")
            continue
        if x.numel() == 0:
            continue
        if torch.isnan(x).any():
            problems.append(f"{name} contains NaN")
            continue
        truth = truth.double()
        err = (x.double() - truth).abs()
        scale = truth.abs().max().item()
        bound = half_ulp(dtype, truth).double() + REFERENCE_RTOL * scale
        if not bool((err <= bound).all()):
            worst = int((err - bound).argmax())
            problems.append(f"{name}: max|x - f64| = {err.max().item():.3e} (max|f64| {scale:.3e}, "
                            f"relative {err.max().item() / max(scale, 1e-300):.2e}); the worst element is off by "
                            f"{err.flatten()[worst].item():.3e} > its bound {bound.flatten()[worst].item():.3e}")
    lse, truth = results.get("lse"), f64.get("lse")
    if lse is not None and truth is not None:
        if lse.dtype != torch.float32:
            problems.append(f"lse has dtype {lse.dtype}, expected torch.float32")
        if lse.shape != truth.shape:
            problems.append(f"lse: shape {tuple(lse.shape)}, expected {tuple(truth.shape)}")
        elif lse.numel():
            if torch.isnan(lse).any():
                problems.append("lse contains NaN")
            inf_mismatch = int(((lse == float("-inf")) != (truth == float("-inf"))).sum())
            inf_mismatch += int((lse == float("inf")).sum())
            if inf_mismatch:
                problems.append(f"lse: {inf_mismatch} entries -inf (or +inf) in one of impl / f64 only")
            finite = torch.isfinite(truth)
            if finite.any():
                diff = (lse.double()[finite] - truth.double()[finite]).abs()
                bound = REFERENCE_LSE_ATOL + REFERENCE_LSE_RTOL * truth.double()[finite].abs()
                if not bool((diff <= bound).all()):
                    problems.append(f"lse: max|lse - f64| = {diff.max().item():.3e} exceeds "
                                    f"{REFERENCE_LSE_ATOL:g} + {REFERENCE_LSE_RTOL:g} |f64|")
    return problems


def float32_results(q, k, v, *, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                    scale=None, window_left=-1, window_right=-1, softcap=0.0, d_out=None):
    """The reference's unrounded float32 results as a dict like run_attention's (the
    arguments as forward_float32's; the gradients, of sum(out * d_out), when d_out is given)."""
    problem = dict(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                   max_seqlen_k=max_seqlen_k, scale=scale, window_left=window_left, window_right=window_right,
                   softcap=softcap)
    out, lse = forward_float32(q, k, v, **problem)
    result = {"out": out, "lse": lse, "dq": None, "dk": None, "dv": None}
    if d_out is not None:
        result["dq"], result["dk"], result["dv"] = backward_float32(d_out, q, k, v, out, lse, **problem)
    return result
