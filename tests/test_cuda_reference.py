"""The CUDA reference (impl="cuda"): its own accuracy rule, conventions and interface.

On the CPU CI machine the installed extension is the host build (the same algorithm and
row functions as the CUDA kernels, compiled for the CPU), so these tests run it on CPU
tensors; the @pytest.mark.gpu tests run the CUDA kernels. The rule
(flashtile.cuda_reference.reference_problems): the float32 results within
REFERENCE_RTOL = 2e-5 of max|f64| elementwise, the fp16/bf16 results in addition within half
an ulp (the final rounding), lse within 1e-5 + 2e-6 |lse|, -inf exactly where no key is seen.
"""
import math
import os
import sys

import pytest
import torch

import flashtile
from conftest import make_grad_out, make_qkv
from flashtile import cuda_reference
from flashtile.cuda_reference import (CudaReferenceAttentionFunction, float32_results, reference_problems)
from flashtile.testing import reference_results, run_attention

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
IDS = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
HAS_CUDA = torch.cuda.is_available()


def _id(x):
    return IDS.get(x, str(x))


def reference_fn(q, k, v, causal, scale):
    return flashtile.attention(q, k, v, causal=causal, scale=scale, impl="cuda", return_lse=True)


def check_reference(q, k, v, causal, scale=None, d_out=None):
    """Both forms of the reference (rounded through flashtile.attention, float32 from the
    bindings) against float64; returns (rounded results, float32 results, f64)."""
    f64, _ = reference_results(q, k, v, causal, scale, d_out)
    rounded = run_attention(reference_fn, q, k, v, causal, scale, d_out)
    raw = float32_results(q, k, v, causal, scale, d_out)
    problems = [f"float32: {p}" for p in reference_problems(raw, f64)]
    problems += [f"rounded to {q.dtype}: {p}" for p in reference_problems(rounded, f64, q.dtype)]
    for name in ("out", "dq", "dk", "dv"):
        if rounded[name] is not None and rounded[name].dtype != q.dtype:
            problems.append(f"{name} has dtype {rounded[name].dtype}, expected {q.dtype}")
    assert not problems, "\n".join(problems)
    return rounded, raw, f64


# ---------------------------------------------------------------------------------------
# The build
# ---------------------------------------------------------------------------------------

def test_extension_is_built():
    """`pip install -e .` builds the extension wherever torch is importable at install time
    (the host build at least); a missing extension is a failure here, not a skip."""
    assert cuda_reference.is_built(), (
        f"flashtile._cuda_reference is not importable ({cuda_reference._import_error}); "
        "reinstall with FLASHTILE_BUILD_EXTENSION=1 pip install -e . --no-build-isolation to see the build error")


@pytest.mark.gpu
def test_the_gpu_build_has_the_cuda_kernels():
    assert cuda_reference.built_with_cuda(), "a CUDA machine got the host build: was nvcc found at install time?"


def test_storage_conversion_is_exact():
    """The reference's own fp16 / bf16 -> float32 conversion (shared by both builds) equals
    torch's on every one of the 65536 bit patterns, NaNs included."""
    ext = cuda_reference.extension()
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    for dtype in (torch.float16, torch.bfloat16):
        x = bits.view(dtype)
        ours, torchs = ext.storage_to_float(x), x.float()
        nan = torch.isnan(torchs)
        assert torch.equal(torch.isnan(ours), nan)
        assert torch.equal(ours[~nan].view(torch.int32), torchs[~nan].view(torch.int32)), dtype
    x = torch.cat([torch.randn(1000), torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-40])])
    assert torch.equal(ext.storage_to_float(x).view(torch.int32), x.view(torch.int32))


# ---------------------------------------------------------------------------------------
# Accuracy against float64 (the host build here; the CUDA kernels in test_parity.py)
# ---------------------------------------------------------------------------------------

