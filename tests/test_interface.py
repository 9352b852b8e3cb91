"""flashtile.attention's contract outside the numerics: argument checking, empty sequences,
the default scale and the return values.

The argument tests run on any machine: the kernels are replaced by functions that fail the
test if they are reached, so every error must come from the checks that run first.
"""
import importlib
import math
import warnings

import pytest
import torch

import flashtile
from flashtile.registry import TRITON_IMPLEMENTATIONS
from conftest import make_qkv

KERNEL_MODULES = ("v1", "v2", "v2_atomic")
FUNCTION_CLASSES = {"v1": "FlashAttentionV1Function", "v2": "FlashAttentionV2Function",
                    "v2_atomic": "FlashAttentionV2AtomicFunction"}
# The launchers each Function's forward calls after its own check_inputs, as (module, name):
# v2_atomic's forward is v2's.
LAUNCHERS = {"v1": (("v1", "v1_forward"),), "v2": (("v2", "v2_forward"),),
             "v2_atomic": (("v2", "v2_forward"),)}


def _kernel_module(impl):
    return importlib.import_module(f"flashtile.triton_kernels.{impl}")


@pytest.fixture
def no_kernels(monkeypatch):
    """Every Function's apply and forward launcher fails the test if called.

    The kernel modules are imported first, so that TRITON_INTERPRET (set here only so that
    check_inputs accepts CPU tensors and reaches the checks after the device one) cannot
    change how their kernels are decorated."""
    modules = {impl: _kernel_module(impl) for impl in KERNEL_MODULES}  # all imported before patching
    for impl, module in modules.items():

        def kernel_ran(*args, _impl=impl, **kwargs):
            raise AssertionError(f"a {_impl} kernel was reached with invalid input")

        monkeypatch.setattr(getattr(module, FUNCTION_CLASSES[impl]), "apply", kernel_ran)
        for launcher_module, launcher in LAUNCHERS[impl]:
            monkeypatch.setattr(modules[launcher_module], launcher, kernel_ran)
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def qkv(B=1, H=2, n_q=5, n_k=7, D=8, dtype=torch.float16):
    return make_qkv(B, H, n_q, n_k, D, dtype)


def _call(q, k, v, **kwargs):
    return flashtile.attention(q, k, v, **kwargs)


def _replace(args, index, value):
    args = list(args)
    args[index] = value
    return args


# ---------------------------------------------------------------------------------------
# Bad input: exception type, the argument named, and no kernel reached
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", KERNEL_MODULES)
@pytest.mark.parametrize("position,name", [(0, "q"), (1, "k"), (2, "v")])
@pytest.mark.parametrize("bad", [None, [[1.0]], 3.0], ids=["None", "list", "float"])
def test_not_a_tensor(no_kernels, impl, position, name, bad):
    args = _replace(qkv(), position, bad)
    with pytest.raises(TypeError, match=rf"\b{name}\b.*torch\.Tensor"):
        _call(*args, impl=impl)


@pytest.mark.parametrize("position,name", [(0, "q"), (1, "k"), (2, "v")])
@pytest.mark.parametrize("reshape", [lambda t: t[0], lambda t: t[None], lambda t: t.flatten()],
                         ids=["3d", "5d", "1d"])
def test_not_4d(no_kernels, position, name, reshape):
    args = qkv()
    args = _replace(args, position, reshape(args[position]))
    with pytest.raises(ValueError, match=rf"\b{name}\b.*4-D"):
        _call(*args)


@pytest.mark.parametrize("position,name", [(0, "q"), (1, "k"), (2, "v")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int32, torch.bool])
def test_unsupported_dtype(no_kernels, position, name, dtype):
    args = qkv()
    args = _replace(args, position, args[position].to(dtype))
    with pytest.raises(TypeError, match=rf"\b{name}\b.*dtype"):
        _call(*args)


@pytest.mark.parametrize("dtypes", [(torch.float16, torch.bfloat16, torch.float16),
                                    (torch.bfloat16, torch.bfloat16, torch.float16),
                                    (torch.bfloat16, torch.float16, torch.float16)])
def test_mixed_dtypes(no_kernels, dtypes):
    args = [t.to(d) for t, d in zip(qkv(), dtypes)]
    with pytest.raises(TypeError, match=r"q, k, v.*dtype"):
        _call(*args)


def test_mixed_devices(no_kernels):
    q, k, v = qkv()
    # The meta device exists on every machine: no second real device needed.
    with pytest.raises(ValueError, match=r"q, k, v.*device"):
        _call(q, k.to("meta"), v)
    with pytest.raises(ValueError, match=r"q, k, v.*device"):
        _call(q, k, v.to("meta"))


def test_cpu_tensors_need_the_interpreter(no_kernels, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"q, k, v.*cpu.*(CUDA|TRITON_INTERPRET)"):
        _call(*qkv())
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match=r"TRITON_INTERPRET"):
        _call(*qkv())


