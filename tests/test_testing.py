"""The tolerance rule itself (flashtile.testing): it accepts what it should and rejects
what it should, for plain attention and for every model feature (GQA, windows, softcap,
varlen), whose plumbing is checked with stand-in implementations written here in PyTorch.
Also the float64 reference's feature semantics, against a row-by-row truth that shares no
code with it. Pure PyTorch, no kernel: runs anywhere."""
import math

import pytest
import torch

from flashtile.reference import attention_reference
from flashtile.testing import (assert_matches_reference, compare_to_reference, make_grad_out, make_qkv,
                               make_varlen_qkv, random_like, rerun_bitwise, rounding_atol, run_attention,
                               torch_float64, torch_lowprec, ulp)

DTYPES = (torch.float16, torch.bfloat16)


def lowprec(q, k, v, causal, scale, **features):
    return torch_lowprec(q, k, v, causal, scale, **features)


def exact_then_rounded(q, k, v, causal, scale, **features):
    """The float64 result rounded once to the inputs' dtype: the best an implementation can do."""
    out, lse = torch_float64(q, k, v, causal, scale, **features)
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


def lowprec_with_float32_lse(q, k, v, causal, scale, **features):
    """PyTorch's low-precision out (and grads), with an lse computed in float32."""
    out, _ = lowprec(q, k, v, causal, scale, **features)
    _, lse = lowprec(q.detach().float(), k.detach().float(), v.detach().float(), causal, scale, **features)
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


# ---------------------------------------------------------------------------------------
# The features: one code path from the callable to the rule
# ---------------------------------------------------------------------------------------

