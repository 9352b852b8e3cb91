"""flashtile.attention's and flashtile.varlen_attention's contract outside the numerics:
argument checking, empty inputs, the default scale and the return values.

The argument tests run on any machine: every implementation in the registry is replaced by
a Function whose apply fails the test if it is reached, so every error must come from the
checks that run first, and valid input must get as far as that Function.
The tests that run kernels (the last sections) run on the interpreter; at real sizes the
parity suite (tests/test_parity.py) checks the same results on the GPU.
"""
import math
import warnings

import pytest
import torch

import flashtile
from flashtile.registry import IMPLEMENTATIONS, REGISTRY, TRITON_IMPLEMENTATIONS, Implementation
from flashtile.testing import make_qkv, make_varlen_qkv, random_like


class KernelReached(AssertionError):
    pass


@pytest.fixture
def no_kernels(monkeypatch):
    """Every implementation's Function fails the test if called. TRITON_INTERPRET=1 so that
    the device check accepts CPU tensors and the checks after it are reached."""

    class Unreachable:
        @staticmethod
        def apply(*args):
            raise KernelReached("a kernel was reached with invalid input")

    monkeypatch.setattr(Implementation, "load", lambda self: Unreachable)
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def qkv(B=1, H=2, n_q=5, n_k=7, D=8, dtype=torch.float16, kv_heads=None):
    return make_qkv(B, H, n_q, n_k, D, dtype, kv_heads=kv_heads)


def packed(seqlens_q=(3, 5), seqlens_k=(4, 2), H=4, kv_heads=2, D=8, dtype=torch.float16):
    """(q, k, v, cu_seqlens_q, cu_seqlens_k) of a small packed batch."""
    return make_varlen_qkv(seqlens_q, seqlens_k, H, D, dtype, kv_heads=kv_heads)


def _replace(args, index, value):
    args = list(args)
    args[index] = value
    return args


# ---------------------------------------------------------------------------------------
# Bad input: exception type, the argument named, and no kernel reached
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("position,name", [(0, "q"), (1, "k"), (2, "v")])
@pytest.mark.parametrize("bad", [None, [[1.0]], 3.0], ids=["None", "list", "float"])
def test_not_a_tensor(no_kernels, impl, position, name, bad):
    args = _replace(qkv(), position, bad)
    with pytest.raises(TypeError, match=rf"\b{name}\b.*torch\.Tensor"):
        flashtile.attention(*args, impl=impl)


@pytest.mark.parametrize("position,name", [(0, "q"), (1, "k"), (2, "v")])
@pytest.mark.parametrize("reshape", [lambda t: t[0], lambda t: t[None], lambda t: t.flatten()],
                         ids=["3d", "5d", "1d"])
def test_not_4d(no_kernels, position, name, reshape):
    args = qkv()
    args = _replace(args, position, reshape(args[position]))
    with pytest.raises(ValueError, match=rf"\b{name}\b.*4-D"):
        flashtile.attention(*args)


@pytest.mark.parametrize("position,name", [(0, "q"), (1, "k"), (2, "v")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int32, torch.bool])
def test_unsupported_dtype(no_kernels, position, name, dtype):
    args = qkv()
    args = _replace(args, position, args[position].to(dtype))
    with pytest.raises(TypeError, match=rf"\b{name}\b.*dtype"):
        flashtile.attention(*args)


@pytest.mark.parametrize("dtypes", [(torch.float16, torch.bfloat16, torch.float16),
                                    (torch.bfloat16, torch.bfloat16, torch.float16),
                                    (torch.bfloat16, torch.float16, torch.float16)])
def test_mixed_dtypes(no_kernels, dtypes):
    args = [t.to(d) for t, d in zip(qkv(), dtypes)]
    with pytest.raises(TypeError, match=r"q, k, v.*dtype"):
        flashtile.attention(*args)


def test_mixed_devices(no_kernels):
    q, k, v = qkv()
    # The meta device exists on every machine: no second real device needed.
    with pytest.raises(ValueError, match=r"q, k, v.*device"):
        flashtile.attention(q, k.to("meta"), v)
    with pytest.raises(ValueError, match=r"q, k, v.*device"):
        flashtile.attention(q, k, v.to("meta"))


def test_cpu_tensors_need_the_interpreter(no_kernels, monkeypatch):
    for impl in TRITON_IMPLEMENTATIONS:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match=r"q, k, v.*cpu.*(CUDA|TRITON_INTERPRET)"):
            flashtile.attention(*qkv(), impl=impl)
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(ValueError, match=r"TRITON_INTERPRET"):
            flashtile.attention(*qkv(), impl=impl)


