"""GPU tests at real shapes (every test here is @pytest.mark.gpu: skipped without CUDA).

Correctness follows flashtile.testing's rule (FlashAttention-2's): out, dq, dk, dv within
2x PyTorch's own low-precision error of the float64 truth plus one ulp, lse within a float32
tolerance, -inf exactly where no key is seen, no NaN. Also: determinism of v2's backward,
more than 65535 (batch, head) pairs, tensors of more than 2^31 elements, peak memory, and
the portable (sm_80) configuration set.

The first call of each shape autotunes (up to four configs per kernel); the shapes are
chosen so that the whole file runs in a few minutes on an H100.
"""
import gc
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import flashtile
from flashtile.testing import (assert_matches_reference, check_attention, compare, flashtile_impl,
                               reference_results, rerun_bitwise, run_attention)

pytestmark = pytest.mark.gpu

IMPLS = ("v1", "v2", "v2_atomic")
MiB = 1 << 20
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def randn(*shape, dtype, seed, scale=1.0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float32) * scale).to(dtype)


def make_case(B, H, n_q, n_k, D, dtype, seed=0):
    q = randn(B, H, n_q, D, dtype=dtype, seed=seed)
    k = randn(B, H, n_k, D, dtype=dtype, seed=seed + 1)
    v = randn(B, H, n_k, D, dtype=dtype, seed=seed + 2)
    d_out = randn(B, H, n_q, D, dtype=dtype, seed=seed + 3)
    return q, k, v, d_out


@pytest.fixture(autouse=True)
def free_gpu_memory():
    yield
    gc.collect()
    torch.cuda.empty_cache()


@pytest.fixture
def first_config_only(monkeypatch):
    """FLASHTILE_AUTOTUNE=0 for shapes first seen in this test: launch the first shipped
    config (already compiled for the same signature by earlier tests) instead of timing
    four at a shape where each run moves tens of GB. These tests are about 64-bit offsets,
    not about which config wins."""
    monkeypatch.setenv("FLASHTILE_AUTOTUNE", "0")


# ---------------------------------------------------------------------------------------
# Parity with the float64 reference
# ---------------------------------------------------------------------------------------

# Compiling dominates a cold run: each kernel compiles once per candidate config for every
# signature, and Triton specialises integer arguments (lengths, head count, strides) on
# divisibility by 16 and on == 1. So the cases share five signatures and reuse them in the
# later tests; every head count H is > 1 and not a multiple of 16:
#   S1 fp16 D=64 causal, Nq % 16 != 0, Nk % 16 == 0      S2 bf16 D=128 causal, Nq % 16 == 0, Nk % 16 != 0
#   S3 bf16 D=40 full, neither divisible                  S4 fp16 D=256 causal, Nq % 16 != 0, Nk % 16 == 0
#   S5 fp16 D=128 causal, both divisible
# (B, H, Nq, Nk, D, dtype, causal) for v2, forward and backward.
V2_CASES = [
    (2, 3, 1023, 1024, 64, torch.float16, True),  # S1
    (2, 3, 1024, 1023, 128, torch.bfloat16, True),  # S2
    (1, 2, 4097, 4097, 40, torch.bfloat16, False),  # S3
    (1, 2, 1023, 1024, 256, torch.float16, True),  # S4
    (1, 2, 16384, 16384, 128, torch.float16, True),  # S5
]
# (B, H, Nq, Nk, D, dtype, causal) for every implementation, at medium sizes: v1 and
# v2_atomic are compiled for S3 and S5 only (S5 again in every test further down).
ALL_IMPL_CASES = [
    (1, 2, 777, 333, 40, torch.bfloat16, False),  # S3
    (1, 2, 333, 777, 40, torch.bfloat16, False),  # S3 (B, H as above: stride_b's divisibility too)
    (1, 2, 2048, 1024, 128, torch.float16, True),  # S5, with rows that see no key
    (2, 3, 1024, 2048, 128, torch.float16, True),  # S5
]


def _case_id(case):
    B, H, n_q, n_k, D, dtype, causal = case
    return f"B{B}H{H}-{n_q}x{n_k}-d{D}-{str(dtype)[6:]}-{'causal' if causal else 'full'}"