def feature_case(name, dtype):
    """(q, k, v, d_out, causal, features) of a small case that uses feature `name`."""
    if name == "gqa":  # groups of 2, Nq > Nk
        q, k, v = make_qkv(2, 4, 21, 13, 16, dtype, seed=20, kv_heads=2)
        return q, k, v, random_like(q, seed=21), True, {}
    if name == "window":  # both sides, Nq < Nk: bottom-right aligned
        q, k, v = make_qkv(1, 2, 19, 29, 16, dtype, seed=22)
        return q, k, v, random_like(q, seed=23), False, {"window_size": (5, 3)}
    if name == "softcap":  # with causal, scale large enough for tanh to bend the scores
        q, k, v = make_qkv(1, 2, 19, 19, 16, dtype, seed=24)
        return q, k, v, random_like(q, seed=25), True, {"softcap": 2.0}
    if name == "varlen":  # GQA, one token, Nq != Nk per sequence, causal + left window
        q, k, v, cu_q, cu_k = make_varlen_qkv((1, 9, 17), (1, 13, 11), 4, 16, dtype, seed=26, kv_heads=2)
        features = {"cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k, "window_size": (4, -1)}
        return q, k, v, random_like(q, seed=27), True, features
    raise ValueError(name)


FEATURES = ("gqa", "window", "softcap", "varlen")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", FEATURES)
@pytest.mark.parametrize("fn", [lowprec_with_float32_lse, exact_then_rounded], ids=["torch_lowprec", "rounded_f64"])
def test_features_accept_pytorch_and_the_rounded_truth(dtype, name, fn):
    q, k, v, d_out, causal, features = feature_case(name, dtype)
    report = compare_to_reference(q, k, v, causal=causal, impl=fn, grad_out=d_out, **features)
    assert_matches_reference(report)
    if "cu_seqlens_q" in features:  # FlashAttention-2's varlen layouts
        assert report.results["out"].shape == q.shape and report.results["lse"].shape == (q.shape[1], q.shape[0])
    assert report.results["dk"].shape == k.shape  # GQA: dK, dV keep Hkv heads


def shifted_window(dl, dr):
    """The low-precision computation with a window wider by (dl, dr) keys: off by one."""
    def fn(q, k, v, causal, scale, window_size=(-1, -1), **features):
        left, right = window_size
        if causal:
            right = 0
        window = (left + dl if left >= 0 else left, right + dr if right >= 0 else right)
        return lowprec_with_float32_lse(q, k, v, False, scale, window_size=window, **features)
    return fn


def softcap_ignored(q, k, v, causal, scale, softcap=0.0, **features):
    return lowprec_with_float32_lse(q, k, v, causal, scale, **features)


def softcap_before_scale(q, k, v, causal, scale, softcap=0.0, **features):
    """scale * c tanh(q.k / c) instead of c tanh(scale q.k / c): the reference with a cap of
    scale * c on the scaled scores."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return lowprec_with_float32_lse(q, k, v, causal, scale, softcap=softcap * scale, **features)


def heads_tiled(q, k, v, causal, scale, **features):
    """Query head h reading K/V head h % Hkv (K/V tiled) instead of h // group."""
    repeats = [1] * k.dim()
    repeats[1] = q.shape[1] // k.shape[1]  # heads are dim 1 in (B, H, N, D) and in (total, H, D)
    return lowprec_with_float32_lse(q, k.repeat(*repeats), v.repeat(*repeats), causal, scale, **features)


def sequences_not_separated(q, k, v, causal, scale, cu_seqlens_q=None, cu_seqlens_k=None, **features):
    """The packed batch attended as one long sequence."""
    whole_q = torch.tensor([0, q.shape[0]], dtype=torch.int32)
    whole_k = torch.tensor([0, k.shape[0]], dtype=torch.int32)
    return lowprec_with_float32_lse(q, k, v, causal, scale, cu_seqlens_q=whole_q, cu_seqlens_k=whole_k, **features)


def lse_off(q, k, v, causal, scale, **features):
    out, lse = lowprec_with_float32_lse(q, k, v, causal, scale, **features)
    return out, lse + 1e-3


WRONG = [
    ("window", shifted_window(1, 0), "out:"),
    ("window", shifted_window(0, 1), "out:"),
    ("varlen", shifted_window(1, 0), "out:"),
    ("softcap", softcap_ignored, "out:"),
    ("softcap", softcap_before_scale, "out:"),
    ("gqa", heads_tiled, "out:"),
    ("varlen", heads_tiled, "out:"),
    ("varlen", sequences_not_separated, "out:"),
    ("gqa", lse_off, "lse:"),
    ("varlen", lse_off, "lse:"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,fn,symptom", WRONG, ids=[f"{n}-{f.__name__}" for n, f, _ in WRONG])
def test_features_reject_a_slightly_wrong_implementation(dtype, name, fn, symptom):
    q, k, v, d_out, causal, features = feature_case(name, dtype)
    problems = compare_to_reference(q, k, v, causal=causal, impl=fn, grad_out=d_out, **features).problems()
    assert any(p.startswith(symptom) for p in problems), problems


def test_only_the_features_a_case_sets_reach_the_callable():
    """A callable that knows no feature runs the plain cases (defaults are not passed) and
    fails loudly, never silently, on a case that sets one; a misspelt feature is an error."""
    q, k, v = make_qkv(1, 2, 5, 7, 8, torch.float16)

    def plain(q, k, v, causal, scale):
        return lowprec_with_float32_lse(q, k, v, causal, scale)

    run_attention(plain, q, k, v, window_size=(-1, -1), softcap=0.0, cu_seqlens_q=None, cu_seqlens_k=None)
    run_attention(plain, q, k, v, window_size=[-1, -1])
    with pytest.raises(TypeError, match="window_size"):
        run_attention(plain, q, k, v, window_size=(2, 0))
    with pytest.raises(TypeError, match="softcap"):
        run_attention(plain, q, k, v, softcap=1.0)
    with pytest.raises(TypeError, match="windowsize"):
        run_attention(plain, q, k, v, windowsize=(2, 0))
    with pytest.raises(TypeError, match="cu_seqlens"):
        run_attention(plain, q, k, v, cu_seqlens_q=torch.tensor([0, 5], dtype=torch.int32))


# ---------------------------------------------------------------------------------------
# The reference's feature semantics against a row-by-row truth
# ---------------------------------------------------------------------------------------

def row_by_row(q, k, v, causal, scale, window_size=(-1, -1), softcap=0.0):
    """float64 attention one query row at a time over the keys it sees, sliced out (no mask,
    no code shared with flashtile.reference), rounded once to q's dtype. Dense only."""
    n_q, n_k = q.shape[-2], k.shape[-2]
    group = q.shape[-3] // k.shape[-3]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    left, right = window_size
    outs, lses = [], []
    for i in range(n_q):
        p = i + n_k - n_q
        lo = 0 if left < 0 else max(0, p - left)
        hi = n_k - 1 if right < 0 else min(n_k - 1, p + right)
        if causal:
            hi = min(hi, p)
        row = q[..., i:i + 1, :].double()
        if hi < lo:
            outs.append(row * 0)
            lses.append(torch.full(row.shape[:-1], float("-inf"), dtype=torch.float64))
            continue
        keys = k[..., lo:hi + 1, :].double().repeat_interleave(group, dim=-3)
        values = v[..., lo:hi + 1, :].double().repeat_interleave(group, dim=-3)
        scores = scale * (row @ keys.transpose(-1, -2))
        if softcap > 0:
            scores = softcap * torch.tanh(scores / softcap)
        outs.append(torch.softmax(scores, dim=-1) @ values)
        lses.append(torch.logsumexp(scores, dim=-1))
    return torch.cat(outs, -2).to(q.dtype), torch.cat(lses, -1).float()


@pytest.mark.parametrize("n_q,n_k", [(9, 14), (14, 9), (1, 6), (6, 1)])
@pytest.mark.parametrize("causal,window_size", [(True, (-1, -1)), (False, (3, -1)), (False, (-1, 2)),
                                                (False, (4, 1)), (False, (0, 0)), (True, (2, 5)), (False, (20, 20))],
                         ids=["causal", "left", "right", "both", "zero", "causal-left", "wider"])
def test_reference_windows_match_a_row_by_row_truth(n_q, n_k, causal, window_size):
    """The row-by-row truth meets the rule against the reference in fp16 (forward and
    backward, GQA and a softcap included), so both place every window the same way."""
    q, k, v = make_qkv(1, 4, n_q, n_k, 8, torch.float16, seed=n_q * 31 + n_k, kv_heads=2)
    for softcap in (0.0, 1.5):
        report = compare_to_reference(q, k, v, causal=causal, impl=row_by_row, grad_out=random_like(q),
                                      window_size=window_size, softcap=softcap)
        assert_matches_reference(report)


def test_a_misplaced_window_fails_against_the_row_by_row_truth():
    """The converse: a window anchored top-left (position i instead of i + Nk - Nq) fails."""
    q, k, v = make_qkv(1, 2, 9, 14, 8, torch.float16, seed=5)

    def top_left(q, k, v, causal, scale, window_size=(-1, -1), **features):
        shift = k.shape[-2] - q.shape[-2]  # a window moved left by the length difference
        left, right = window_size
        return row_by_row(q, k, v, causal, scale, (left + shift, right - shift), **features)

    report = compare_to_reference(q, k, v, impl=top_left, window_size=(3, 6))
    assert any(p.startswith("out:") for p in report.problems())


def test_varlen_reference_is_the_dense_reference_per_sequence():
    """varlen_attention_reference on a packed batch equals attention_reference on each
    sequence (through the rule, with the packed layouts)."""
    seqlens_q, seqlens_k = (3, 1, 7), (5, 6, 2)
    q, k, v, cu_q, cu_k = make_varlen_qkv(seqlens_q, seqlens_k, 4, 8, torch.bfloat16, seed=6, kv_heads=2)

    def per_sequence(q, k, v, causal, scale, cu_seqlens_q, cu_seqlens_k, **features):
        outs, lses = [], []
        for b in range(len(seqlens_q)):
            rows_q = slice(int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1]))
            rows_k = slice(int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1]))
            out, lse = row_by_row(q[rows_q].transpose(0, 1), k[rows_k].transpose(0, 1), v[rows_k].transpose(0, 1),
                                  causal, scale, **features)
            outs.append(out.transpose(0, 1))
            lses.append(lse)
        return torch.cat(outs), torch.cat(lses, dim=-1)

    report = compare_to_reference(q, k, v, causal=True, impl=per_sequence, grad_out=random_like(q),
                                  cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, window_size=(2, -1), softcap=3.0)
    assert_matches_reference(report)
