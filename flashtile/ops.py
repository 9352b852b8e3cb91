"""flashtile's attention as torch.library operators, so that torch.compile sees one opaque op.

Dynamo cannot trace into a Triton launcher that takes Python objects (the Problem) or into the
CUDA reference's extension, and inductor must not try to re-compile the kernels; an operator
with a fake (meta) function and an autograd formula is what it can hold in a graph:

    flashtile::attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                 scale, window_left, window_right, softcap, impl)
        -> (out, lse, saved)
    flashtile::attention_backward(d_out, q, k, v, out, lse, saved, <the same problem>, impl)
        -> (dq, dk, dv)

One pair serves dense and varlen attention, as the registry's contract does (cu_seqlens None:
dense, and max_seqlen_* are Nq and Nk). The arguments are checked ones (flashtile.interface
checks them in Python, before the op, so errors name the argument); impl is a registry name.
`saved` is what the implementation's backward needs besides q, k, v, out and lse (v1's row max
and row sum, the CUDA reference's float32 out; nothing for v2): each implementation module has
`forward`, `backward` and SAVED_LIKE, the shapes of `saved` that the fake function needs.
`attention` below is what flashtile.interface calls: the operator under torch.compile, the
implementation's autograd Function in eager mode (same kernels, less host overhead).
"""
import contextlib
import importlib
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .registry import REGISTRY


def _implementation(impl: str):
    """The module of registry entry `impl` (its module-level forward, backward and SAVED_LIKE)."""
    return importlib.import_module(REGISTRY[impl].module, "flashtile")


@torch.library.custom_op("flashtile::attention_forward", mutates_args=())
def attention_forward(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
                      max_seqlen_q: int, max_seqlen_k: int, scale: float, window_left: int, window_right: int,
                      softcap: float, impl: str) -> Tuple[Tensor, Tensor, List[Tensor]]:
    out, lse, saved = _implementation(impl).forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                    scale, window_left, window_right, softcap)
    return out, lse, list(saved)


def _lse_shape(q, cu_seqlens_q):
    """(B, Hq, Nq) dense, (Hq, total_q) varlen."""
    return tuple(q.shape[:3]) if cu_seqlens_q is None else (q.shape[1], q.shape[0])


@attention_forward.register_fake
def _attention_forward_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
                            window_right, softcap, impl):
    # Every implementation returns contiguous results: out in q's dtype, the statistics float32.
    shapes = {"out": tuple(q.shape), "lse": _lse_shape(q, cu_seqlens_q)}
    out = q.new_empty(shapes["out"])
    lse = q.new_empty(shapes["lse"], dtype=torch.float32)
    saved = [q.new_empty(shapes[like], dtype=torch.float32) for like in _implementation(impl).SAVED_LIKE]
    return out, lse, saved


@torch.library.custom_op("flashtile::attention_backward", mutates_args=())
def attention_backward(d_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, saved: List[Tensor],
                       cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], max_seqlen_q: int,
                       max_seqlen_k: int, scale: float, window_left: int, window_right: int, softcap: float,
                       impl: str) -> Tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = _implementation(impl).backward(d_out, q, k, v, out, lse, tuple(saved), cu_seqlens_q, cu_seqlens_k,
                                                max_seqlen_q, max_seqlen_k, scale, window_left, window_right, softcap)
    return dq, dk, dv


@attention_backward.register_fake
def _attention_backward_fake(d_out, q, k, v, out, lse, saved, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                             scale, window_left, window_right, softcap, impl):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, *scalars = inputs
    out, lse, saved = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *saved)
    ctx.scalars = scalars  # max_seqlen_q, max_seqlen_k, scale, window_left, window_right, softcap, impl
    ctx.mark_non_differentiable(lse, *saved)


def _backward(ctx, d_out, _d_lse, _d_saved):
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *saved = ctx.saved_tensors
    if d_out is None:  # out did not reach the loss
        d_out = torch.zeros_like(out)
    dq, dk, dv = attention_backward(d_out, q, k, v, out, lse, saved, cu_seqlens_q, cu_seqlens_k, *ctx.scalars)
    return (dq, dk, dv) + (None,) * 9


attention_forward.register_autograd(_backward, setup_context=_setup_context)


def attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left, window_right,
              softcap, impl):
    """(out, lse), differentiable in q, k, v: the registry's Function contract
    (flashtile/registry.py) with the implementation's name as the last argument.

    Under torch.compile, the operator. In eager mode, the implementation's autograd Function
    itself: the same kernels on the same arguments (so the same bits), without the operator's
    generic Python autograd layer (argument flattening, defaults, re-dispatch), which costs
    more than a small attention call (scripts/dispatch_overhead.py measures both)."""
    if torch.compiler.is_compiling():
        out, lse, _ = attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                                        window_left, window_right, softcap, impl)
        return out, lse
    # Triton (and the CUDA reference) launch on the current device: run on the tensors' own, as
    # PyTorch's operators do. The backward needs no guard: autograd runs it on a thread set to
    # the gradients' device (and a compiled graph guards its device itself).
    other_gpu = q.is_cuda and q.device.index != torch.cuda.current_device()
    with torch.cuda.device(q.device) if other_gpu else contextlib.nullcontext():
        return REGISTRY[impl].load().apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                                           window_left, window_right, softcap)
