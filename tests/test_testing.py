"""The tolerance rule itself (flashtile.testing): it accepts what it should and rejects
what it should. Pure PyTorch, no kernel: runs anywhere."""
import math

import pytest
import torch

from conftest import make_grad_out, make_qkv
from flashtile.reference import attention_reference
from flashtile.testing import assert_matches_reference, compare_to_reference, rerun_bitwise, rounding_atol, ulp

DTYPES = (torch.float16, torch.bfloat16)


def lowprec(q, k, v, causal, scale):
    return attention_reference(q, k, v, causal=causal, scale=scale, upcast=False)


def exact_then_rounded(q, k, v, causal, scale):
    """The float64 result rounded once to the inputs' dtype: the best an implementation can do."""
    out, lse = attention_reference(q, k, v, causal=causal, scale=scale, upcast=True)
    return out.to(q.dtype), lse.float()


def _case(dtype, n_q=33, n_k=17, causal=True):
    q, k, v = make_qkv(2, 2, n_q, n_k, 24, dtype, seed=3)
    return q, k, v, make_grad_out(2, 2, n_q, 24, dtype, seed=4), causal


def test_ulp():
    assert ulp(torch.float16, 1.0) == 2.0 ** -10
    assert ulp(torch.float16, 0.3) == 2.0 ** -12
    assert ulp(torch.bfloat16, 0.3) == 2.0 ** -9
    assert ulp(torch.bfloat16, 5.0) == 2.0 ** -5
    # the FA2 trick, 2 * (ref + 0.3 - 0.3 - ref).abs().max() in low precision, is about
    # the atol used: within a factor of two on a tensor of many elements
    ref = torch.randn(4096, dtype=torch.float64) * 0.1
    for dtype in DTYPES:
        low = ref.to(dtype)
        trick = 2 * (low + 0.3 - 0.3 - low).abs().max().item()
        assert trick / 2 <= rounding_atol(dtype, ref) <= 2 * trick


def lowprec_with_float32_lse(q, k, v, causal, scale):
    """PyTorch's low-precision out (and grads), with an lse computed in float32."""
    out, _ = lowprec(q, k, v, causal, scale)
    _, lse = attention_reference(q.detach().float(), k.detach().float(), v.detach().float(), causal=causal,
                                 scale=scale, upcast=False)
    return out, lse


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fn", [lowprec_with_float32_lse, exact_then_rounded], ids=["torch_lowprec", "rounded_f64"])
def test_accepts_pytorch_and_the_rounded_truth(dtype, fn):
    q, k, v, d_out, causal = _case(dtype)
    grad_out = d_out if fn is lowprec_with_float32_lse else None
    assert_matches_reference(compare_to_reference(q, k, v, causal=causal, impl=fn, grad_out=grad_out))


def test_pytorch_low_precision_lse_is_not_float32_accurate():
    """The lse tolerance is a float32 one: PyTorch's lse computed in bf16 breaks it."""
    q, k, v, d_out, causal = _case(torch.bfloat16)
    assert any(p.startswith("lse:") for p in compare_to_reference(q, k, v, causal=causal, impl=lowprec).problems())


@pytest.mark.parametrize("dtype", DTYPES)
def test_rejects_top_left_causal_alignment(dtype):
    q, k, v, d_out, _ = _case(dtype, n_q=17, n_k=33)

    def top_left(q, k, v, causal, scale):
        n_q, n_k = q.shape[-2], k.shape[-2]
        # keys j <= i, as if Nq == Nk: the first n_k - n_q keys hidden from too many rows
        mask = torch.arange(n_k)[None, :] <= torch.arange(n_q)[:, None]
        scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~mask, float("-inf"))
        return (torch.softmax(scores, -1) @ v.float()).to(q.dtype), torch.logsumexp(scores, -1)

    report = compare_to_reference(q, k, v, causal=True, impl=top_left)
    assert not report.ok
    assert any(p.startswith("out:") for p in report.problems())


@pytest.mark.parametrize("dtype", DTYPES)
def test_rejects_a_slightly_wrong_scale(dtype):
    q, k, v, d_out, causal = _case(dtype)

    def off_by_one_percent(q, k, v, causal, scale):
        return lowprec(q, k, v, causal, 1.01 / math.sqrt(q.shape[-1]))

    report = compare_to_reference(q, k, v, causal=causal, impl=off_by_one_percent, grad_out=d_out)
    assert not report.ok


def test_rejects_a_low_precision_lse():
    q, k, v, d_out, causal = _case(torch.float16)

    def fp16_lse(q, k, v, causal, scale):
        out, lse = lowprec(q, k, v, causal, scale)
        return out, lse.half().float()

    report = compare_to_reference(q, k, v, causal=causal, impl=fp16_lse)
    assert any(p.startswith("lse:") for p in report.problems())


def test_rejects_nan_and_wrong_infinities():
    q, k, v, d_out, causal = _case(torch.bfloat16)  # Nq > Nk, causal: masked rows

    def nan_in_masked_rows(q, k, v, causal, scale):
        out, lse = lowprec(q, k, v, causal, scale)
        out = out.clone()
        out[:, :, 0] = float("nan")
        return out, lse

    def finite_lse_in_masked_rows(q, k, v, causal, scale):
        out, lse = lowprec(q, k, v, causal, scale)
        return out, torch.nan_to_num(lse, neginf=-1e4)

    problems = compare_to_reference(q, k, v, causal=causal, impl=nan_in_masked_rows).problems()
    assert "out contains NaN" in problems
    problems = compare_to_reference(q, k, v, causal=causal, impl=finite_lse_in_masked_rows).problems()
    assert any("-inf" in p for p in problems)


def test_rejects_wrong_shapes_and_dtypes():
    q, k, v, d_out, causal = _case(torch.float16)

    def float32_out(q, k, v, causal, scale):
        out, lse = lowprec(q, k, v, causal, scale)
        return out.float(), lse

    def float64_lse(q, k, v, causal, scale):
        out, lse = lowprec(q, k, v, causal, scale)
        return out, lse.double()

    assert any("dtype" in p for p in compare_to_reference(q, k, v, causal=causal, impl=float32_out).problems())
    assert any("dtype" in p for p in compare_to_reference(q, k, v, causal=causal, impl=float64_lse).problems())


def test_rerun_bitwise_catches_a_changed_bit():
    """rerun_bitwise (the determinism tests' helper) fails on a one-ulp change in a named
    result, ignores it in an unnamed one, and returns every run."""
    q = k = v = torch.randn(1, 1, 4, 8, dtype=torch.float64)
    calls = []

    def drifting(q, k, v, causal, scale):  # out gains one ulp from the second call on
        calls.append(1)
        out = q * 2 + k + v
        if len(calls) > 1:
            out = torch.nextafter(out, torch.full_like(out, math.inf))
        return out, out.sum(-1)

    steady = lambda q, k, v, causal, scale: (q + k + v, (q + k + v).sum(-1))
    assert len(rerun_bitwise(steady, q, k, v, False, None, runs=3, names=("out", "lse"))) == 3
    with pytest.raises(AssertionError, match="out differs on run 2"):
        rerun_bitwise(drifting, q, k, v, False, None, runs=3, names=("out",))
    calls.clear()
    rerun_bitwise(drifting, q, k, v, False, None, runs=3, names=())