# (B, H, Nq, Nk, D, causal, layout): partial tiles (32 keys, 8 rows), Nq > Nk and Nq < Nk,
# rows that see no key, every odd and power-of-two head dim class, all four layouts.
CASES = [
    (1, 1, 1, 1, 1, False, "contiguous"),
    (2, 3, 1, 1, 7, True, "bnhd"),
    (1, 2, 37, 70, 16, True, "sliced"),
    (2, 1, 70, 37, 40, True, "mixed"),
    (1, 2, 33, 33, 64, False, "bnhd"),
    (1, 1, 9, 100, 80, True, "contiguous"),
    (1, 2, 100, 9, 96, False, "mixed"),
    (1, 1, 64, 31, 128, True, "sliced"),
    (1, 1, 20, 45, 192, False, "contiguous"),
    (1, 1, 45, 20, 256, True, "bnhd"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("B,H,n_q,n_k,D,causal,layout", CASES)
def test_matches_float64(B, H, n_q, n_k, D, causal, layout, dtype):
    q, k, v = make_qkv(B, H, n_q, n_k, D, dtype, layout=layout, seed=D)
    d_out = make_grad_out(B, H, n_q, D, dtype, seed=D + 1)
    check_reference(q, k, v, causal, d_out=d_out)


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("scale", [0.01, 0.5, 4.0])
def test_large_and_small_scales(dtype, scale):
    """Keys that grow along the sequence and a scale of 4: the running max moves at every
    tile and exp(lse) would overflow float32 (the online softmax's rescaling)."""
    B, H, n_q, n_k, D = 1, 2, 40, 130, 16
    q, k, v = make_qkv(B, H, n_q, n_k, D, dtype, seed=3)
    k = (k.float() * torch.linspace(0.25, 4.0, n_k)[:, None]).to(dtype)
    d_out = make_grad_out(B, H, n_q, D, dtype, seed=4)
    _, raw, f64 = check_reference(q, k, v, True, scale=scale, d_out=d_out)
    if scale == 4.0:
        assert f64["lse"].abs().max() > 88.0


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_rows_that_see_no_key(dtype):
    """causal, Nq > Nk: the first Nq - Nk rows output 0, have lse = -inf and dq = 0."""
    B, H, n_q, n_k, D = 2, 1, 50, 11, 24
    q, k, v = make_qkv(B, H, n_q, n_k, D, dtype, seed=6)
    d_out = make_grad_out(B, H, n_q, D, dtype, seed=7)
    rounded, raw, _ = check_reference(q, k, v, True, d_out=d_out)
    masked = n_q - n_k
    for res in (rounded, raw):
        assert torch.all(res["out"][:, :, :masked] == 0)
        assert torch.all(res["lse"][:, :, :masked] == float("-inf"))
        assert torch.isfinite(res["lse"][:, :, masked:]).all()
        assert torch.all(res["dq"][:, :, :masked] == 0)
        assert (res["dq"][:, :, masked:] != 0).any()


def test_zero_length_keys_and_empty_batches_in_the_bindings():
    """The launchers themselves (not only flashtile.attention) handle Nk = 0 (O = 0,
    lse = -inf, zero gradients) and B * H = 0 (nothing to do)."""
    ext = cuda_reference.extension()
    q = torch.randn(2, 3, 5, 8)
    k = v = torch.randn(2, 3, 0, 8)
    out, lse = ext.forward(q, k, v, False, 0.5)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))
    dq, dk, dv = ext.backward(torch.randn_like(q), q, k, v, out, lse, False, 0.5)
    assert torch.all(dq == 0) and dk.shape == k.shape and dv.shape == v.shape
    empty = torch.randn(0, 3, 5, 8)
    out, lse = ext.forward(empty, empty, empty, True, 0.5)
    assert out.shape == (0, 3, 5, 8) and lse.shape == (0, 3, 5)