@pytest.mark.parametrize("shapes,pattern", [
    (((2, 2, 5, 8), (1, 2, 7, 8), (1, 2, 7, 8)), r"batch"),
    (((1, 2, 5, 8), (1, 2, 7, 8), (2, 2, 7, 8)), r"batch"),
    (((1, 2, 5, 8), (1, 3, 7, 8), (1, 3, 7, 8)), r"multiple.*\bq\b.*\bk\b"),
    (((1, 6, 5, 8), (1, 4, 7, 8), (1, 4, 7, 8)), r"multiple.*\bq\b.*\bk\b"),
    (((1, 2, 5, 8), (1, 0, 7, 8), (1, 0, 7, 8)), r"multiple.*\bq\b.*\bk\b"),
    (((1, 2, 5, 8), (1, 2, 7, 8), (1, 1, 7, 8)), r"\bk\b and \bv\b.*heads"),
    (((1, 4, 5, 8), (1, 2, 7, 8), (1, 1, 7, 8)), r"\bk\b and \bv\b.*heads"),
    (((1, 2, 5, 8), (1, 2, 7, 8), (1, 2, 6, 8)), r"\bk\b and \bv\b.*sequence length"),
    (((1, 2, 5, 8), (1, 2, 7, 8), (1, 2, 7, 4)), r"head_dim"),
    (((1, 2, 5, 4), (1, 2, 7, 8), (1, 2, 7, 8)), r"head_dim"),
    (((1, 2, 5, 257), (1, 2, 7, 257), (1, 2, 7, 257)), r"head_dim.*256"),
    (((1, 2, 5, 512), (1, 2, 7, 512), (1, 2, 7, 512)), r"head_dim.*256"),
    (((1, 2, 5, 0), (1, 2, 7, 0), (1, 2, 7, 0)), r"head_dim"),
], ids=["batch_k", "batch_v", "heads_not_a_multiple", "heads_6_of_4", "heads_kv_0", "heads_k_v", "heads_v_1",
        "kv_length", "dim_v", "dim_q", "dim_257", "dim_512", "dim_0"])
def test_mismatched_shapes(no_kernels, shapes, pattern):
    args = [torch.zeros(s, dtype=torch.float16) for s in shapes]
    with pytest.raises(ValueError, match=pattern):
        flashtile.attention(*args)


@pytest.mark.parametrize("heads", [(4, 2), (8, 1), (6, 3), (3, 3)], ids=lambda h: f"{h[0]}q{h[1]}kv")
def test_grouped_heads_are_accepted(no_kernels, heads):
    """Hq a multiple of Hkv (MQA included) passes every check and reaches the kernel."""
    with pytest.raises(KernelReached):
        flashtile.attention(*qkv(H=heads[0], kv_heads=heads[1]))


@pytest.mark.parametrize("scale", [0.0, -0.0, -1.0, float("nan"), float("inf"), float("-inf"), -1])
def test_bad_scale_value(no_kernels, scale):
    with pytest.raises(ValueError, match=r"\bscale\b"):
        flashtile.attention(*qkv(), scale=scale)


@pytest.mark.parametrize("scale", [True, False, "0.5", torch.tensor(0.5), [0.5], 1j])
def test_bad_scale_type(no_kernels, scale):
    with pytest.raises(TypeError, match=r"\bscale\b"):
        flashtile.attention(*qkv(), scale=scale)


@pytest.mark.parametrize("impl", ["v3", "V2", "", "flash", "v2 "])
def test_unknown_impl(no_kernels, impl):
    with pytest.raises(ValueError, match=r"\bimpl\b"):
        flashtile.attention(*qkv(), impl=impl)


@pytest.mark.parametrize("impl", [2, None, ("v2",)])
def test_impl_not_a_string(no_kernels, impl):
    with pytest.raises(TypeError, match=r"\bimpl\b"):
        flashtile.attention(*qkv(), impl=impl)


@pytest.mark.parametrize("causal", [1, 0, None, "yes", torch.tensor(True), 1.0])
def test_causal_not_a_bool(no_kernels, causal):
    with pytest.raises(TypeError, match=r"\bcausal\b"):
        flashtile.attention(*qkv(), causal=causal)


