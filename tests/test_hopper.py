"""v2's Hopper forward (flashtile/triton_kernels/v2_hopper.py, Gluon): which calls it serves, and
its results against float64 with the project's rule, every feature and odd lengths, with the
gradients that v2.py's backward takes from its O and lse. Then the one-pass backward
(v2_hopper_backward.py, forced everywhere by FLASHTILE_ONE_PASS_BACKWARD=1) the same way, and
its determinism. On an sm_90 GPU only; elsewhere skipped. The parity suite (test_parity.py)
runs the forward too, wherever it serves v2's calls there."""
import os

import pytest
import torch

from flashtile.testing import check_attention, make_grad_out, make_qkv, make_varlen_qkv
from flashtile.triton_kernels import _common, v2

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HOPPER or v2.v2_hopper is None, reason="needs sm_90 and Gluon")]


MIN_WORK = v2.v2_hopper.MIN_WORK if v2.v2_hopper is not None else None


@pytest.fixture(autouse=True)
def any_size(monkeypatch):
    """The kernel at small shapes too: below MIN_WORK it serves no call (the last test here)."""
    if v2.v2_hopper is not None:
        monkeypatch.setattr(v2.v2_hopper, "MIN_WORK", 0)


def problem_of(q, k, cu_seqlens=None, max_seqlen=None, window=(-1, -1), softcap=0.0):
    return _common.Problem.of(q, k, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, q.shape[-1] ** -0.5,
                              window[0], window[1], softcap)


def served(q, k, cu_seqlens=None, max_seqlen=None, **options):
    """Whether the Hopper kernel would serve attention(q, k, k, **options)."""
    return v2.v2_hopper.supports(q, k, k, problem_of(q, k, cu_seqlens, max_seqlen, **options))


def test_which_calls_it_serves(monkeypatch):
    q, k, _ = make_qkv(2, 4, 100, 100, 128, torch.bfloat16, device="cuda")
    assert served(q, k)
    assert served(*make_qkv(1, 8, 33, 65, 64, torch.float16, device="cuda", layout="bnhd", kv_heads=2)[:2],
                  window=(16, 0), softcap=30.0)
    assert not served(*make_qkv(1, 2, 16, 16, 96, torch.float16, device="cuda")[:2])  # D 96
    assert not served(q.float(), k.float())  # float32
    wide = torch.zeros(2, 4, 100, 129, dtype=torch.bfloat16, device="cuda")
    assert not served(wide[..., 1:], k)  # base and row stride not 16-byte aligned
    packed, _, _, cu_seqlens, _ = make_varlen_qkv([5, 9], [5, 9], 2, 64, torch.float16, device="cuda")
    assert not served(packed, packed, cu_seqlens, 9)
    monkeypatch.setenv("FLASHTILE_GLUON", "0")
    assert not served(q, k)
    monkeypatch.setenv("FLASHTILE_GLUON", "1")
    monkeypatch.setenv("FLASHTILE_PORTABLE", "1")
    assert not served(q, k)


def test_the_hopper_forward_runs(monkeypatch):
    """A served call launches the Gluon forward, not v2.py's (the checks below are not vacuous)."""
    q, k, v = make_qkv(1, 2, 128, 128, 64, torch.float16, device="cuda", requires_grad=True)
    launched = []
    real = v2.v2_hopper.v2_hopper_forward
    monkeypatch.setattr(v2.v2_hopper, "v2_hopper_forward", lambda *args: launched.append("gluon") or real(*args))
    from flashtile import attention
    attention(q, k, v, causal=True).sum().backward()
    assert launched == ["gluon"]