def test_expanded_grad_out():
    """d_out with stride 0 (what out.sum().backward() passes) is read in place."""
    q, k, v = make_qkv(1, 2, 17, 23, 16, torch.float16, seed=8)
    d_out = torch.ones(1, 1, 1, 1, dtype=torch.float16).expand(1, 2, 17, 16)
    check_reference(q, k, v, False, d_out=d_out)


def test_host_build_is_deterministic():
    """Every output element is written by one thread after a fixed-order sum: reruns at
    batch 60 give the same bits (the host build; the GPU's is in test_parity.py)."""
    q, k, v = make_qkv(60, 2, 19, 37, 24, torch.bfloat16, seed=9)
    d_out = make_grad_out(60, 2, 19, 24, torch.bfloat16, seed=10)
    first = run_attention(reference_fn, q, k, v, True, None, d_out)
    for _ in range(3):
        again = run_attention(reference_fn, q, k, v, True, None, d_out)
        for name in ("out", "lse", "dq", "dk", "dv"):
            assert torch.equal(again[name], first[name]), name


# ---------------------------------------------------------------------------------------
# Interface: the same validation and errors as the Triton implementations
# ---------------------------------------------------------------------------------------

def test_cuda_is_an_implementation():
    assert "cuda" in flashtile.IMPLEMENTATIONS
    assert flashtile.CudaReferenceAttentionFunction is CudaReferenceAttentionFunction


def test_float32_only_for_the_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = make_qkv(1, 2, 5, 7, 8, torch.float32)
    out = flashtile.attention(q, k, v, impl="cuda")
    assert out.dtype == torch.float32
    for impl in ("v1", "v2", "v2_atomic"):
        with pytest.raises(TypeError, match=r"\bq\b.*dtype.*float32 with impl='cuda'"):
            flashtile.attention(q, k, v, impl=impl)
    with pytest.raises(TypeError, match=r"\bq\b.*dtype"):
        flashtile.attention(q.double(), k.double(), v.double(), impl="cuda")


