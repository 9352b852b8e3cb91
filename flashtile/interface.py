"""`flashtile.attention`: argument checking and dispatch, and nothing else.

Every check happens here, once, before any kernel runs; the kernels assume valid input
(the split FlashAttention's own interface makes). Errors name the argument and the problem.
"""
import math
import os

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
# The CUDA reference (impl="cuda") computes in float32 and takes float32 inputs too.
REFERENCE_DTYPES = SUPPORTED_DTYPES + (torch.float32,)
MAX_HEAD_DIM = 256


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _implementations():
    # Imported lazily so that `import flashtile` stays cheap and the registry is one place.
    from .triton_kernels.v1 import FlashAttentionV1Function
    from .triton_kernels.v2 import FlashAttentionV2Function
    from .triton_kernels.v2_atomic import FlashAttentionV2AtomicFunction
    from .cuda_reference import CudaReferenceAttentionFunction

    return {
        "v1": FlashAttentionV1Function,
        "v2": FlashAttentionV2Function,
        "v2_atomic": FlashAttentionV2AtomicFunction,
        "cuda": CudaReferenceAttentionFunction,
    }


IMPLEMENTATIONS = ("v1", "v2", "v2_atomic", "cuda")


def check_inputs(q, k, v, causal, scale, impl, return_lse):
    """Raise TypeError/ValueError for anything the kernels do not handle; return the scale."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, seq, head_dim), got shape {tuple(t.shape)}")
    reference = isinstance(impl, str) and impl == "cuda"
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
        raise ValueError(
            f"q, k, v are on {q.device}; flashtile's kernels need CUDA tensors "
            "(or TRITON_INTERPRET=1 to run them on the CPU interpreter)"
        )
    (bq, hq, _, dq), (bk, hk, nk, dk), (bv, hv, nv, dv) = q.shape, k.shape, v.shape
    if not (bq == bk == bv):
        raise ValueError(f"batch sizes differ: q {bq}, k {bk}, v {bv}")
    if not (hq == hk == hv):
        raise ValueError(f"head counts differ: q {hq}, k {hk}, v {hv}")
    if nk != nv:
        raise ValueError(f"k and v must have the same sequence length, got {nk} and {nv}")
    if not (dq == dk == dv):
        raise ValueError(f"head_dim differs: q {dq}, k {dk}, v {dv}")
    if dq < 1 or dq > MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in 1..{MAX_HEAD_DIM}, got {dq}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    if not isinstance(impl, str):
        raise TypeError(f"impl must be a str, got {type(impl).__name__}")
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if scale is None:
        return 1.0 / math.sqrt(dq)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be finite and positive, got {scale}")
    return scale


def attention(q, k, v, *, causal=False, scale=None, impl="v2", return_lse=False):
    """Scaled dot-product attention, softmax(scale * q k^T) v, differentiable in q, k, v.

    q: (B, H, Nq, D); k, v: (B, H, Nk, D), the layout of
    torch.nn.functional.scaled_dot_product_attention; any strides. fp16 or bf16 (fp32 too
    with impl="cuda"), D <= 256.
    causal: query i sees key j iff j <= i + Nk - Nq (bottom-right, as FlashAttention-2).
    A row that sees no key outputs 0, has lse = -inf and zero gradients.
    scale: defaults to 1/sqrt(D).
    impl: "v1", "v2" (default) or "v2_atomic" (Triton), or "cuda" (the float32 CUDA
    reference, which also takes float32 inputs and, in its host build, CPU tensors).
    return_lse: also return the float32 natural-log log-sum-exp, shape (B, H, Nq).
    """
    scale = check_inputs(q, k, v, causal, scale, impl, return_lse)
    B, H, n_q, D = q.shape
    n_k = k.shape[2]
    if n_q == 0 or n_k == 0:
        # Nothing to attend to (or nobody asking): the kernels' empty-softmax convention,
        # out = 0 and lse = -inf. (q k^T) v over an empty dimension is exactly that zero
        # tensor, and autograd gives q, k, v their (zero or empty) gradients.
        out = torch.matmul(torch.matmul(q, k.transpose(-1, -2)), v)
        lse = torch.full((B, H, n_q), float("-inf"), dtype=torch.float32, device=q.device)
        return (out, lse) if return_lse else out
    function = _implementations()[impl]
    out, lse = function.apply(q, k, v, causal, scale)
    return (out, lse) if return_lse else out
