"""`flashtile.attention` and `flashtile.varlen_attention`: argument checking and dispatch.

Every check happens here, once, before any kernel runs; the kernels assume valid input
(the split FlashAttention's own interface makes). Errors name the argument and the problem.
The implementation is taken from the one registry (flashtile/registry.py) and called through
flashtile/ops.py: its torch.library operator under torch.compile, its Function in eager mode.
"""
import functools
import math
import os
import warnings

import torch

from . import ops
from .registry import DEFAULT_IMPLEMENTATION, IMPLEMENTATIONS, REGISTRY

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
# The CUDA reference (impl="cuda") computes in float32 and takes float32 inputs too.
REFERENCE_DTYPES = SUPPORTED_DTYPES + (torch.float32,)
MAX_HEAD_DIM = 256


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_impl(impl):
    if not isinstance(impl, str):
        raise TypeError(f"impl must be a str, got {type(impl).__name__}")
    if impl not in REGISTRY:
        raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")


def _check_tensors(q, k, v, impl, dims, layout):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != dims:
            raise ValueError(f"{name} must be {dims}-D {layout}, got shape {tuple(t.shape)}")
    reference = impl == "cuda"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in (REFERENCE_DTYPES if reference else SUPPORTED_DTYPES):
            raise TypeError(f"{name} has dtype {t.dtype}; flashtile supports torch.float16 and torch.bfloat16 "
                            "(and torch.float32 with impl='cuda')")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if reference:
        # The CUDA reference runs CUDA tensors, and CPU tensors in its host build (the
        # extension checks which build is installed).
        if q.device.type not in ("cuda", "cpu"):
            raise ValueError(f"q, k, v are on {q.device}; impl='cuda' needs CUDA (or CPU) tensors")
    elif q.device.type != "cuda" and not _interpreting():
        raise ValueError(f"q, k, v are on {q.device}; flashtile's kernels need CUDA tensors "
                         "(or TRITON_INTERPRET=1 to run them on the CPU interpreter)")


def _cuda_capability(t):
    """10 * major + minor of the GPU holding `t`; None for other devices and under the interpreter."""
    if t.device.type != "cuda" or _interpreting():
        return None
    return _device_capability(t.device)


@functools.lru_cache(maxsize=None)
def _device_capability(device):
    # A GPU's capability never changes, and asking torch for it (device properties) costs tens
    # of microseconds, on every call: once per device (a CUDA tensor's device has its index).
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


_warned_no_tensor_cores = False


def _check_gpu_support(q, impl):
    """What the GPU itself rules out, for the Triton implementations: GPUs before sm_80 (Turing's
    T4 among them) have no bfloat16 arithmetic; and on Turing, Triton 3.3 and later emit no
    tensor-core instructions, so flashtile runs there several times slower than with Triton 3.2
    (warned once per process)."""
    global _warned_no_tensor_cores
    capability = _cuda_capability(q)
    if capability is None or not REGISTRY[impl].triton:
        return
    if capability < 80 and q.dtype == torch.bfloat16:
        raise TypeError(f"q, k, v have dtype torch.bfloat16, which sm_{capability} GPUs cannot compute in "
                        f"(bfloat16 needs sm_80 or later); use torch.float16 on this GPU")
    if capability // 10 == 7 and not _warned_no_tensor_cores:
        from .triton_kernels import _compat

        if not _compat.turing_tensor_cores():
            _warned_no_tensor_cores = True
            warnings.warn(f"Triton {_compat.triton.__version__} compiles flashtile's kernels for sm_{capability} "
                          f"without tensor cores (several times slower). For tensor cores on a T4: "
                          f"{_compat.TURING_TRITON_PIP}", RuntimeWarning, stacklevel=3)


def _check_heads_and_dims(hq, hk, hv, dq, dk, dv):
    if hk != hv:
        raise ValueError(f"k and v must have the same number of heads, got {hk} and {hv}")
    if hk == 0 or hq % hk != 0:
        raise ValueError(f"the query heads must be a multiple of the key/value heads (grouped-query attention), "
                         f"got q {hq} heads and k, v {hk}")
    if not (dq == dk == dv):
        raise ValueError(f"head_dim differs: q {dq}, k {dk}, v {dv}")
    if dq < 1 or dq > MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in 1..{MAX_HEAD_DIM}, got {dq}")