@pytest.mark.parametrize("shapes,pattern", [
    (((2, 2, 5, 8), (1, 2, 7, 8), (1, 2, 7, 8)), r"batch"),
    (((1, 2, 5, 8), (1, 2, 7, 8), (2, 2, 7, 8)), r"batch"),
    (((1, 2, 5, 8), (1, 3, 7, 8), (1, 3, 7, 8)), r"head counts"),
    (((1, 2, 5, 8), (1, 2, 7, 8), (1, 1, 7, 8)), r"head counts"),
    (((1, 2, 5, 8), (1, 2, 7, 8), (1, 2, 6, 8)), r"\bk\b and \bv\b.*sequence length"),
    (((1, 2, 5, 8), (1, 2, 7, 8), (1, 2, 7, 4)), r"head_dim"),
    (((1, 2, 5, 4), (1, 2, 7, 8), (1, 2, 7, 8)), r"head_dim"),
    (((1, 2, 5, 257), (1, 2, 7, 257), (1, 2, 7, 257)), r"head_dim.*256"),
    (((1, 2, 5, 512), (1, 2, 7, 512), (1, 2, 7, 512)), r"head_dim.*256"),
    (((1, 2, 5, 0), (1, 2, 7, 0), (1, 2, 7, 0)), r"head_dim"),
], ids=["batch_k", "batch_v", "heads_k", "heads_v", "kv_length", "dim_v", "dim_q", "dim_257", "dim_512",
        "dim_0"])
def test_mismatched_shapes(no_kernels, shapes, pattern):
    args = [torch.zeros(s, dtype=torch.float16) for s in shapes]
    with pytest.raises(ValueError, match=pattern):
        _call(*args)


@pytest.mark.parametrize("scale", [0.0, -0.0, -1.0, float("nan"), float("inf"), float("-inf"), -1])
def test_bad_scale_value(no_kernels, scale):
    with pytest.raises(ValueError, match=r"\bscale\b"):
        _call(*qkv(), scale=scale)


@pytest.mark.parametrize("scale", [True, False, "0.5", torch.tensor(0.5), [0.5], 1j])
def test_bad_scale_type(no_kernels, scale):
    with pytest.raises(TypeError, match=r"\bscale\b"):
        _call(*qkv(), scale=scale)


@pytest.mark.parametrize("impl", ["v3", "V2", "", "flash", "v2 "])
def test_unknown_impl(no_kernels, impl):
    with pytest.raises(ValueError, match=r"\bimpl\b"):
        _call(*qkv(), impl=impl)


@pytest.mark.parametrize("impl", [2, None, ("v2",)])
def test_impl_not_a_string(no_kernels, impl):
    with pytest.raises(TypeError, match=r"\bimpl\b"):
        _call(*qkv(), impl=impl)


@pytest.mark.parametrize("causal", [1, 0, None, "yes", torch.tensor(True), 1.0])
def test_causal_not_a_bool(no_kernels, causal):
    with pytest.raises(TypeError, match=r"\bcausal\b"):
        _call(*qkv(), causal=causal)


@pytest.mark.parametrize("return_lse", [1, None, "no"])
def test_return_lse_not_a_bool(no_kernels, return_lse):
    with pytest.raises(TypeError, match=r"\breturn_lse\b"):
        _call(*qkv(), return_lse=return_lse)


def test_keyword_only():
    q, k, v = qkv()
    with pytest.raises(TypeError):
        flashtile.attention(q, k, v, True)  # causal must be passed by name


def test_bad_input_checked_even_for_empty_sequences(no_kernels):
    q, k, v = qkv(n_q=0)
    with pytest.raises(ValueError, match=r"\bscale\b"):
        _call(q, k, v, scale=-1.0)
    with pytest.raises(TypeError, match=r"\bcausal\b"):
        _call(q, k, v, causal=1)
    q, k, v = qkv(n_k=0)
    with pytest.raises(ValueError, match=r"\bimpl\b"):
        _call(q, k, v, impl="v3")


