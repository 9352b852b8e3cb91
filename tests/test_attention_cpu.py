"""Numerics of every implementation on Triton's CPU interpreter (TRITON_INTERPRET=1).

The interpreter runs each kernel with 16 x 16 tiles, so sequence lengths 17, 33 and 65 give
partial tiles and several blocks, and head dims 7 and 40 give a partly masked D tile.
Every case is judged by flashtile.testing's rule (FlashAttention-2's): out, dq, dk, dv within
2x PyTorch's own low-precision error of the float64 truth, plus one ulp; lse within a
float32 tolerance; -inf exactly where no key is seen; no NaN.
"""
import itertools
import math

import pytest
import torch

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # installed by `pip install -e .[test]`; without it only the property test skips
    given = None

import flashtile
from conftest import make_grad_out, make_qkv
from flashtile.testing import (assert_matches_reference, check_attention, compare, compare_to_reference,
                               flashtile_impl, reference_results, rerun_bitwise, run_attention, ulp)

pytestmark = pytest.mark.interpreter

IMPLS = ("v1", "v2", "v2_atomic")
DTYPES = (torch.float16, torch.bfloat16)
DTYPE_IDS = {torch.float16: "fp16", torch.bfloat16: "bf16"}
HEAD_DIMS = (7, 16, 40, 64)
# (Nq, Nk): single rows and keys, partial tiles, several blocks, Nq > Nk and Nq < Nk
# (causal alignment), and exact multiples of the 16-wide tile.
SEQ_LENS = ((1, 1), (17, 17), (33, 17), (17, 33), (65, 65), (1, 33), (33, 1), (32, 48), (64, 16))
BATCH_HEADS = ((1, 1), (2, 3), (1, 2), (2, 1))


def _id(value):
    return DTYPE_IDS.get(value, str(value))


def _results(impl, q, k, v, causal, d_out):
    """The implementation's out, lse, dq, dk, dv (no reference)."""
    return run_attention(flashtile_impl(impl), q, k, v, causal, None, d_out)


def run_case(impl, B, H, n_q, n_k, D, dtype, causal, scale=None, layout="contiguous", seed=0):
    q, k, v = make_qkv(B, H, n_q, n_k, D, dtype, layout=layout, seed=seed)
    d_out = make_grad_out(B, H, n_q, D, dtype, seed=seed + 1)
    return check_attention(q, k, v, causal=causal, scale=scale, impl=impl, grad_out=d_out)


# ---------------------------------------------------------------------------------------
# Parity with the float64 reference
# ---------------------------------------------------------------------------------------

def _grid():
    """Every impl x dtype x causal x sequence-length pair; the head dim and (B, H) rotate
    across the sequence lengths so that every (impl, dtype, causal) meets every head dim."""
    cases = []
    for (d_index, dtype), (c_index, causal) in itertools.product(enumerate(DTYPES), enumerate((False, True))):
        for i, (n_q, n_k) in enumerate(SEQ_LENS):
            D = HEAD_DIMS[(i + d_index + 2 * c_index) % len(HEAD_DIMS)]
            B, H = BATCH_HEADS[(i + c_index) % len(BATCH_HEADS)]
            if n_q * n_k >= 65 * 65 and D == 64:
                B, H = 2, 3  # the largest case runs once per combination at B * H = 6
            cases.append((B, H, n_q, n_k, D, dtype, causal))
    return cases


GRID = _grid()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B,H,n_q,n_k,D,dtype,causal", GRID, ids=lambda x: _id(x))
def test_matches_reference(impl, B, H, n_q, n_k, D, dtype, causal):
    run_case(impl, B, H, n_q, n_k, D, dtype, causal)


def test_grid_covers_every_head_dim():
    for dtype, causal in itertools.product(DTYPES, (False, True)):
        dims = {case[4] for case in GRID if case[5] == dtype and case[6] == causal}
        assert dims == set(HEAD_DIMS)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D", [1, 3, 7, 16, 24, 40, 64])
def test_head_dims(impl, dtype, causal, D):
    n_q, n_k = (33, 17) if causal else (17, 33)
    run_case(impl, 1, 2, n_q, n_k, D, dtype, causal)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("scale", [0.05, 0.5, 3.0])