@pytest.mark.parametrize("case", V2_CASES, ids=_case_id)
def test_v2_matches_reference(case):
    B, H, n_q, n_k, D, dtype, causal = case
    q, k, v, d_out = make_case(B, H, n_q, n_k, D, dtype)
    if n_q * n_k < 2**26:
        check_attention(q, k, v, causal=causal, impl="v2", grad_out=d_out)
        return
    # At 16k x 16k the float64 reference keeps several N x N matrices of 2 GB per head
    # for autograd: compare one head at a time (heads are independent).
    results = run_attention(flashtile_impl("v2"), q, k, v, causal, None, d_out)
    for head in range(H):
        sub = lambda t: t[:, head:head + 1]
        f64, low = reference_results(sub(q), sub(k), sub(v), causal, None, sub(d_out))
        assert_matches_reference(compare({n: sub(t) for n, t in results.items()}, f64, low, dtype, name="v2"))
        del f64, low


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", ALL_IMPL_CASES, ids=_case_id)
def test_every_impl_matches_reference(impl, case):
    B, H, n_q, n_k, D, dtype, causal = case
    q, k, v, d_out = make_case(B, H, n_q, n_k, D, dtype, seed=10)
    check_attention(q, k, v, causal=causal, impl=impl, grad_out=d_out)


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_inputs_on_gpu(impl):
    """(B, N, H, D) storage viewed as (B, H, N, D), and a slice of a wider head dim."""
    B, H, n_q, n_k, D, dtype = 2, 3, 1024, 1024, 128, torch.float16  # S5
    qkv = randn(B, n_q, 3, H, D, dtype=dtype, seed=20)  # a fused QKV projection's output
    q = qkv[:, :, 0].transpose(1, 2)
    kv = randn(B, H, n_k, 2 * D + 16, dtype=dtype, seed=21)
    k, v = kv[..., :D], kv[..., D:2 * D]
    d_out = randn(B, H, n_q, D, dtype=dtype, seed=22)
    report = check_attention(q, k, v, causal=True, impl=impl, grad_out=d_out)
    if impl == "v2":  # deterministic: the same bits as contiguous copies
        expected = run_attention(flashtile_impl(impl), q.contiguous(), k.contiguous(), v.contiguous(),
                                 True, None, d_out)
        for name in ("out", "lse", "dq", "dk", "dv"):
            assert torch.equal(report.results[name], expected[name]), name


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n_q,n_k,D,causal", [(1000, 333, 40, True), (333, 1000, 96, False)])
def test_kernels_write_every_output_on_gpu(impl, n_q, n_k, D, causal, poisoned_allocations):
    """Outputs and gradients allocated NaN-filled (tests/conftest.py): an element a compiled
    kernel forgets to write (a tail tile, a fully masked row) stays NaN and fails here."""
    q, k, v, d_out = make_case(2, 3, n_q, n_k, D, torch.float16, seed=71)
    report = check_attention(q, k, v, causal=causal, impl=impl, grad_out=d_out)
    assert poisoned_allocations, "the outputs were not allocated with torch.empty / empty_like"
    for name, t in report.results.items():
        assert not torch.isnan(t).any(), f"{name} has elements the kernels never wrote"


# ---------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------

def test_v2_backward_is_deterministic():
    """v2's backward has no atomics: 20 runs at batch 32 give the same bits."""
    B, H, n_q, n_k, D, dtype = 32, 4, 1023, 1024, 64, torch.float16  # S1
    q, k, v, d_out = make_case(B, H, n_q, n_k, D, dtype, seed=30)
    rerun_bitwise(flashtile_impl("v2"), q, k, v, True, d_out, runs=20, label="v2")


def test_v2_atomic_dk_dv_are_deterministic():
    """v2_atomic adds only dq with atomics; dk and dv (and the forward) repeat exactly."""
    B, H, n_q, n_k, D, dtype = 8, 2, 1024, 1024, 128, torch.float16  # S5
    q, k, v, d_out = make_case(B, H, n_q, n_k, D, dtype, seed=31)
    rerun_bitwise(flashtile_impl("v2_atomic"), q, k, v, True, d_out, runs=10, names=("out", "lse", "dk", "dv"),
                  label="v2_atomic")


