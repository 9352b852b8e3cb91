"""flashtile under torch.compile (flashtile/ops.py): the operators pass torch.library.opcheck,
and a compiled function calling attention / varlen_attention has no graph break, does not
recompile when the sequence length changes (marked dynamic), and gives the eager results
bit for bit, forward and backward.

On the CPU the Triton kernels run in the interpreter (the op is opaque to the compiler, so
every backend only compiles what surrounds it); shapes are tiny for that reason.
"""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import flashtile
from flashtile import cuda_reference
from flashtile.registry import DEFAULT_IMPLEMENTATION, IMPLEMENTATIONS, REGISTRY
from conftest import INTERPRETING

DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETING else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRETING,
                                reason="runs kernels on CPU tensors: needs TRITON_INTERPRET=1")


def _case(impl, *more):
    """The test parameters (impl, *more), skipped where impl cannot run here (the CUDA
    reference needs its extension)."""
    marks = () if REGISTRY[impl].triton or cuda_reference.is_built() else pytest.mark.skip(
        reason="the CUDA reference extension is not built (python setup.py build_ext --inplace)")
    return pytest.param(impl, *more, marks=marks, id="-".join((impl,) + more))


IMPLS = [_case(impl) for impl in IMPLEMENTATIONS]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test counts its own compilations: the functions compiled here are closures of one
    code object per test function, which dynamo's cache (and recompile limit) would share."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _qkv(shape_q, shape_kv, seed=0):
    """q, k, v with grad; GQA when the head counts differ."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(torch.float16).to(DEVICE).requires_grad_()
            for shape in (shape_q, shape_kv, shape_kv)]


def _varlen_problem(lengths, seed=0):
    """Packed q, k, v (2 query heads, 1 key/value head, D = 16), cu_seqlens and the longest length."""
    q, k, v = _qkv((sum(lengths), 2, 16), (sum(lengths), 1, 16), seed)
    cu_seqlens = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0).to(torch.int32).to(DEVICE)
    return q, k, v, cu_seqlens, max(lengths)


def _forward_backward(fn, inputs, seed=1):
    out = fn(*inputs)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype).to(out.device)
    grads = torch.autograd.grad(out, [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad], grad_out)
    return [out.detach(), *grads]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_opcheck(impl, varlen):
    if varlen:
        lengths = [3, 5]
        q, k, v = _qkv((8, 2, 16), (8, 1, 16))
        cu = torch.tensor([0, 3, 8], dtype=torch.int32, device=DEVICE)
        problem = (cu, cu, max(lengths), max(lengths), 0.25, 2, 0, 5.0, impl)
    else:
        q, k, v = _qkv((1, 2, 5, 16), (1, 1, 7, 16))
        problem = (None, None, 5, 7, 0.25, -1, 0, 0.0, impl)
    torch.library.opcheck(torch.ops.flashtile.attention_forward.default, (q, k, v, *problem))
    with torch.no_grad():
        out, lse, saved = torch.ops.flashtile.attention_forward(q, k, v, *problem)
    d_out = torch.randn_like(out)
    torch.library.opcheck(torch.ops.flashtile.attention_backward.default,
                          (d_out, q.detach(), k.detach(), v.detach(), out, lse, saved, *problem))


# aot_eager traces the forward and the backward through the fake functions and the autograd
# formula, as inductor does, without inductor's code generation around the op (on the CPU a C++
# compile): every implementation gets it, the default one also gets inductor.
COMPILE_CASES = [_case(impl, "aot_eager") for impl in IMPLEMENTATIONS] + [_case(DEFAULT_IMPLEMENTATION, "inductor")]


@pytest.mark.parametrize("impl,backend", COMPILE_CASES)
def test_compiled_attention_dynamic_length(impl, backend):
    """GQA, a sliding window and a softcap; two sequence lengths, one compilation."""

    def attend(q, k, v):
        return flashtile.attention(q, k, v, causal=True, window_size=(4, -1), softcap=10.0, impl=impl)

    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(attend, backend=counter, fullgraph=True)
    for n in (9, 17):
        inputs = _qkv((2, 4, n, 16), (2, 2, n + 2, 16), seed=n)
        for t in inputs:
            torch._dynamo.mark_dynamic(t, 2)
        expected = _forward_backward(attend, inputs)
        got = _forward_backward(compiled, inputs)
        for name, x, y in zip(("out", "dq", "dk", "dv"), got, expected):
            assert torch.equal(x, y), f"{name} differs from eager at n={n}"
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times for 2 sequence lengths"


@pytest.mark.parametrize("impl", IMPLS)
def test_compiled_varlen_attention(impl):
    """Packed batches of a new total length (marked dynamic) and a new longest sequence each call."""

    def attend(q, k, v, cu_seqlens, max_seqlen):
        return flashtile.varlen_attention(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True,
                                          impl=impl)

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(attend, backend=counter, fullgraph=True)
    for lengths in ([3, 6], [5, 2, 7], [9, 4]):
        q, k, v, cu_seqlens, max_seqlen = _varlen_problem(lengths, seed=len(lengths))
        for t in (q, k, v):
            torch._dynamo.mark_dynamic(t, 0)
        torch._dynamo.mark_dynamic(cu_seqlens, 0)
        inputs = (q, k, v, cu_seqlens, max_seqlen)
        expected = _forward_backward(attend, inputs)
        got = _forward_backward(compiled, inputs)
        for name, x, y in zip(("out", "dq", "dk", "dv"), got, expected):
            assert torch.equal(x, y), f"{name} differs from eager for lengths {lengths}"
    # The first call sees max_seqlen as a constant; the second, with another value, makes it
    # dynamic (dynamo's automatic dynamic shapes); after that nothing recompiles.
    assert counter.frame_count <= 2, f"compiled {counter.frame_count} times for 3 batches"