@pytest.mark.parametrize("return_lse", [1, None, "no"])
def test_return_lse_not_a_bool(no_kernels, return_lse):
    with pytest.raises(TypeError, match=r"\breturn_lse\b"):
        flashtile.attention(*qkv(), return_lse=return_lse)


@pytest.mark.parametrize("window_size", [(-2, 0), (0, -2), (-5, -1), (-1, -100)])
def test_window_side_below_minus_one(no_kernels, window_size):
    with pytest.raises(ValueError, match=r"\bwindow_size\b"):
        flashtile.attention(*qkv(), window_size=window_size)
    with pytest.raises(ValueError, match=r"\bwindow_size\b"):
        flashtile.varlen_attention(*packed(), window_size=window_size)


@pytest.mark.parametrize("window_size", [None, 3, (1,), (1, 2, 3), (1.0, 2), (1, 2.5), ("1", 0), (True, 0),
                                         (0, torch.tensor(1))],
                         ids=["None", "int", "one", "three", "float_left", "float_right", "str", "bool", "tensor"])
def test_window_not_a_pair_of_ints(no_kernels, window_size):
    with pytest.raises(TypeError, match=r"\bwindow_size\b"):
        flashtile.attention(*qkv(), window_size=window_size)


@pytest.mark.parametrize("window_size", [(-1, -1), (0, 0), (3, -1), (-1, 3), (100, 2), [4, 4]])
def test_windows_are_accepted(no_kernels, window_size):
    with pytest.raises(KernelReached):
        flashtile.attention(*qkv(), window_size=window_size)
    with pytest.raises(KernelReached):
        flashtile.attention(*qkv(), window_size=window_size, causal=True)


@pytest.mark.parametrize("softcap", [-1.0, -1e-9, float("nan"), float("inf"), float("-inf"), -3])
def test_bad_softcap_value(no_kernels, softcap):
    with pytest.raises(ValueError, match=r"\bsoftcap\b"):
        flashtile.attention(*qkv(), softcap=softcap)
    with pytest.raises(ValueError, match=r"\bsoftcap\b"):
        flashtile.varlen_attention(*packed(), softcap=softcap)


@pytest.mark.parametrize("softcap", [None, "30", True, torch.tensor(30.0), [30.0]])
def test_bad_softcap_type(no_kernels, softcap):
    with pytest.raises(TypeError, match=r"\bsoftcap\b"):
        flashtile.attention(*qkv(), softcap=softcap)


@pytest.mark.parametrize("softcap", [0, 0.0, 30, 50.0, 1e-3])
def test_softcaps_are_accepted(no_kernels, softcap):
    with pytest.raises(KernelReached):
        flashtile.attention(*qkv(), softcap=softcap)


def test_keyword_only():
    q, k, v = qkv()
    with pytest.raises(TypeError):
        flashtile.attention(q, k, v, True)  # causal must be passed by name
    q, k, v, cu_q, cu_k = packed()
    with pytest.raises(TypeError):
        flashtile.varlen_attention(q, k, v, cu_q, cu_k, 5, 4, True)  # causal by name


def test_bad_input_checked_even_for_empty_sequences(no_kernels):
    q, k, v = qkv(n_q=0)
    with pytest.raises(ValueError, match=r"\bscale\b"):
        flashtile.attention(q, k, v, scale=-1.0)
    with pytest.raises(TypeError, match=r"\bcausal\b"):
        flashtile.attention(q, k, v, causal=1)
    with pytest.raises(ValueError, match=r"\bwindow_size\b"):
        flashtile.attention(q, k, v, window_size=(-2, 0))
    q, k, v = qkv(n_k=0)
    with pytest.raises(ValueError, match=r"\bimpl\b"):
        flashtile.attention(q, k, v, impl="v3")
    with pytest.raises(ValueError, match=r"\bsoftcap\b"):
        flashtile.attention(q, k, v, softcap=-1.0)


# ---------------------------------------------------------------------------------------
# Bad input to varlen_attention
# ---------------------------------------------------------------------------------------

def test_varlen_valid_input_reaches_the_kernel(no_kernels):
    with pytest.raises(KernelReached):
        flashtile.varlen_attention(*packed())
    with pytest.raises(KernelReached):
        flashtile.varlen_attention(*packed(), max_seqlen_q=5, max_seqlen_k=4, causal=True, window_size=(2, 0),
                                   softcap=20.0)