# ---------------------------------------------------------------------------------------
# Large grids and large tensors
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
def test_more_than_65535_heads(impl):
    """B * H = 70000 (programs beyond CUDA's 65535 limit on grid y and z); checked against
    the reference on heads spread over the whole range."""
    B, H, n_q, n_k, D, dtype = 35000, 2, 32, 32, 128, torch.float16  # S5
    q, k, v, d_out = make_case(B, H, n_q, n_k, D, dtype, seed=40)
    results = run_attention(flashtile_impl(impl), q, k, v, True, None, d_out)
    for name, t in results.items():
        assert not torch.isnan(t).any(), name
    batches = torch.tensor([0, 1, 17, 32767, 32768, 34999], device="cuda")
    sub = lambda t: t[batches]
    f64, low = reference_results(sub(q), sub(k), sub(v), True, None, sub(d_out))
    assert_matches_reference(compare({n: sub(t) for n, t in results.items()}, f64, low, dtype, name=impl))


@pytest.mark.xdist_group("whole_gpu")  # tens of GB each: never two at once under xdist
def test_forward_on_a_tensor_above_2_31_elements(first_config_only):
    """q and out of (2^24 + 16) x 128 elements: the last rows lie past element 2^31, so
    their offsets need 64-bit arithmetic. Causal (signature S5) with 64 keys: the last 64
    rows see keys, the others output 0. Rows near the start, the 2^31 boundary and the end
    are checked against the reference computed on those rows alone."""
    B, H, n_q, n_k, D, dtype = 1, 3, 2**24 + 16, 64, 128, torch.float16  # H = 3: signature S5
    q = torch.empty(B, H, n_q, D, device="cuda", dtype=dtype)
    gen = torch.Generator(device="cuda").manual_seed(50)
    for start in range(0, n_q, 2**21):  # fill in slices: no 8 GB float32 temporary
        chunk = q[:, :, start:start + 2**21]
        chunk.copy_(torch.randn(chunk.shape, generator=gen, device="cuda"))
    assert q.numel() > 2**31
    k = randn(B, H, n_k, D, dtype=dtype, seed=51)
    v = randn(B, H, n_k, D, dtype=dtype, seed=52)
    out, lse = flashtile.attention(q, k, v, causal=True, impl="v2", return_lse=True)
    first_seeing = n_q - n_k  # the first query that sees a key (bottom-right alignment)
    rows = [0, 1, 2**23, first_seeing - 1, first_seeing, first_seeing + 1, 2**24 - 1, 2**24, 2**24 + 1,
            n_q - 2, n_q - 1]
    rows = torch.tensor(rows, device="cuda")
    assert rows.max().item() * D >= 2**31
    # The reference on the chosen rows: each row's visible keys are its own, so the rows are
    # taken with their causal offset by masking explicitly.
    visible = torch.arange(n_k, device="cuda")[None, :] <= (rows[:, None] + n_k - n_q)
    q_rows = q[:, :, rows].double()
    scores = (q_rows @ k.double().transpose(-1, -2)) / D ** 0.5
    scores = scores.masked_fill(~visible, float("-inf"))
    truth_lse = torch.logsumexp(scores, dim=-1)
    truth = torch.nan_to_num(torch.softmax(scores, dim=-1)) @ v.double()
    got, got_lse = out[:, :, rows], lse[:, :, rows]
    assert not torch.isnan(got).any() and not torch.isnan(got_lse).any()
    seeing = rows >= first_seeing
    assert torch.all(got[:, :, ~seeing] == 0) and torch.all(got_lse[:, :, ~seeing] == float("-inf"))
    assert torch.isfinite(got_lse[:, :, seeing]).all()
    # fp16 rounding of |out| < 2, plus accumulation: the same bound the rule gives at
    # this size (PyTorch's fp16 error here is ~1e-3).
    assert (got.double() - truth).abs().max().item() < 4e-3
    assert (got_lse[:, :, seeing].double() - truth_lse[:, :, seeing]).abs().max().item() < 1e-4
    del q, out, lse