FEATURES = {
    "plain": dict(),
    "causal": dict(causal=True),
    "window": dict(window_size=(37, 5)),
    "left": dict(window_size=(100, -1)),
    "causal_window_softcap": dict(causal=True, window_size=(64, 0), softcap=20.0),
    "softcap": dict(softcap=5.0),
}
SHAPES = [(1, 1), (17, 17), (113, 200), (1023, 1023), (300, 129), (256, 16)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("feature", sorted(FEATURES))
@pytest.mark.parametrize("n_q,n_k", SHAPES)
@pytest.mark.parametrize("groups", [1, 4])
def test_against_float64(dtype, head_dim, feature, n_q, n_k, groups):
    options = dict(FEATURES[feature])
    causal = options.pop("causal", False)
    q, k, v = make_qkv(2, 4, n_q, n_k, head_dim, dtype, device="cuda", seed=n_q + n_k, kv_heads=4 // groups,
                       requires_grad=True)
    window = options.get("window_size", (-1, -1))
    assert served(q, k, window=(window[0], 0 if causal else window[1]), softcap=options.get("softcap", 0.0))
    check_attention(q, k, v, causal, grad_out=make_grad_out(2, 4, n_q, head_dim, dtype, device="cuda"), **options)


def test_matches_the_portable_kernels(monkeypatch):
    """Same inputs through both paths: outputs and gradients within rounding of each other."""
    from flashtile.testing import flashtile_impl, run_attention
    q, k, v = make_qkv(2, 8, 777, 1100, 128, torch.bfloat16, device="cuda", layout="mixed", kv_heads=2)
    d_out = make_grad_out(2, 8, 777, 128, torch.bfloat16, device="cuda")
    hopper = run_attention(flashtile_impl("v2"), q, k, v, True, None, d_out, window_size=(300, 0))
    monkeypatch.setenv("FLASHTILE_GLUON", "0")
    portable = run_attention(flashtile_impl("v2"), q, k, v, True, None, d_out, window_size=(300, 0))
    assert os.environ["FLASHTILE_GLUON"] == "0"
    for name in ("out", "lse", "dq", "dk", "dv"):
        torch.testing.assert_close(hopper[name], portable[name], atol=1e-4 if name == "lse" else 3e-2, rtol=0)


def test_small_calls_stay_on_the_portable_kernel(monkeypatch):
    """Host-bound calls, below MIN_WORK, run v2.py's forward, whose launch is cheaper."""
    monkeypatch.setattr(v2.v2_hopper, "MIN_WORK", MIN_WORK)
    small = torch.empty(1, 2, 128, 64, dtype=torch.float16, device="cuda")
    assert not served(small, small)
    window = torch.empty(1, 16, 16384, 128, dtype=torch.float16, device="cuda")
    assert not served(window, window, window=(255, 0))  # a 256-key window, H 16
    assert served(window, window, window=(1023, 0))
    assert served(window, window)


def one_pass_served(q, k, **options):
    """Whether the one-pass backward would serve attention(q, k, k, **options)'s backward."""
    return v2.v2_hopper_backward.supports_backward(q, k, k, problem_of(q, k, **options))


def test_where_the_one_pass_backward_serves(monkeypatch):
    """By default at D 128 and 256 with at least 4096 queries and keys seen; everywhere the
    forward is served with FLASHTILE_ONE_PASS_BACKWARD=1; nowhere with =0. And then it is what
    runs."""
    monkeypatch.delenv("FLASHTILE_ONE_PASS_BACKWARD", raising=False)
    long = torch.empty(1, 16, 4096, 128, dtype=torch.float16, device="cuda")
    assert one_pass_served(long, long)
    assert one_pass_served(long, long, window=(-1, 0))
    d64 = torch.empty(1, 32, 4096, 64, dtype=torch.float16, device="cuda")
    assert not one_pass_served(d64, d64)
    d256 = torch.empty(1, 8, 4096, 256, dtype=torch.float16, device="cuda")
    assert one_pass_served(d256, d256)
    assert not one_pass_served(d256[:, :, :2048], d256[:, :, :2048])
    n2048 = torch.empty(1, 64, 2048, 128, dtype=torch.float16, device="cuda")
    assert not one_pass_served(n2048, n2048)
    longer = torch.empty(1, 16, 16384, 128, dtype=torch.float16, device="cuda")
    assert one_pass_served(longer, longer, window=(4095, 0))
    assert not one_pass_served(longer, longer, window=(1023, 0))  # 1024 keys seen
    q, k, v = make_qkv(1, 2, 200, 200, 128, torch.float16, device="cuda", requires_grad=True)
    assert not one_pass_served(q, k)
    monkeypatch.setenv("FLASHTILE_ONE_PASS_BACKWARD", "0")
    assert not one_pass_served(long, long)
    monkeypatch.setenv("FLASHTILE_ONE_PASS_BACKWARD", "1")
    assert one_pass_served(q, k, window=(16, 0), softcap=5.0)
    assert one_pass_served(d64, d64) and one_pass_served(n2048, n2048)
    assert one_pass_served(*make_qkv(1, 2, 64, 64, 256, torch.float16, device="cuda")[:2])  # D 256
    launched = []
    real = v2.v2_hopper_backward.v2_hopper_backward
    monkeypatch.setattr(v2.v2_hopper_backward, "v2_hopper_backward",
                        lambda *args: launched.append("one pass") or real(*args))
    from flashtile import attention
    attention(q, k, v, causal=True).sum().backward()
    assert launched == ["one pass"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("feature", sorted(FEATURES))
@pytest.mark.parametrize("n_q,n_k", SHAPES)
@pytest.mark.parametrize("groups", [1, 4])
def test_one_pass_backward_against_float64(monkeypatch, dtype, head_dim, feature, n_q, n_k, groups):
    monkeypatch.setenv("FLASHTILE_ONE_PASS_BACKWARD", "1")
    options = dict(FEATURES[feature])
    causal = options.pop("causal", False)
    q, k, v = make_qkv(2, 4, n_q, n_k, head_dim, dtype, device="cuda", seed=n_q + n_k, kv_heads=4 // groups,
                       requires_grad=True, layout="mixed" if groups == 4 else "contiguous")
    window = options.get("window_size", (-1, -1))
    assert one_pass_served(q, k, window=(window[0], 0 if causal else window[1]), softcap=options.get("softcap", 0.0))
    check_attention(q, k, v, causal, grad_out=make_grad_out(2, 4, n_q, head_dim, dtype, device="cuda"), **options)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [128, 256])
def test_one_pass_backward_repeats_its_bits(monkeypatch, causal, head_dim):
    """The key blocks' turns fix the order of dQ's float32 adds: the same call gives the same
    bits, at a shape where many programs of a head run together (GQA, a window edge, Nq != Nk)."""
    monkeypatch.setenv("FLASHTILE_ONE_PASS_BACKWARD", "1")
    from flashtile.testing import flashtile_impl, run_attention
    q, k, v = make_qkv(2, 8, 2000, 3001, head_dim, torch.bfloat16, device="cuda", kv_heads=2)
    d_out = make_grad_out(2, 8, 2000, head_dim, torch.bfloat16, device="cuda")
    options = dict(window_size=(700, -1 if not causal else 0))
    runs = [run_attention(flashtile_impl("v2"), q, k, v, causal, None, d_out, **options) for _ in range(3)]
    for name in ("dq", "dk", "dv"):
        assert all(torch.equal(run[name], runs[0][name]) for run in runs[1:]), name