@pytest.mark.parametrize("position,name", [(0, "q"), (1, "k"), (2, "v")])
@pytest.mark.parametrize("reshape", [lambda t: t[None], lambda t: t[0]], ids=["4d", "2d"])
def test_varlen_not_3d(no_kernels, position, name, reshape):
    args = packed()
    args = _replace(args, position, reshape(args[position]))
    with pytest.raises(ValueError, match=rf"\b{name}\b.*3-D"):
        flashtile.varlen_attention(*args)


@pytest.mark.parametrize("heads,pattern", [((4, 3), r"multiple.*\bq\b.*\bk\b"), ((4, 0), r"multiple")])
def test_varlen_heads_not_a_multiple(no_kernels, heads, pattern):
    with pytest.raises(ValueError, match=pattern):
        flashtile.varlen_attention(*packed(H=heads[0], kv_heads=heads[1]))


def test_varlen_k_and_v_tokens_differ(no_kernels):
    q, k, v, cu_q, cu_k = packed()
    with pytest.raises(ValueError, match=r"\bk\b and \bv\b"):
        flashtile.varlen_attention(q, k, v[:-1], cu_q, cu_k)


@pytest.mark.parametrize("position,name", [(3, "cu_seqlens_q"), (4, "cu_seqlens_k")])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int16, torch.float32, torch.uint8])
def test_cu_seqlens_wrong_dtype(no_kernels, position, name, dtype):
    args = packed()
    args = _replace(args, position, args[position].to(dtype))
    with pytest.raises(TypeError, match=rf"\b{name}\b.*int32"):
        flashtile.varlen_attention(*args)


@pytest.mark.parametrize("position,name", [(3, "cu_seqlens_q"), (4, "cu_seqlens_k")])
@pytest.mark.parametrize("bad", [None, [0, 3, 8], 8], ids=["None", "list", "int"])
def test_cu_seqlens_not_a_tensor(no_kernels, position, name, bad):
    with pytest.raises(TypeError, match=rf"\b{name}\b"):
        flashtile.varlen_attention(*_replace(packed(), position, bad))


@pytest.mark.parametrize("position,name", [(3, "cu_seqlens_q"), (4, "cu_seqlens_k")])
@pytest.mark.parametrize("reshape", [lambda t: t[None], lambda t: t[:1], lambda t: t[0]], ids=["2d", "length1", "0d"])
def test_cu_seqlens_wrong_shape(no_kernels, position, name, reshape):
    args = packed()
    args = _replace(args, position, reshape(args[position]))
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        flashtile.varlen_attention(*args)


def test_cu_seqlens_of_different_batches(no_kernels):
    q, k, v, cu_q, _ = packed()
    cu_k = torch.tensor([0, 2, 4, 6], dtype=torch.int32)  # 3 sequences of keys for 2 of queries
    with pytest.raises(ValueError, match=r"cu_seqlens_q.*cu_seqlens_k"):
        flashtile.varlen_attention(q, k, v, cu_q, cu_k)


@pytest.mark.parametrize("position,name", [(3, "cu_seqlens_q"), (4, "cu_seqlens_k")])
def test_cu_seqlens_on_another_device(no_kernels, position, name):
    args = packed()
    args = _replace(args, position, args[position].to("meta"))
    with pytest.raises(ValueError, match=rf"\b{name}\b.*device"):
        flashtile.varlen_attention(*args)


@pytest.mark.parametrize("position,name", [(3, "cu_seqlens_q"), (4, "cu_seqlens_k")])
@pytest.mark.parametrize("change", [1, -1])
def test_cu_seqlens_total_disagrees_with_the_tokens(no_kernels, position, name, change):
    """cu_seqlens[-1] must be the number of tokens of q (k, v): the one value of cu_seqlens
    the interface can check against the tensors (the rest is the caller's contract)."""
    args = packed()
    cu = args[position].clone()
    cu[-1] += change
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        flashtile.varlen_attention(*_replace(args, position, cu))