def test_cpu_tensors_do_not_need_the_interpreter(monkeypatch):
    """The host build runs CPU tensors whatever TRITON_INTERPRET says."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = make_qkv(1, 2, 5, 7, 8, torch.float16)
    assert flashtile.attention(q, k, v, impl="cuda").shape == q.shape
    with pytest.raises(ValueError, match=r"CUDA|TRITON_INTERPRET"):
        flashtile.attention(q, k, v, impl="v2")
    with pytest.raises(ValueError, match=r"meta"):
        flashtile.attention(q.to("meta"), k.to("meta"), v.to("meta"), impl="cuda")


@pytest.mark.parametrize("call,error,pattern", [
    (lambda q, k, v: flashtile.attention(q, k, v[..., :4], impl="cuda"), ValueError, r"head_dim"),
    (lambda q, k, v: flashtile.attention(q, k, v[:, :1], impl="cuda"), ValueError, r"head counts"),
    (lambda q, k, v: flashtile.attention(q, k[:, :, :3], v, impl="cuda"), ValueError, r"\bk\b and \bv\b"),
    (lambda q, k, v: flashtile.attention(q[0], k, v, impl="cuda"), ValueError, r"\bq\b.*4-D"),
    (lambda q, k, v: flashtile.attention(q, k.half(), v, impl="cuda"), TypeError, r"q, k, v.*dtype"),
    (lambda q, k, v: flashtile.attention(q, k, v, impl="cuda", scale=-1.0), ValueError, r"\bscale\b"),
    (lambda q, k, v: flashtile.attention(q, k, v, impl="cuda", causal=1), TypeError, r"\bcausal\b"),
    (lambda q, k, v: CudaReferenceAttentionFunction.apply(q, k, v, "no", None), TypeError, r"\bcausal\b"),
    (lambda q, k, v: CudaReferenceAttentionFunction.apply(q.int(), k, v, False, None), TypeError, r"dtype"),
], ids=["dim", "heads", "kv_len", "not_4d", "mixed_dtype", "scale", "causal", "apply_causal", "apply_dtype"])
def test_bad_input(call, error, pattern, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the extension was reached with invalid input")

    monkeypatch.setattr(cuda_reference, "forward_float32", never)
    q, k, v = make_qkv(1, 2, 5, 7, 8, torch.float32)
    with pytest.raises(error, match=pattern):
        call(q, k, v)


def test_head_dim_above_256():
    q = torch.zeros(1, 1, 3, 257)
    with pytest.raises(ValueError, match=r"head_dim.*256"):
        flashtile.attention(q, q, q, impl="cuda")


# (call, error type, the whole message): the messages carry numbers, which the bindings format
# without iostreams (see test_bindings_messages_with_a_static_libstdcxx).
BINDINGS_ERRORS = [
    ("forward", "q.double(), q.double(), q.double(), False, 0.5", TypeError,
     "q has dtype Double; the CUDA reference supports float16, bfloat16 and float32"),
    ("forward", "q, q, q[..., :4], False, 0.5", RuntimeError, "head_dim differs: q 8, k 8, v 4"),
    ("forward", "z, z, z, False, 0.5", RuntimeError, "head_dim must be in 1..256, got 300"),
    ("forward", "q, q, q, False, float('nan')", RuntimeError, "scale must be finite and positive, got nan"),
    ("forward", "q[0], q, q, False, 0.5", RuntimeError, "q must be 4-D (batch, heads, seq, head_dim), got [2, 5, 8]"),
    ("backward", "q, q, q, q, out.half(), lse, False, 0.5", TypeError,
     "out must be float32 (the forward's), got Half"),
    ("backward", "q, q, q, q, out, lse[:, :1], False, 0.5", RuntimeError,
     "lse has shape [1, 1, 5], expected [1, 2, 5]"),
]
BINDINGS_SETUP = "q = torch.randn(1, 2, 5, 8)\nz = torch.zeros(1, 1, 2, 300)\nout, lse = ext.forward(q, q, q, False, 0.5)\n"


def test_the_bindings_check_too():
    """Called directly, the bindings refuse what the launchers cannot take, with the whole
    message (its numbers included)."""
    ext = cuda_reference.extension()
    scope = {"ext": ext, "torch": torch}
    exec(BINDINGS_SETUP, scope)
    for function, args, error, message in BINDINGS_ERRORS:
        with pytest.raises(error) as caught:
            eval(f"ext.{function}({args})", scope)
        assert str(caught.value) == message, (function, args)


def test_bindings_messages_with_a_static_libstdcxx(tmp_path):
    """The host build of the bindings linked with -static-libstdc++ (as the GPU machine's
    build ended up: its own copy of libstdc++'s runtime beside the process's shared one)
    still writes whole messages. A std::ostringstream there cannot format numbers (the
    message stopped at its first number here; the GPU machine's process crashed). Built
    with torch.utils.cpp_extension.load, checked in a child process."""
    import subprocess

    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        pytest.skip("torch.utils.cpp_extension.load needs ninja")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sources = [os.path.join(root, "bindings", "attention_bindings.cpp"),
               os.path.join(root, "cuda_reference", "attention_host.cpp")]
    checks = "".join(
        f"try:\n    ext.{function}({args})\nexcept Exception as e:\n    print(type(e).__name__ + ': ' + str(e))\n"
        for function, args, _, _ in BINDINGS_ERRORS)
    code = ("import sys, torch\nfrom torch.utils import cpp_extension\n"
            f"ext = cpp_extension.load('ft_static_libstdcxx', {sources!r}, extra_cflags=['-O1'], "
            f"extra_ldflags=['-static-libstdc++'], build_directory={str(tmp_path)!r})\n" + BINDINGS_SETUP + checks)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    expected = [f"{error.__name__}: {message}" for _, _, error, message in BINDINGS_ERRORS]
    assert proc.stdout.splitlines() == expected


def test_many_bindings_errors_in_one_process():
    """Twelve argument errors raised by the bindings in one process, each a Python exception
    (no c10::Error: with TORCH_SHOW_CPP_STACKTRACES=1 one would carry its C++ backtrace). In
    a child process, so that a crash fails this test instead of killing pytest; on a CUDA
    machine it runs a Triton kernel and the CUDA reference first."""
    import subprocess

    cuda_reference.extension()  # a clear failure here if the extension is not built
    code = ("import torch, flashtile\nfrom flashtile import cuda_reference\next = cuda_reference.extension()\n"
            "if torch.cuda.is_available():\n"
            "    x = torch.randn(1, 2, 64, 64, device='cuda', dtype=torch.float16)\n"
            "    flashtile.attention(x, x, x, impl='v2'), flashtile.attention(x, x, x, impl='cuda')\n"
            "q = torch.randn(1, 2, 5, 8)\nmessages = []\n"
            "for bad in [(q.double(), q, q), (q, q, q[..., :4]), (q[0], q, q)] * 4:\n"
            "    try:\n        ext.forward(*bad, False, 0.5)\n"
            "    except (TypeError, RuntimeError) as e:\n        messages.append(str(e))\n"
            "print(len(messages), 'raised; first:', repr(messages[0]))\n")
    env = dict(os.environ, TORCH_SHOW_CPP_STACKTRACES="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    assert "12 raised; first: 'q has dtype Double;" in proc.stdout, proc.stdout
    assert "Exception raised from" not in proc.stdout, proc.stdout


def test_not_built_raises_a_clear_error(monkeypatch):
    """Without the extension flashtile imports and impl='cuda' says it was not built."""
    monkeypatch.setitem(sys.modules, "flashtile._cuda_reference", None)  # import now fails
    assert not cuda_reference.is_built()
    q, k, v = make_qkv(1, 2, 5, 7, 8, torch.float16)
    with pytest.raises(RuntimeError, match=r"impl='cuda'.*was not built"):
        flashtile.attention(q, k, v, impl="cuda")


def test_flashtile_imports_without_the_extension(tmp_path):
    import subprocess

    code = ("import sys; sys.modules['flashtile._cuda_reference'] = None\n"
            "import flashtile, torch\n"
            "from flashtile import cuda_reference\n"
            "assert not cuda_reference.is_built()\n"
            "q = torch.zeros(1, 1, 2, 4, dtype=torch.float16)\n"
            "try:\n    flashtile.attention(q, q, q, impl='cuda')\n"
            "except RuntimeError as e:\n    print('raised:', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "raised: impl='cuda'" in proc.stdout and "not built" in proc.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_cuda_kernels_match_the_host_build(dtype):
    """The CUDA kernels and the host build run one algorithm: on the same inputs their
    float32 results agree to float32 rounding (not bitwise: the GPU sums over a tile by
    butterfly, the CPU in order), and both meet the rule."""
    B, H, n_q, n_k, D = 2, 3, 77, 141, 72
    q, k, v = make_qkv(B, H, n_q, n_k, D, dtype, layout="mixed", seed=11)
    d_out = make_grad_out(B, H, n_q, D, dtype, seed=12)
    cpu = float32_results(q, k, v, True, None, d_out)
    gpu = float32_results(q.cuda(), k.cuda(), v.cuda(), True, None, d_out.cuda())
    f64, _ = reference_results(q, k, v, True, None, d_out)
    assert not reference_problems(cpu, f64), reference_problems(cpu, f64)
    gpu = {name: t.cpu() for name, t in gpu.items()}
    assert not reference_problems(gpu, f64), reference_problems(gpu, f64)
    for name in ("out", "dq", "dk", "dv"):
        scale = f64[name].abs().max().item()
        assert (gpu[name] - cpu[name]).abs().max().item() <= 2 * cuda_reference.REFERENCE_RTOL * scale, name
    assert torch.equal(torch.isinf(gpu["lse"]), torch.isinf(cpu["lse"]))