def test_explicit_scale(impl, dtype, scale):
    run_case(impl, 2, 1, 17, 33, 16, dtype, causal=True, scale=scale)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("direction", ["growing", "shrinking"])
def test_online_softmax_rescaling(impl, dtype, causal, direction):
    """Scores whose row maximum moves from block to block, by a lot.

    Keys grow (or shrink) in norm along the sequence, so each new 16-key block raises the
    running maximum (or never does), and the scale makes scores of order 100: exp without
    the max subtracted would overflow float32. Exercises the rescaling of the running sum
    and output (the correction factor) and the -inf handling of the first block."""
    B, H, n_q, n_k, D = 1, 2, 33, 65, 16
    q, k, v = make_qkv(B, H, n_q, n_k, D, dtype, seed=3)
    ramp = torch.linspace(0.25, 4.0, n_k)
    if direction == "shrinking":
        ramp = ramp.flip(0)
    k = (k.float() * ramp[:, None]).to(dtype)
    d_out = make_grad_out(B, H, n_q, D, dtype, seed=4)
    report = check_attention(q, k, v, causal=causal, scale=4.0, impl=impl, grad_out=d_out)
    assert report.reference["lse"].abs().max() > 88.0  # exp(88.7) overflows float32


# ---------------------------------------------------------------------------------------
# Causal masking: bottom-right alignment and rows that see no key
# ---------------------------------------------------------------------------------------

def _rowwise_truth(q, k, v, scale, visible_keys):
    """float64 attention computed one query row at a time over keys [0, visible_keys(i)),
    with no mask and no shared code with flashtile.reference."""
    B, H, n_q, D = q.shape
    out = torch.zeros(B, H, n_q, D, dtype=torch.float64)
    lse = torch.full((B, H, n_q), float("-inf"), dtype=torch.float64)
    q, k, v = q.double(), k.double(), v.double()
    for i in range(n_q):
        n = visible_keys(i)
        if n <= 0:
            continue
        scores = torch.einsum("bhd,bhnd->bhn", q[:, :, i], k[:, :, :n]) * scale
        out[:, :, i] = torch.einsum("bhn,bhnd->bhd", torch.softmax(scores, dim=-1), v[:, :, :n])
        lse[:, :, i] = torch.logsumexp(scores, dim=-1)
    return out, lse


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n_q,n_k", [(17, 40), (40, 17), (1, 33), (33, 1), (16, 48), (48, 16), (20, 20)])
def test_causal_is_bottom_right_aligned(impl, n_q, n_k):
    """Query i sees keys j <= i + Nk - Nq, checked row by row against a truth that knows
    nothing of masks: attention of row i over the first i + Nk - Nq + 1 keys."""
    B, H, D, dtype = 1, 2, 16, torch.float16
    q, k, v = make_qkv(B, H, n_q, n_k, D, dtype, seed=5)
    out, lse = flashtile.attention(q, k, v, causal=True, impl=impl, return_lse=True)
    truth, truth_lse = _rowwise_truth(q, k, v, 1 / math.sqrt(D), lambda i: min(n_k, i + n_k - n_q + 1))
    assert torch.equal(torch.isinf(lse), torch.isinf(truth_lse))
    finite = torch.isfinite(truth_lse)
    assert (lse.double()[finite] - truth_lse[finite]).abs().max() < 1e-4
    # fp16 output: a few ulps at |out| <= ~3; the top-left alignment would be off by O(1).
    assert (out.double() - truth).abs().max() < 1e-2
    # The last query sees every key, as without the mask; with Nq <= Nk the first query
    # sees Nk - Nq + 1 keys.
    full = flashtile.attention(q, k, v, causal=False, impl=impl)
    assert (out[:, :, -1].double() - full[:, :, -1].double()).abs().max() < 1e-2
    if n_q > 1 and n_k > 1:
        # and the mask does change earlier rows
        assert (out[:, :, 0].double() - full[:, :, 0].double()).abs().max() > 1e-2


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("n_q,n_k,D", [(33, 17, 16), (33, 1, 7), (65, 16, 40), (20, 3, 64), (2, 1, 16)])
def test_rows_that_see_no_key(impl, dtype, n_q, n_k, D):
    """causal with Nq > Nk: the first Nq - Nk queries see no key. They output 0, have
    lse = -inf and zero dq, and nothing anywhere is NaN; the other rows still match."""
    B, H = 2, 1
    report = run_case(impl, B, H, n_q, n_k, D, dtype, causal=True, seed=6)
    masked = n_q - n_k
    res = report.results
    for name in ("out", "lse", "dq", "dk", "dv"):
        assert not torch.isnan(res[name]).any(), name
    assert torch.all(res["out"][:, :, :masked] == 0)
    assert torch.all(res["lse"][:, :, :masked] == float("-inf"))
    assert torch.isfinite(res["lse"][:, :, masked:]).all()
    assert torch.all(res["dq"][:, :, :masked] == 0)
    if n_k > 1:  # (over a single key the softmax is constant: dq is 0 everywhere)
        assert (res["dq"][:, :, masked:] != 0).any()


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_rows_ignore_their_grad_out(impl):
    """Rows that see no key contribute nothing to any gradient, whatever their grad_out."""
    B, H, n_q, n_k, D, dtype = 1, 2, 40, 9, 16, torch.float16
    masked = n_q - n_k
    q, k, v = make_qkv(B, H, n_q, n_k, D, dtype, seed=7)
    d_out = make_grad_out(B, H, n_q, D, dtype, seed=8)
    loud = d_out.clone()
    loud[:, :, :masked] = 1000.0
    quiet = _results(impl, q, k, v, True, d_out)
    noisy = _results(impl, q, k, v, True, loud)
    for name in ("out", "lse", "dk", "dv"):
        assert torch.equal(quiet[name], noisy[name]), name
    assert torch.all(noisy["dq"][:, :, :masked] == 0)
    if "dq" in DETERMINISTIC[impl]:
        assert torch.equal(quiet["dq"], noisy["dq"])
    else:  # summed with atomics: the same terms, perhaps in another order
        bound = 2 * ulp(dtype, quiet["dq"].abs().max().item())
        assert (quiet["dq"].float() - noisy["dq"].float()).abs().max() <= bound