@pytest.mark.parametrize("name", ["max_seqlen_q", "max_seqlen_k"])
def test_bad_max_seqlen(no_kernels, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        flashtile.varlen_attention(*packed(), **{name: -1})
    for bad in (5.0, "5", True, torch.tensor(5)):
        with pytest.raises(TypeError, match=rf"\b{name}\b"):
            flashtile.varlen_attention(*packed(), **{name: bad})


def test_varlen_common_checks(no_kernels):
    """The options and tensors are checked as by attention."""
    q, k, v, cu_q, cu_k = packed()
    with pytest.raises(TypeError, match=r"\bq\b.*dtype"):
        flashtile.varlen_attention(q.float(), k, v, cu_q, cu_k)
    with pytest.raises(TypeError, match=r"q, k, v.*dtype"):
        flashtile.varlen_attention(q, k.bfloat16(), v, cu_q, cu_k)
    with pytest.raises(ValueError, match=r"head_dim"):
        flashtile.varlen_attention(q, k[..., :4], v[..., :4], cu_q, cu_k)
    with pytest.raises(ValueError, match=r"\bimpl\b"):
        flashtile.varlen_attention(q, k, v, cu_q, cu_k, impl="v3")
    with pytest.raises(TypeError, match=r"\bcausal\b"):
        flashtile.varlen_attention(q, k, v, cu_q, cu_k, causal="yes")
    with pytest.raises(ValueError, match=r"\bscale\b"):
        flashtile.varlen_attention(q, k, v, cu_q, cu_k, scale=0.0)
    with pytest.raises(TypeError, match=r"\bwindow_size\b"):
        flashtile.varlen_attention(q, k, v, cu_q, cu_k, window_size=5)


def test_every_implementation_is_importable_from_flashtile():
    """The Function classes of the registry, under the names it gives them."""
    for entry in REGISTRY.values():
        assert getattr(flashtile, entry.function) is entry.load()


# ---------------------------------------------------------------------------------------
# What the GPU rules out: bf16 before sm_80, and Turing without tensor cores (a warning)
# ---------------------------------------------------------------------------------------

@pytest.fixture
def turing(monkeypatch):
    """CPU tensors that the checks take for tensors on an sm_75 GPU; the warning not yet given."""
    from flashtile import interface

    monkeypatch.setattr(interface, "_cuda_capability", lambda t: 75)
    monkeypatch.setattr(interface, "_warned_no_tensor_cores", False)
    return interface


@pytest.mark.parametrize("impl", TRITON_IMPLEMENTATIONS)
def test_bf16_on_turing_is_a_type_error(no_kernels, turing, impl):
    with pytest.raises(TypeError, match=r"bfloat16.*sm_75.*float16"):
        flashtile.attention(*qkv(dtype=torch.bfloat16), impl=impl)
    cu_seqlens = torch.tensor([0, 5], dtype=torch.int32)
    q, k, v = (torch.zeros(5, 2, 8, dtype=torch.bfloat16) for _ in range(3))
    with pytest.raises(TypeError, match=r"bfloat16.*sm_75"):
        flashtile.varlen_attention(q, k, v, cu_seqlens, cu_seqlens, 5, 5, impl=impl)


def test_turing_without_tensor_cores_warns_once(turing, monkeypatch):
    from flashtile.triton_kernels import _compat

    monkeypatch.setattr(_compat, "turing_tensor_cores", lambda: False)
    q = qkv()[0]
    with pytest.warns(RuntimeWarning, match=r"tensor cores.*pip install .*\"triton==3\.2\.0\""):
        turing._check_gpu_support(q, "v2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        turing._check_gpu_support(q, "v2")  # once per process: silent now
    monkeypatch.setattr(_compat, "turing_tensor_cores", lambda: True)
    monkeypatch.setattr(turing, "_warned_no_tensor_cores", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        turing._check_gpu_support(q, "v2")  # Triton 3.2: nothing to say


# ---------------------------------------------------------------------------------------
# Empty inputs: no kernel; out = 0, lse = -inf, gradients zero (or empty)
# ---------------------------------------------------------------------------------------

def _check_empty(q, k, v, out, lse, lse_shape, dtype):
    assert out.shape == q.shape and out.dtype == dtype and out.device == q.device
    assert lse.shape == lse_shape and lse.dtype == torch.float32 and lse.device == q.device
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))
    out.backward(random_like(out))
    for t in (q, k, v):
        assert t.grad is not None and t.grad.shape == t.shape and t.grad.dtype == dtype
        assert torch.all(t.grad == 0), "gradients of an empty attention must be zero"


@pytest.mark.parametrize("impl", TRITON_IMPLEMENTATIONS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,n_q,n_k", [(2, 0, 7), (2, 5, 0), (2, 0, 0), (0, 5, 7)])
def test_empty_sequences(impl, causal, dtype, B, n_q, n_k, device):
    q, k, v = make_qkv(B, 4, n_q, n_k, 8, dtype, device=device, requires_grad=True, kv_heads=2)
    out, lse = flashtile.attention(q, k, v, causal=causal, impl=impl, return_lse=True)
    _check_empty(q, k, v, out, lse, (B, 4, n_q), dtype)


@pytest.mark.parametrize("impl", TRITON_IMPLEMENTATIONS)
@pytest.mark.parametrize("seqlens_q,seqlens_k", [((0, 0), (3, 4)), ((2, 3), (0, 0)), ((0,), (0,))])
def test_empty_varlen_batches(impl, seqlens_q, seqlens_k, device):
    """No query or no key in any sequence."""
    dtype = torch.float16
    q, k, v, cu_q, cu_k = make_varlen_qkv(seqlens_q, seqlens_k, 4, 8, dtype, device=device, requires_grad=True,
                                          kv_heads=2)
    out, lse = flashtile.varlen_attention(q, k, v, cu_q, cu_k, impl=impl, return_lse=True)
    _check_empty(q, k, v, out, lse, (4, q.shape[0]), dtype)


# ---------------------------------------------------------------------------------------
# Default scale and return values (these run the kernels, on the interpreter)
# ---------------------------------------------------------------------------------------

@pytest.mark.interpreter
@pytest.mark.parametrize("impl", TRITON_IMPLEMENTATIONS)
@pytest.mark.parametrize("D", [7, 16, 40])
def test_default_scale_is_one_over_sqrt_d(impl, D):
    q, k, v = make_qkv(1, 2, 17, 20, D, torch.float16)
    default, lse_default = flashtile.attention(q, k, v, impl=impl, return_lse=True)
    explicit, lse_explicit = flashtile.attention(q, k, v, impl=impl, scale=1.0 / math.sqrt(D), return_lse=True)
    assert torch.equal(default, explicit) and torch.equal(lse_default, lse_explicit)
    # ...and the scale matters: another scale gives another answer.
    _, lse_other = flashtile.attention(q, k, v, impl=impl, scale=2.0 / math.sqrt(D), return_lse=True)
    assert not torch.equal(lse_default, lse_other)


@pytest.mark.interpreter
@pytest.mark.parametrize("impl", TRITON_IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_return_values(impl, dtype):
    B, Hq, Hkv, n_q, n_k, D = 2, 4, 2, 19, 5, 24
    q, k, v = make_qkv(B, Hq, n_q, n_k, D, dtype, requires_grad=True, kv_heads=Hkv)
    out = flashtile.attention(q, k, v, impl=impl, causal=True)
    assert isinstance(out, torch.Tensor)
    assert out.shape == (B, Hq, n_q, D) and out.dtype == dtype and out.device == q.device
    out2, lse = flashtile.attention(q, k, v, impl=impl, causal=True, return_lse=True)
    assert torch.equal(out, out2)
    assert lse.shape == (B, Hq, n_q) and lse.dtype == torch.float32 and lse.device == q.device
    assert out.requires_grad and not lse.requires_grad  # lse is not differentiable
    # causal with Nq > Nk: the first Nq - Nk rows see no key.
    assert torch.all(lse[:, :, : n_q - n_k] == float("-inf"))
    assert torch.isfinite(lse[:, :, n_q - n_k:]).all()
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), random_like(out))
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape  # dK, dV: Hkv heads


@pytest.mark.interpreter
@pytest.mark.parametrize("impl", TRITON_IMPLEMENTATIONS)
def test_varlen_return_values(impl):
    """out (total_q, Hq, D) and lse (Hq, total_q); max_seqlen_* computed when None give
    the same bits as when given."""
    seqlens_q, seqlens_k = (3, 17, 1), (5, 9, 20)
    q, k, v, cu_q, cu_k = make_varlen_qkv(seqlens_q, seqlens_k, 4, 16, torch.bfloat16, requires_grad=True,
                                          kv_heads=2)
    out, lse = flashtile.varlen_attention(q, k, v, cu_q, cu_k, impl=impl, causal=True, return_lse=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (4, q.shape[0]) and lse.dtype == torch.float32 and not lse.requires_grad
    given = flashtile.varlen_attention(q, k, v, cu_q, cu_k, max(seqlens_q), max(seqlens_k), impl=impl, causal=True,
                                       return_lse=True)
    assert torch.equal(given[0], out) and torch.equal(given[1], lse)
    out_only = flashtile.varlen_attention(q, k, v, cu_q, cu_k, impl=impl, causal=True)
    assert isinstance(out_only, torch.Tensor) and torch.equal(out_only, out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), random_like(out))
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