@pytest.mark.parametrize("impl", KERNEL_MODULES)
def test_function_classes_check_their_inputs(impl, monkeypatch):
    """`.apply` on the Function classes checks as flashtile.attention does, before launching."""
    for other in KERNEL_MODULES:
        _kernel_module(other)  # imported before patching (v2_atomic imports v2's launcher)
    module = _kernel_module(impl)
    function = getattr(module, FUNCTION_CLASSES[impl])
    assert getattr(flashtile, FUNCTION_CLASSES[impl]) is function

    def kernel_ran(*args, **kwargs):
        raise AssertionError(f"{impl}'s launcher was reached with invalid input")

    for launcher_module, launcher in LAUNCHERS[impl]:
        monkeypatch.setattr(_kernel_module(launcher_module), launcher, kernel_ran)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"\bq\b.*dtype"):
        function.apply(q.float(), k, v, False, None)
    with pytest.raises(ValueError, match=r"head_dim"):
        function.apply(q, k, v[..., :4], False, None)
    with pytest.raises(ValueError, match=r"\bscale\b"):
        function.apply(q, k, v, False, float("nan"))
    with pytest.raises(TypeError, match=r"\bcausal\b"):
        function.apply(q, k, v, "no", None)


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
        _call(*qkv(dtype=torch.bfloat16), impl=impl)
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
# Empty sequences: Nq = 0 or Nk = 0 (no kernel; out = 0, lse = -inf, gradients zero/empty)
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", KERNEL_MODULES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n_q,n_k", [(0, 7), (5, 0), (0, 0)])
def test_empty_sequences(impl, causal, dtype, n_q, n_k, device):
    B, H, D = 2, 3, 8
    q, k, v = make_qkv(B, H, n_q, n_k, D, dtype, device=device, requires_grad=True)
    out, lse = flashtile.attention(q, k, v, causal=causal, impl=impl, return_lse=True)
    assert out.shape == (B, H, n_q, D) and out.dtype == dtype and out.device == q.device
    assert lse.shape == (B, H, n_q) and lse.dtype == torch.float32 and lse.device == q.device
    assert torch.all(out == 0)
    assert torch.all(lse == float("-inf"))
    d_out = torch.randn(B, H, n_q, D, device=device).to(dtype)
    out.backward(d_out)
    for t in (q, k, v):
        assert t.grad is not None and t.grad.shape == t.shape and t.grad.dtype == dtype
        assert torch.all(t.grad == 0), "gradients of an empty attention must be zero"
    assert not flashtile.attention(q, k, v, causal=causal, impl=impl).isnan().any()


# ---------------------------------------------------------------------------------------
# Default scale and return values (these run the kernels)
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", KERNEL_MODULES)
@pytest.mark.parametrize("D", [7, 16, 40])
def test_default_scale_is_one_over_sqrt_d(impl, D, device):
    q, k, v = make_qkv(1, 2, 17, 20, D, torch.float16, device=device)
    default, lse_default = flashtile.attention(q, k, v, impl=impl, return_lse=True)
    explicit, lse_explicit = flashtile.attention(q, k, v, impl=impl, scale=1.0 / math.sqrt(D), return_lse=True)
    assert torch.equal(default, explicit) and torch.equal(lse_default, lse_explicit)
    # ...and the scale matters: another scale gives another answer.
    other, lse_other = flashtile.attention(q, k, v, impl=impl, scale=2.0 / math.sqrt(D), return_lse=True)
    assert not torch.equal(lse_default, lse_other)
    assert (other.float() - default.float()).abs().max() > 1e-2
    # The Function classes default the same way.
    function = getattr(flashtile, FUNCTION_CLASSES[impl])
    via_function, lse_function = function.apply(q, k, v, False, None)
    assert torch.equal(via_function, default) and torch.equal(lse_function, lse_default)


@pytest.mark.parametrize("impl", KERNEL_MODULES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_return_values(impl, dtype, device):
    B, H, n_q, n_k, D = 2, 1, 19, 5, 24
    q, k, v = make_qkv(B, H, n_q, n_k, D, dtype, device=device, requires_grad=True)
    out = flashtile.attention(q, k, v, impl=impl, causal=True)
    assert isinstance(out, torch.Tensor)
    assert out.shape == (B, H, n_q, D) and out.dtype == dtype and out.device == q.device
    out2, lse = flashtile.attention(q, k, v, impl=impl, causal=True, return_lse=True)
    assert torch.equal(out, out2)
    assert lse.shape == (B, H, n_q) and lse.dtype == torch.float32 and lse.device == q.device
    assert out.requires_grad and not lse.requires_grad  # lse is not differentiable
    # causal with Nq > Nk: the first Nq - Nk rows see no key.
    assert torch.all(lse[:, :, : n_q - n_k] == float("-inf"))
    assert torch.isfinite(lse[:, :, n_q - n_k:]).all()
    # lse is the natural-log log-sum-exp of the scaled scores (a loose check here;
    # test_attention_cpu holds it to the float32 tolerance).
    scores = (q.detach().double() @ k.detach().double().transpose(-1, -2)) / math.sqrt(D)
    i = n_q - 1  # the last query sees every key
    assert torch.allclose(lse[:, :, i].double(), torch.logsumexp(scores[:, :, i], dim=-1), atol=1e-3)
    function = getattr(flashtile, FUNCTION_CLASSES[impl])
    out3, lse3 = function.apply(q, k, v, True, None)
    assert torch.equal(out3, out) and torch.equal(lse3, lse)