# ---------------------------------------------------------------------------------------
# Memory layouts
# ---------------------------------------------------------------------------------------

# Quantities each implementation computes deterministically (the same bits for the same
# values, whatever the strides). dq of v1 and v2_atomic is summed with atomic adds, whose
# order may vary on a GPU; it is held to the reference rule instead.
DETERMINISTIC = {"v1": ("out", "lse", "dk", "dv"), "v2": ("out", "lse", "dq", "dk", "dv"),
                 "v2_atomic": ("out", "lse", "dk", "dv")}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["bnhd", "sliced", "mixed"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_strided_inputs(impl, layout, causal, dtype):
    """Transposed (B, N, H, D) views and views of a wider head dim (padded with NaN, so a
    read past D would show) give the contiguous inputs' results."""
    B, H, n_q, n_k, D = 2, 3, 33, 17, 40
    contiguous = make_qkv(B, H, n_q, n_k, D, dtype, seed=9)
    strided = make_qkv(B, H, n_q, n_k, D, dtype, layout=layout, seed=9)
    assert all(torch.equal(a, b) for a, b in zip(contiguous, strided))
    assert not all(t.is_contiguous() for t in strided)
    d_out = make_grad_out(B, H, n_q, D, dtype, seed=10)
    expected = _results(impl, *contiguous, causal, d_out)
    report = compare_to_reference(*strided, causal=causal, impl=impl, grad_out=d_out)
    assert_matches_reference(report)
    for name in DETERMINISTIC[impl]:
        assert torch.equal(report.results[name], expected[name]), f"{name} differs from the contiguous run"
    for name in ("dq", "dk", "dv"):
        assert report.results[name].shape == (B, H, n_q if name == "dq" else n_k, D)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("how", ["expanded", "transposed", "sliced"])
def test_strided_grad_out(impl, how):
    """The upstream gradient can have any strides too: stride 0 (the gradient of a sum),
    a transposed view, a slice of a wider tensor."""
    B, H, n_q, n_k, D, dtype = 2, 2, 33, 20, 24, torch.float16
    q, k, v = make_qkv(B, H, n_q, n_k, D, dtype, seed=11)
    if how == "expanded":
        d_out = make_grad_out(1, 1, 1, D, dtype, seed=12).expand(B, H, n_q, D)
    elif how == "transposed":
        d_out = make_grad_out(B, n_q, H, D, dtype, seed=12).transpose(1, 2)
    else:
        d_out = make_grad_out(B, H, n_q, 2 * D, dtype, seed=12)[..., D:]
    assert not d_out.is_contiguous()
    expected = _results(impl, q, k, v, True, d_out.contiguous())
    report = compare_to_reference(q, k, v, causal=True, impl=impl, grad_out=d_out)
    assert_matches_reference(report)
    for name in DETERMINISTIC[impl]:
        assert torch.equal(report.results[name], expected[name]), name


# ---------------------------------------------------------------------------------------
# Every output element is written
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n_q,n_k,D,causal", [
    (33, 17, 40, False), (33, 17, 40, True), (17, 33, 7, True), (65, 16, 16, True), (1, 1, 1, False),
    (48, 32, 64, True)])