def _check_options(causal, scale, window_size, softcap, return_lse, head_dim):
    """The keyword options of both entry points; returns (scale, window_left, window_right, softcap)."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"window_size must be a pair (left, right) of ints, got {window_size!r}")
    for side, value in zip(("left", "right"), window_size):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"window_size's {side} side must be an int, got {type(value).__name__}")
        if value < -1:
            raise ValueError(f"window_size's {side} side must be >= 0, or -1 for unbounded, got {value}")
    left, right = window_size
    if causal:
        right = 0  # causal is the window's right side at 0 (as FlashAttention-2)
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap must be a float, got {type(softcap).__name__}")
    softcap = float(softcap)
    if not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap must be finite and >= 0 (0 turns it off), got {softcap}")
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    else:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
        scale = float(scale)
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale must be finite and positive, got {scale}")
    return scale, left, right, softcap


def check_inputs(q, k, v, causal=False, scale=None, impl=DEFAULT_IMPLEMENTATION, return_lse=False,
                 window_size=(-1, -1), softcap=0.0):
    """Raise TypeError/ValueError for anything `attention` does not handle;
    return (scale, window_left, window_right, softcap) with causal folded into the window."""
    _check_impl(impl)
    _check_tensors(q, k, v, impl, 4, "(batch, heads, seq, head_dim)")
    _check_gpu_support(q, impl)
    (bq, hq, _, dq), (bk, hk, nk, dk), (bv, hv, nv, dv) = q.shape, k.shape, v.shape
    if not (bq == bk == bv):
        raise ValueError(f"batch sizes differ: q {bq}, k {bk}, v {bv}")
    if nk != nv:
        raise ValueError(f"k and v must have the same sequence length, got {nk} and {nv}")
    _check_heads_and_dims(hq, hk, hv, dq, dk, dv)
    return _check_options(causal, scale, window_size, softcap, return_lse, dq)


def _empty_result(q, k, v, lse_shape, return_lse):
    """Nothing to attend to (or nobody asking): out = 0 and lse = -inf, the kernels' empty-softmax
    convention, built from q, k, v so that autograd gives them their zero (or empty) gradients."""
    out = q * 0 + (k.sum() + v.sum()) * 0
    lse = torch.full(lse_shape, float("-inf"), dtype=torch.float32, device=q.device)
    return (out, lse) if return_lse else out


def attention(q, k, v, *, causal=False, scale=None, window_size=(-1, -1), softcap=0.0, impl=DEFAULT_IMPLEMENTATION,
              return_lse=False):
    """Scaled dot-product attention, softmax(scale * q k^T) v, differentiable in q, k, v.

    q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D), the layout of
    torch.nn.functional.scaled_dot_product_attention; any strides. fp16 or bf16 (fp32 too
    with impl="cuda"), D <= 256.
    Grouped-query attention: Hq a multiple of Hkv; query head h reads K/V head
    h // (Hq // Hkv) (MQA: Hkv = 1). K/V are never copied; dK, dV have Hkv heads.
    window_size (left, right): query i, at position p = i + Nk - Nq (bottom-right aligned),
    sees key j iff p - left <= j <= p + right; -1 leaves a side unbounded.
    causal: right = 0, whatever window_size's right side says (as FlashAttention-2).
    softcap > 0: scores become softcap * tanh(scale * q.k / softcap) (Gemma 2); 0 is off.
    A row that sees no key outputs 0, has lse = -inf and zero gradients.
    scale: defaults to 1/sqrt(D).
    impl: a name from flashtile.IMPLEMENTATIONS: "v1", "v2" (default), "v2_atomic" (Triton)
    or "cuda" (the float32 CUDA reference, which also takes float32 inputs and, in its host
    build, CPU tensors).
    return_lse: also return the float32 natural-log log-sum-exp, shape (B, Hq, Nq).
    """
    scale, left, right, softcap = check_inputs(q, k, v, causal, scale, impl, return_lse, window_size, softcap)
    B, Hq, n_q, _ = q.shape
    n_k = k.shape[2]
    if n_q == 0 or n_k == 0 or B == 0:
        return _empty_result(q, k, v, (B, Hq, n_q), return_lse)
    out, lse = ops.attention(q, k, v, None, None, n_q, n_k, scale, left, right, softcap, impl)
    return (out, lse) if return_lse else out


def _check_cu_seqlens(name, cu, q):
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype torch.int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be 1-D of length batch + 1 >= 2, got shape {tuple(cu.shape)}")
    if cu.device != q.device:
        raise ValueError(f"{name} must be on q's device {q.device}, got {cu.device}")


def _check_max_seqlen(name, value):
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False, scale=None,
                        impl=DEFAULT_IMPLEMENTATION, return_lse=False, window_size=(-1, -1), softcap=0.0):
    """Raise TypeError/ValueError for anything `varlen_attention` does not handle (the values
    inside cu_seqlens are the caller's contract); return what check_inputs returns."""
    _check_impl(impl)
    _check_tensors(q, k, v, impl, 3, "(total_tokens, heads, head_dim)")
    _check_gpu_support(q, impl)
    (tq, hq, dq), (tk, hk, dk), (tv, hv, dv) = q.shape, k.shape, v.shape
    if tk != tv:
        raise ValueError(f"k and v must have the same number of tokens, got {tk} and {tv}")
    _check_heads_and_dims(hq, hk, hv, dq, dk, dv)
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same batch, got lengths "
                         f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")
    _check_max_seqlen("max_seqlen_q", max_seqlen_q)
    _check_max_seqlen("max_seqlen_k", max_seqlen_k)
    return _check_options(causal, scale, window_size, softcap, return_lse, dq)


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, *, causal=False,
                     scale=None, window_size=(-1, -1), softcap=0.0, impl=DEFAULT_IMPLEMENTATION, return_lse=False):
    """Attention over a packed batch of sequences of different lengths, without padding.

    q: (total_q, Hq, D); k, v: (total_k, Hkv, D), sequence after sequence (the layout of
    FlashAttention-2's flash_attn_varlen_func). cu_seqlens_q / cu_seqlens_k: int32 (B + 1,)
    prefix sums of the lengths, starting at 0, on q's device: sequence b is rows
    cu_seqlens_q[b]:cu_seqlens_q[b + 1] of q and attends only to rows
    cu_seqlens_k[b]:cu_seqlens_k[b + 1] of k and v, with its own bottom-right alignment for
    causal and the window. Their values (0 first, non-decreasing) are the caller's contract,
    as in FlashAttention-2. The last value must be q's (k's) number of tokens: a ValueError
    says so whenever the values are read anyway (CPU tensors, or max_seqlen_* None); CUDA
    cu_seqlens with both max_seqlen_* given are not read back, so that no sync happens.
    max_seqlen_q / max_seqlen_k: the longest sequence lengths. The Triton kernels take them
    for their autotune key and to drop window sides that bound no query, and size their grid
    from the packed totals instead; the CUDA reference sizes its grid with them. None
    computes them from cu_seqlens_*, at the cost of one device-to-host copy (a sync).
    Other arguments as `attention`. return_lse: lse has shape (Hq, total_q).
    """
    scale, left, right, softcap = check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                      max_seqlen_k, causal, scale, impl, return_lse, window_size,
                                                      softcap)
    # Under torch.compile the values are symbols, not numbers: no check can branch on them.
    compiling = torch.compiler.is_compiling()
    if max_seqlen_q is None or max_seqlen_k is None or not (q.is_cuda or compiling):
        # One device-to-host copy (a sync on the GPU, free on the CPU): the longest sequences,
        # and the totals, which must be the tokens of q and k.
        longest_q, longest_k, total_q, total_k = torch.stack(
            [cu_seqlens_q.diff().max(), cu_seqlens_k.diff().max(), cu_seqlens_q[-1], cu_seqlens_k[-1]]).tolist()
        for name, total, tokens in (("cu_seqlens_q", total_q, q.shape[0]), ("cu_seqlens_k", total_k, k.shape[0])):
            if not compiling and total != tokens:
                raise ValueError(f"{name} ends at {total}, but {'q' if name[-1] == 'q' else 'k and v'} "
                                 f"have {tokens} tokens")
        max_seqlen_q = longest_q if max_seqlen_q is None else max_seqlen_q
        max_seqlen_k = longest_k if max_seqlen_k is None else max_seqlen_k
    total_q, Hq = q.shape[0], q.shape[1]
    if total_q == 0 or k.shape[0] == 0 or max_seqlen_q == 0 or max_seqlen_k == 0:
        return _empty_result(q, k, v, (Hq, total_q), return_lse)
    out, lse = ops.attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, left, right,
                             softcap, impl)
    return (out, lse) if return_lse else out