@pytest.mark.parametrize("impl", IMPLS)
def test_backward_with_row_offsets_above_2_31(impl, first_config_only):
    """(B, N, H, D) storage with H = 16385: the sequence stride is H * D ~ 2^21 elements,
    so row 1039 of a head lies 2.18e9 elements in; forward and backward (signature S5),
    checked on a few heads. Each of q, k, v, out, dO, dq, dk, dv is 4.4 GB."""
    B, H, N, D, dtype = 1, 16385, 1040, 128, torch.float16
    gen = torch.Generator(device="cuda").manual_seed(60)

    def bnhd():
        t = torch.empty(B, N, H, D, device="cuda", dtype=dtype)
        for start in range(0, N, 64):
            chunk = t[:, start:start + 64]
            chunk.copy_(torch.randn(chunk.shape, generator=gen, device="cuda"))
        return t.transpose(1, 2)

    q, k, v, d_out = bnhd(), bnhd(), bnhd(), bnhd()
    assert (N - 1) * q.stride(2) >= 2**31 and q.numel() > 2**31
    results = run_attention(flashtile_impl(impl), q, k, v, True, None, d_out)
    heads = torch.tensor([0, 1, 8192, H - 1], device="cuda")
    sub = lambda t: t[:, heads]
    f64, low = reference_results(sub(q), sub(k), sub(v), True, None, sub(d_out))
    assert_matches_reference(compare({n: sub(t) for n, t in results.items()}, f64, low, dtype, name=impl))
    for name in ("out", "dq", "dk", "dv"):  # the rows past 2^31 were written (no NaN anywhere)
        assert not torch.isnan(results[name][:, :, -8:]).any(), name
    del q, k, v, d_out, results


# ---------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------

@pytest.mark.xdist_group("whole_gpu")  # tens of GB each: never two at once under xdist
@pytest.mark.parametrize("impl", IMPLS)
def test_peak_memory_is_linear_in_n(impl):
    """Forward + backward at N = 16384 allocate the outputs, the gradients, O(N) statistics
    and (v1, v2_atomic) a float32 dq accumulator, and no N x N matrix: one head's N x N fp16
    score matrix alone would be 512 MiB."""
    B, H, N, D, dtype = 8, 2, 16384, 128, torch.float16  # S5 (16 heads, H = 2)
    q, k, v, d_out = make_case(B, H, N, N, D, dtype, seed=70)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = flashtile.attention(*leaves, causal=True, impl=impl)  # warm-up: autotuning allocates
    torch.autograd.grad(out, leaves, d_out)
    del out
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = flashtile.attention(*leaves, causal=True, impl=impl)
    grads = torch.autograd.grad(out, leaves, d_out)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    tensor_bytes = q.numel() * q.element_size()
    must_exist = 4 * tensor_bytes  # out, dq, dk, dv
    stats = 4 * B * H * N * 4  # float32 (B, H, N) statistics: lse, delta, m, l
    dq_accumulator = 2 * tensor_bytes  # one float32 copy of dq, for the atomic backwards
    allowed = must_exist + stats + dq_accumulator + 64 * MiB
    n_by_n_one_head = N * N * 2
    assert peak <= allowed, (f"{impl}: peak {peak / MiB:.0f} MiB above the inputs, allowed "
                             f"{allowed / MiB:.0f} MiB (outputs and grads {must_exist / MiB:.0f} MiB)")
    assert peak - must_exist < n_by_n_one_head / 2
    del out, grads


# ---------------------------------------------------------------------------------------
# The portable configuration set
# ---------------------------------------------------------------------------------------

PORTABLE_SCRIPT = textwrap.dedent("""
    import torch
    from flashtile.testing import check_attention
    from flashtile.triton_kernels._common import device_capability

    assert device_capability() == 80, device_capability()
    for impl in ("v1", "v2", "v2_atomic"):
        for B, H, n_q, n_k, D, dtype, causal in [(1, 2, 1024, 2048, 128, torch.float16, True)]:  # S5
            gen = torch.Generator(device="cuda").manual_seed(80)
            q, k, v, d_out = (torch.randn(B, H, n, D, generator=gen, device="cuda").to(dtype)
                              for n in (n_q, n_k, n_k, n_q))
            report = check_attention(q, k, v, causal=causal, impl=impl, grad_out=d_out)
            print("ok", report, flush=True)
    print("portable parity passed")
""")


def test_portable_configs_in_a_subprocess():
    """FLASHTILE_PORTABLE=1 forces the sm_80 configuration sets (what an A100 gets): the
    same parity checks must pass with them. A subprocess, since the configs are chosen
    when the kernel modules are imported."""
    env = dict(os.environ, FLASHTILE_PORTABLE="1")
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", PORTABLE_SCRIPT], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-5000:]}"
    assert "portable parity passed" in proc.stdout
    assert proc.stdout.count("ok ") == 3