def test_kernels_write_every_output(impl, n_q, n_k, D, causal, poisoned_allocations):
    B, H, dtype = 2, 2, torch.bfloat16
    q, k, v = make_qkv(B, H, n_q, n_k, D, dtype, seed=13)
    d_out = make_grad_out(B, H, n_q, D, dtype, seed=14)
    report = compare_to_reference(q, k, v, causal=causal, impl=impl, grad_out=d_out)
    assert poisoned_allocations, "the outputs were not allocated with torch.empty / empty_like"
    for name, t in report.results.items():
        assert not torch.isnan(t).any(), f"{name} has elements the kernels never wrote"
    assert_matches_reference(report)


@pytest.mark.parametrize("impl", IMPLS)
def test_deterministic_quantities_repeat_bitwise(impl):
    B, H, n_q, n_k, D, dtype = 1, 2, 33, 40, 40, torch.float16
    q, k, v = make_qkv(B, H, n_q, n_k, D, dtype, seed=15)
    d_out = make_grad_out(B, H, n_q, D, dtype, seed=16)
    rerun_bitwise(flashtile_impl(impl), q, k, v, True, d_out, runs=2, names=DETERMINISTIC[impl], label=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_gradients_for_a_subset_of_inputs(impl):
    """Only q (or only k and v) requiring grad gives the gradients of all three."""
    B, H, n_q, n_k, D, dtype = 1, 2, 17, 33, 16, torch.float16
    q, k, v = make_qkv(B, H, n_q, n_k, D, dtype, seed=17)
    d_out = make_grad_out(B, H, n_q, D, dtype, seed=18)
    full = _results(impl, q, k, v, False, d_out)
    q_leaf = q.clone().requires_grad_()
    (dq,) = torch.autograd.grad(flashtile.attention(q_leaf, k, v, impl=impl), [q_leaf], d_out)
    k_leaf, v_leaf = k.clone().requires_grad_(), v.clone().requires_grad_()
    dk, dv = torch.autograd.grad(flashtile.attention(q, k_leaf, v_leaf, impl=impl), [k_leaf, v_leaf], d_out)
    partial = dict(full, dq=dq, dk=dk, dv=dv)
    for name in DETERMINISTIC[impl]:
        assert torch.equal(partial[name], full[name]), name
    f64, low = reference_results(q, k, v, False, None, d_out)
    assert_matches_reference(compare(partial, f64, low, dtype, name=impl))


# ---------------------------------------------------------------------------------------
# Property test
# ---------------------------------------------------------------------------------------

if given is not None:
    @settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(B=st.integers(1, 2), H=st.integers(1, 2), n_q=st.integers(1, 40), n_k=st.integers(1, 40),
           D=st.integers(1, 64), causal=st.booleans(), dtype=st.sampled_from(DTYPES),
           impl=st.sampled_from(IMPLS), seed=st.integers(0, 2**16))
    def test_property_matches_reference(B, H, n_q, n_k, D, causal, dtype, impl, seed):
        run_case(impl, B, H, n_q, n_k, D, dtype, causal, seed=seed)
else:
    @pytest.mark.skip(reason="hypothesis is not installed (pip install -e .[test])")
    def test_property_matches_reference():
        pass
