"""The CUDA reference (impl="cuda"): its own accuracy rule, its features, its bindings.

On the CPU CI machine the installed extension is the host build (the same algorithm and
row functions as the CUDA kernels, compiled for the CPU), so these tests run it on CPU
tensors; the @pytest.mark.gpu tests run the CUDA kernels. Everything goes through the
registry's autograd Function (CudaReferenceAttentionFunction, the results rounded to the
inputs' dtype, gradients by autograd) and through float32_results (the unrounded float32
results), each against float64 (flashtile.reference: attention_reference, or
varlen_attention_reference for packed batches). The rule
(flashtile.cuda_reference.reference_problems): the float32 results within
REFERENCE_RTOL = 2e-5 of max|f64| elementwise, the fp16/bf16 results in addition within half
an ulp (the final rounding), lse within 1e-5 + 2e-6 |lse|, -inf exactly where no key is seen.
"""
import itertools
import math
import os
import sys

import pytest
import torch

import flashtile
from conftest import make_grad_out, make_qkv
from flashtile import cuda_reference
from flashtile.cuda_reference import (CudaReferenceAttentionFunction, float32_results, reference_problems)
from flashtile.reference import attention_reference, varlen_attention_reference
from flashtile.testing import run_attention

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
IDS = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
HAS_CUDA = torch.cuda.is_available()
CAUSAL = (-1, 0)  # the window causal attention is
FULL = (-1, -1)


def _id(x):
    return IDS.get(x, str(x))


def problem(q, window=FULL, softcap=0.0, scale=None, cu_seqlens=None, max_seqlen=(None, None)):
    """The keyword arguments of float32_results / forward_float32 for one problem (scale
    None: 1/sqrt(D); cu_seqlens (q's, k's) for a packed batch)."""
    cu_q, cu_k = cu_seqlens if cu_seqlens is not None else (None, None)
    return dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_seqlen[0], max_seqlen_k=max_seqlen[1],
                scale=1.0 / math.sqrt(q.shape[-1]) if scale is None else scale, window_left=window[0],
                window_right=window[1], softcap=softcap)


def function_fn(args):
    """fn(q, k, v, causal, scale) -> (out, lse) for run_attention, through the registry's
    Function with the problem `args` (causal is in args' window; run_attention's causal and
    scale are not used)."""
    def fn(q, k, v, _causal, _scale):
        return CudaReferenceAttentionFunction.apply(
            q, k, v, args["cu_seqlens_q"], args["cu_seqlens_k"], args["max_seqlen_q"], args["max_seqlen_k"],
            args["scale"], args["window_left"], args["window_right"], args["softcap"])
    return fn


def float64_results(q, k, v, args, d_out=None):
    """The truth: flashtile.reference on float64 leaves (dense or varlen), gradients by autograd."""
    leaves = [t.detach().double().requires_grad_(d_out is not None) for t in (q, k, v)]
    window = (args["window_left"], args["window_right"])
    with torch.set_grad_enabled(d_out is not None):
        if args["cu_seqlens_q"] is not None:
            out, lse = varlen_attention_reference(*leaves, args["cu_seqlens_q"], args["cu_seqlens_k"],
                                                  scale=args["scale"], window_size=window, softcap=args["softcap"])
        else:
            out, lse = attention_reference(*leaves, scale=args["scale"], window_size=window, softcap=args["softcap"])
    result = {"out": out.detach(), "lse": lse, "dq": None, "dk": None, "dv": None}
    if d_out is not None:
        result["dq"], result["dk"], result["dv"] = torch.autograd.grad(out, leaves, d_out.double())
    return result


def check_reference(q, k, v, d_out=None, **kwargs):
    """Both forms of the reference (rounded, through the Function; float32, from
    float32_results) against float64 with the reference's rule; `kwargs` as problem()'s.
    Returns (rounded results, float32 results, f64)."""
    args = problem(q, **kwargs)
    f64 = float64_results(q, k, v, args, d_out)
    rounded = run_attention(function_fn(args), q, k, v, None, None, d_out)
    raw = float32_results(q, k, v, **args, d_out=d_out)
    problems = [f"float32: {p}" for p in reference_problems(raw, f64)]
    problems += [f"rounded to {q.dtype}: {p}" for p in reference_problems(rounded, f64, q.dtype)]
    for name, like in (("out", q), ("dq", q), ("dk", k), ("dv", v)):
        if rounded[name] is not None and (rounded[name].dtype, rounded[name].shape) != (like.dtype, like.shape):
            problems.append(f"{name}: {rounded[name].dtype} {tuple(rounded[name].shape)}, expected "
                            f"{like.dtype} {tuple(like.shape)}")
    assert not problems, "\n".join(problems)
    return rounded, raw, f64


def gqa_inputs(B, heads_q, heads_kv, n_q, n_k, D, dtype, layout="contiguous", seed=0, device="cpu"):
    """q (B, Hq, Nq, D), k, v (B, Hkv, Nk, D) in one of make_qkv's layouts, and d_out."""
    q = make_qkv(B, heads_q, n_q, n_q, D, dtype, device=device, layout=layout, seed=seed)[0]
    _, k, v = make_qkv(B, heads_kv, n_k, n_k, D, dtype, device=device, layout=layout, seed=seed + 1)
    return q, k, v, make_grad_out(B, heads_q, n_q, D, dtype, device=device, seed=seed + 2)


def cu_seqlens(lengths, device="cpu"):
    """int32 (B + 1,) prefix sums from 0 of the sequence lengths."""
    return torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32, device=device)


def varlen_inputs(lens_q, lens_k, heads_q, heads_kv, D, dtype, seed=0, packed=False, device="cpu"):
    """q (total_q, Hq, D), k, v (total_k, Hkv, D), d_out, and (cu_seqlens_q, cu_seqlens_k).
    packed=True: q, k, v are views of one (total, Hq + 2 Hkv, D) tensor, as a fused QKV
    projection gives them (equal totals needed), so their row stride is not Hq D."""
    gen = torch.Generator().manual_seed(seed)
    total_q, total_k = sum(lens_q), sum(lens_k)
    q = torch.randn(total_q, heads_q, D, generator=gen)
    k = torch.randn(total_k, heads_kv, D, generator=gen)
    v = torch.randn(total_k, heads_kv, D, generator=gen)
    d_out = torch.randn(total_q, heads_q, D, generator=gen)
    q, k, v, d_out = (t.to(dtype).to(device) for t in (q, k, v, d_out))
    if packed:
        qkv = torch.cat([q, k, v], dim=1)
        q, k, v = qkv[:, :heads_q], qkv[:, heads_q:heads_q + heads_kv], qkv[:, heads_q + heads_kv:]
    return q, k, v, d_out, (cu_seqlens(lens_q, device), cu_seqlens(lens_k, device))


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


def test_cuda_is_an_implementation():
    assert "cuda" in flashtile.IMPLEMENTATIONS
    assert flashtile.CudaReferenceAttentionFunction is CudaReferenceAttentionFunction


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
# Accuracy against float64, multi-head attention (the host build here; the CUDA kernels in
# test_parity.py and the gpu tests below)
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
    check_reference(q, k, v, d_out, window=CAUSAL if causal else FULL)


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("scale", [0.01, 0.5, 4.0])
def test_large_and_small_scales(dtype, scale):
    """Keys that grow along the sequence and a scale of 4: the running max moves at every
    tile and exp(lse) would overflow float32 (the online softmax's rescaling)."""
    B, H, n_q, n_k, D = 1, 2, 40, 130, 16
    q, k, v = make_qkv(B, H, n_q, n_k, D, dtype, seed=3)
    k = (k.float() * torch.linspace(0.25, 4.0, n_k)[:, None]).to(dtype)
    d_out = make_grad_out(B, H, n_q, D, dtype, seed=4)
    _, raw, f64 = check_reference(q, k, v, d_out, window=CAUSAL, scale=scale)
    if scale == 4.0:
        assert f64["lse"].abs().max() > 88.0


def assert_rows_see_no_key(results, rows, row_dim):
    """Rows `rows` (along q's row dim `row_dim`) give out 0, lse -inf, dq 0; the others a
    finite lse and an output (their dq may be 0: a row that sees one key has dS = 0)."""
    lse_dim = 2 if row_dim == 2 else 1  # dense lse (B, Hq, Nq), varlen (Hq, total_q)
    out, dq = results["out"].movedim(row_dim, 0), results["dq"].movedim(row_dim, 0)
    lse = results["lse"].movedim(lse_dim, 0)
    hidden = torch.zeros(out.shape[0], dtype=torch.bool)
    hidden[rows] = True
    assert torch.all(out[hidden] == 0) and torch.all(dq[hidden] == 0)
    assert torch.all(lse[hidden] == float("-inf"))
    assert torch.isfinite(lse[~hidden]).all()
    assert (out[~hidden] != 0).any()


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("window", [CAUSAL, (0, 0), (3, 2)], ids=["causal", "window_0", "window_3_2"])
def test_rows_that_see_no_key(dtype, window):
    """Nq > Nk with bottom-right alignment: the first rows sit before key 0 and see no key
    (causal: the first Nq - Nk; a window (left, right): the first Nq - Nk - right); they
    output 0, have lse = -inf and dq = 0."""
    B, H, n_q, n_k, D = 2, 2, 50, 11, 24
    q, k, v = make_qkv(B, H, n_q, n_k, D, dtype, seed=6)
    d_out = make_grad_out(B, H, n_q, D, dtype, seed=7)
    rounded, raw, _ = check_reference(q, k, v, d_out, window=window)
    for res in (rounded, raw):
        assert_rows_see_no_key(res, list(range(n_q - n_k - window[1])), row_dim=2)


def test_zero_length_keys_and_empty_batches_in_the_bindings():
    """The launchers themselves handle Nk = 0 (O = 0, lse = -inf, zero gradients) and
    B * H = 0 (nothing to do), dense and varlen."""
    ext = cuda_reference.extension()
    q = torch.randn(2, 4, 5, 8)
    k = v = torch.randn(2, 2, 0, 8)
    dense = (None, None, None, None, 0.5, -1, -1, 0.0)
    out, lse = ext.forward(q, k, v, *dense)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))
    dq, dk, dv = ext.backward(torch.randn_like(q), q, k, v, out, lse, *dense)
    assert torch.all(dq == 0) and dk.shape == k.shape and dv.shape == v.shape
    empty = torch.randn(0, 3, 5, 8)
    out, lse = ext.forward(empty, empty, empty, None, None, None, None, 0.5, -1, 0, 0.0)
    assert out.shape == (0, 3, 5, 8) and lse.shape == (0, 3, 5)
    no_sequences = torch.zeros(1, dtype=torch.int32)
    packed = torch.randn(0, 2, 8)
    out, lse = ext.forward(packed, packed, packed, no_sequences, no_sequences, 0, 0, 0.5, -1, -1, 0.0)
    assert out.shape == (0, 2, 8) and lse.shape == (2, 0)


def test_expanded_grad_out():
    """d_out with stride 0 (what out.sum().backward() passes) is read in place."""
    q, k, v, _ = gqa_inputs(1, 4, 2, 17, 23, 16, torch.float16, seed=8)
    d_out = torch.ones(1, 1, 1, 1, dtype=torch.float16).expand(1, 4, 17, 16)
    check_reference(q, k, v, d_out, window=(5, 1))


def test_host_build_is_deterministic():
    """Every output element is written by one thread after a fixed-order sum (dK, dV over
    the query heads of a group too): reruns at batch 30 give the same bits (the host build;
    the GPU's is in the gpu tests below and test_parity.py)."""
    q, k, v, d_out = gqa_inputs(30, 4, 2, 19, 37, 24, torch.bfloat16, seed=9)
    fn = function_fn(problem(q, window=(9, 0), softcap=3.0))
    first = run_attention(fn, q, k, v, None, None, d_out)
    for _ in range(2):
        again = run_attention(fn, q, k, v, None, None, d_out)
        for name in ("out", "lse", "dq", "dk", "dv"):
            assert torch.equal(again[name], first[name]), name


# ---------------------------------------------------------------------------------------
# Grouped-query attention, windows, softcap
# ---------------------------------------------------------------------------------------

# (Hq, Hkv): groups of 1 (MHA), 2 and 8 query heads, and MQA (one K/V head).
HEADS = [(3, 3), (4, 2), (16, 2), (8, 1)]


@pytest.mark.parametrize("window", [FULL, CAUSAL], ids=["full", "causal"])
@pytest.mark.parametrize("heads_q,heads_kv", HEADS, ids=lambda x: str(x))
def test_grouped_query_attention(heads_q, heads_kv, window):
    """Query head h reads K/V head h // (Hq / Hkv); dK, dV come back with Hkv heads, the sum
    over each group. Strided K/V (the 'mixed' layout: q bnhd, k sliced) read in place."""
    q, k, v, d_out = gqa_inputs(2, heads_q, heads_kv, 21, 45, 16, torch.float16, layout="mixed", seed=heads_q)
    rounded, _, _ = check_reference(q, k, v, d_out, window=window)
    assert rounded["dk"].shape == k.shape and rounded["dv"].shape == v.shape


# Windows (left, right), -1 unbounded: left only, right only, both, wider than any sequence
# here, the zero window (each query sees the key at its own position), local causal, and a
# zero left side with the right unbounded.
WINDOWS = [(5, -1), (-1, 4), (6, 3), (500, 500), (0, 0), (7, 0), (0, -1)]


@pytest.mark.parametrize("n_q,n_k", [(37, 70), (70, 37), (45, 45)])
@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: f"window{w[0]}_{w[1]}")
def test_windows(window, n_q, n_k):
    q, k, v, d_out = gqa_inputs(1, 4, 2, n_q, n_k, 16, torch.float16, seed=n_q + n_k)
    check_reference(q, k, v, d_out, window=window)


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_a_window_wider_than_the_sequence_is_no_window(dtype):
    """Sides at least as wide as the sequences see every key: the same numbers as (-1, -1)
    and, on the right side alone, as causal (right 0 kept, left wider than Nk)."""
    q, k, v, d_out = gqa_inputs(1, 2, 1, 30, 40, 16, dtype, seed=12)
    for wide, same in (((100, 100), FULL), ((40, 0), CAUSAL), ((2 ** 62, 2 ** 62), FULL)):
        a = float32_results(q, k, v, **problem(q, window=wide), d_out=d_out)
        b = float32_results(q, k, v, **problem(q, window=same), d_out=d_out)
        for name in ("out", "lse", "dq", "dk", "dv"):
            assert torch.equal(a[name], b[name]), (wide, name)


@pytest.mark.parametrize("softcap", [0.5, 5.0, 30.0])
@pytest.mark.parametrize("window", [FULL, CAUSAL, (9, 2)], ids=["full", "causal", "window9_2"])
def test_softcap(softcap, window):
    """scores = softcap * tanh(scale q.k / softcap), the backward through tanh's derivative.
    A scale of 1 makes |scale q.k| reach 10, so small caps saturate."""
    q, k, v, d_out = gqa_inputs(1, 4, 2, 37, 53, 16, torch.bfloat16, seed=int(softcap * 10))
    _, raw, f64 = check_reference(q, k, v, d_out, window=window, softcap=softcap, scale=1.0)
    uncapped = float64_results(q, k, v, problem(q, window=window, scale=1.0), d_out)
    assert (f64["out"] - uncapped["out"]).abs().max() > 1e-3  # the cap changed the result


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_all_features_together(dtype):
    """GQA (8 / 2), a two-sided window, a softcap and rows that see no key (Nq > Nk), in
    every dtype and a strided layout."""
    q, k, v, d_out = gqa_inputs(2, 8, 2, 60, 29, 40, dtype, layout="bnhd", seed=13)
    rounded, raw, _ = check_reference(q, k, v, d_out, window=(4, 2), softcap=8.0)
    for res in (rounded, raw):
        assert_rows_see_no_key(res, list(range(60 - 29 - 2 - 0)), row_dim=2)


@pytest.mark.parametrize("kv_side", [False, True], ids=["poisoned_kv", "poisoned_q_do"])
def test_tiles_outside_the_window_are_not_read(kv_side):
    """Key tiles (forward, dQ) and query tiles (dK/dV) wholly outside the window are skipped
    by the loop bounds, not loaded and masked: NaN in rows that no block may visit leaves
    every result finite and equal to the clean inputs' (a masked NaN value would not:
    P_ij = 0 times a NaN V or dO row is NaN). kv_side: 8 queries at the end of 300 keys with
    a window of 10 keys, K and V rows 0..249 NaN; else 300 queries before 8 keys with
    right = 10, so queries 0..281 see no key, and Q and dO rows 0..249 NaN."""
    n_q, n_k, window = (8, 300, (10, 0)) if kv_side else (300, 8, (-1, 10))
    q, k, v, d_out = gqa_inputs(1, 4, 2, n_q, n_k, 16, torch.float32, seed=14)
    args = problem(q, window=window)
    clean = float32_results(q, k, v, **args, d_out=d_out)
    if kv_side:
        k, v = k.clone(), v.clone()
        k[:, :, :250] = v[:, :, :250] = float("nan")
    else:
        q, d_out = q.clone(), d_out.clone()
        q[:, :, :250] = d_out[:, :, :250] = float("nan")
    poisoned = float32_results(q, k, v, **args, d_out=d_out)
    for name in ("out", "lse", "dq", "dk", "dv"):
        assert not torch.isnan(poisoned[name]).any(), name
        assert torch.equal(poisoned[name], clean[name]), name


# ---------------------------------------------------------------------------------------
# Varlen: packed sequences, each attending within itself with its own alignment
# ---------------------------------------------------------------------------------------

# (lens_q, lens_k, (Hq, Hkv), window, softcap): sequences of length 1, odd lengths, Nq != Nk
# per sequence (both ways), one sequence 10x longer than the others, with the features.
VARLEN_CASES = [
    ([1, 7, 33, 5], [1, 7, 33, 5], (2, 2), FULL, 0.0),
    ([1, 7, 33, 5], [1, 7, 33, 5], (4, 2), CAUSAL, 0.0),
    ([3, 13, 1, 9], [9, 5, 31, 1], (8, 1), CAUSAL, 0.0),
    ([7, 70, 5, 7], [7, 70, 5, 7], (4, 2), (6, 0), 0.0),
    ([9, 5, 90, 3], [4, 11, 9, 7], (4, 1), (3, 5), 0.0),
    ([1, 45, 3], [2, 30, 47], (2, 1), FULL, 4.0),
    ([11, 2, 40], [11, 6, 4], (4, 2), (0, 0), 0.0),
    ([17, 1, 80, 8], [8, 8, 8, 80], (8, 2), (5, 3), 2.0),
]


@pytest.mark.parametrize("lens_q,lens_k,heads,window,softcap", VARLEN_CASES)
def test_varlen(lens_q, lens_k, heads, window, softcap):
    q, k, v, d_out, cu = varlen_inputs(lens_q, lens_k, *heads, 16, torch.float16, seed=len(lens_q) + sum(lens_q))
    rounded, _, _ = check_reference(q, k, v, d_out, window=window, softcap=softcap, cu_seqlens=cu)
    assert rounded["lse"].shape == (heads[0], sum(lens_q))


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_varlen_every_dtype_packed_qkv(dtype):
    """q, k, v as views of one fused (total, Hq + 2 Hkv, D) projection (row stride not Hq D),
    GQA, causal window, softcap, every dtype."""
    lens = [5, 1, 38, 12]
    q, k, v, d_out, cu = varlen_inputs(lens, lens, 4, 2, 24, dtype, seed=15, packed=True)
    assert not q.is_contiguous()
    check_reference(q, k, v, d_out, window=(7, 0), softcap=5.0, cu_seqlens=cu)


def test_varlen_equals_each_sequence_alone():
    """A packed batch gives, sequence by sequence, the numbers of the dense layout run on
    that sequence alone (same kernels, same order of operations): bitwise."""
    lens_q, lens_k = [4, 19, 1], [9, 19, 30]
    q, k, v, d_out, cu = varlen_inputs(lens_q, lens_k, 4, 2, 16, torch.float32, seed=16)
    packed = float32_results(q, k, v, **problem(q, window=(5, 2), softcap=3.0, cu_seqlens=cu), d_out=d_out)
    for b in range(len(lens_q)):
        rows_q, rows_k = slice(cu[0][b], cu[0][b + 1]), slice(cu[1][b], cu[1][b + 1])
        dense = [t[rows].transpose(0, 1).unsqueeze(0) for t, rows in ((q, rows_q), (k, rows_k), (v, rows_k),
                                                                       (d_out, rows_q))]
        alone = float32_results(*dense[:3], **problem(q, window=(5, 2), softcap=3.0), d_out=dense[3])
        for name, rows in (("out", rows_q), ("dq", rows_q), ("dk", rows_k), ("dv", rows_k)):
            assert torch.equal(packed[name][rows], alone[name][0].transpose(0, 1)), (b, name)
        assert torch.equal(packed["lse"][:, rows_q], alone["lse"][0]), b


def test_varlen_rows_that_see_no_key_and_empty_sequences():
    """Causal with more queries than keys in a sequence: its first rows see no key (out 0,
    lse -inf, dq 0). Sequences with no keys or no queries give the same for their rows, and
    dk = dv = 0 for keys no query sees."""
    lens_q, lens_k = [20, 3, 0, 6], [5, 0, 4, 6]
    q, k, v, d_out, cu = varlen_inputs(lens_q, lens_k, 2, 1, 8, torch.float32, seed=17)
    res = float32_results(q, k, v, **problem(q, window=CAUSAL, cu_seqlens=cu), d_out=d_out)
    hidden = list(range(0, 15)) + [20, 21, 22]  # sequence 0's first 20 - 5, all of sequence 1
    assert_rows_see_no_key(res, hidden, row_dim=0)
    assert torch.all(res["dk"][5:9] == 0) and torch.all(res["dv"][5:9] == 0)  # sequence 2: no queries
    # the sequences with both queries and keys meet the rule (the float64 reference needs keys)
    keep_q, keep_k = [0, 3], [0, 3]
    sub = varlen_inputs([lens_q[b] for b in keep_q], [lens_k[b] for b in keep_k], 2, 1, 8, torch.float32, seed=18)
    check_reference(*sub[:4], window=CAUSAL, cu_seqlens=sub[4])


def test_max_seqlen_computed_or_given():
    """max_seqlen_* None is computed from cu_seqlens; a given larger one only sizes the grid."""
    q, k, v, d_out, cu = varlen_inputs([3, 17, 6], [8, 2, 20], 2, 2, 8, torch.float32, seed=19)
    results = [float32_results(q, k, v, **problem(q, window=CAUSAL, cu_seqlens=cu, max_seqlen=given), d_out=d_out)
               for given in ((None, None), (17, 20), (40, 64))]
    for other in results[1:]:
        for name in ("out", "lse", "dq", "dk", "dv"):
            assert torch.equal(other[name], results[0][name]), name


# ---------------------------------------------------------------------------------------
# The bindings' own argument checks (a separate entry point from flashtile's interface)
# ---------------------------------------------------------------------------------------

# (call, error type, the whole message): the messages carry numbers, which the bindings format
# without iostreams (see test_bindings_messages_with_a_static_libstdcxx). D: the dense
# problem's trailing arguments (no cu_seqlens, scale 0.5, no window, no softcap).
BINDINGS_ERRORS = [
    ("forward", "q.double(), q.double(), q.double(), *D", TypeError,
     "q has dtype Double; the CUDA reference supports float16, bfloat16 and float32"),
    ("forward", "q, q, q[..., :4], *D", RuntimeError, "head_dim differs: q 8, k 8, v 4"),
    ("forward", "z, z, z, *D", RuntimeError, "head_dim must be in 1..256, got 300"),
    ("forward", "q, q, q, None, None, None, None, float('nan'), -1, -1, 0.0", RuntimeError,
     "scale must be finite and positive, got nan"),
    ("forward", "q[0], q, q, *D", RuntimeError, "q must be 4-D (batch, heads, seq, head_dim), got [2, 5, 8]"),
    ("forward", "q, q[:, :1], q, *D", RuntimeError, "k and v must have the same number of heads, got 1 and 2"),
    ("forward", "q3, q, q, *D", RuntimeError, "q's head count (3) must be a multiple of k's and v's (2)"),
    ("forward", "q, q, q, None, None, None, None, 0.5, -2, -1, 0.0", RuntimeError,
     "window_left must be >= -1 (-1: unbounded), got -2"),
    ("forward", "q, q, q, None, None, None, None, 0.5, -1, -5, 0.0", RuntimeError,
     "window_right must be >= -1 (-1: unbounded), got -5"),
    ("forward", "q, q, q, None, None, None, None, 0.5, -1, -1, -1.0", RuntimeError,
     "softcap must be finite and >= 0 (0: off), got -1"),
    ("forward", "p, p, p, cu, None, 7, 7, 0.5, -1, -1, 0.0", RuntimeError,
     "cu_seqlens_q and cu_seqlens_k must be given together (varlen) or both be None (dense)"),
    ("forward", "q, q, q, cu, cu, 7, 7, 0.5, -1, -1, 0.0", RuntimeError,
     "q must be 3-D (total, heads, head_dim) with cu_seqlens, got [1, 2, 5, 8]"),
    ("forward", "p, p, p, cu.long(), cu, 7, 7, 0.5, -1, -1, 0.0", TypeError, "cu_seqlens_q must be int32, got Long"),
    ("forward", "p, p, p, cu, cu[:2], 7, 7, 0.5, -1, -1, 0.0", RuntimeError,
     "cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), got 3 and 2"),
    ("forward", "p, p, p, cu, cu[None], 7, 7, 0.5, -1, -1, 0.0", RuntimeError,
     "cu_seqlens_k must be 1-D (batch + 1,), got [1, 3]"),
    ("forward", "p, p, p, cu, cu, None, 7, 0.5, -1, -1, 0.0", RuntimeError,
     "max_seqlen_q and max_seqlen_k are required with cu_seqlens"),
    ("backward", "q, q, q, q, out.half(), lse, *D", TypeError, "out must be float32 (the forward's), got Half"),
    ("backward", "q, q, q, q, out, lse[:, :1], *D", RuntimeError, "lse has shape [1, 1, 5], expected [1, 2, 5]"),
    ("backward", "p, p, p, p, p.float(), p_lse.t(), cu, cu, 7, 7, 0.5, -1, -1, 0.0", RuntimeError,
     "lse has shape [10, 2], expected [2, 10]"),
]
BINDINGS_SETUP = ("q = torch.randn(1, 2, 5, 8)\nq3 = torch.randn(1, 3, 5, 8)\nz = torch.zeros(1, 1, 2, 300)\n"
                  "D = (None, None, None, None, 0.5, -1, -1, 0.0)\nout, lse = ext.forward(q, q, q, *D)\n"
                  "p = torch.randn(10, 2, 8)\ncu = torch.tensor([0, 3, 10], dtype=torch.int32)\n"
                  "_, p_lse = ext.forward(p, p, p, cu, cu, 7, 7, 0.5, -1, -1, 0.0)\n")


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


@pytest.mark.build
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
    code = ("import torch, flashtile\nfrom flashtile import cuda_reference, registry\n"
            "ext = cuda_reference.extension()\nD = (None, None, None, None, 0.5, -1, -1, 0.0)\n"
            "if torch.cuda.is_available():\n"
            "    x = torch.randn(1, 2, 64, 64, device='cuda', dtype=torch.float16)\n"
            "    args = (x, x, x, None, None, None, None, 0.125, -1, -1, 0.0)\n"
            "    registry.REGISTRY[registry.DEFAULT_IMPLEMENTATION].load().apply(*args)\n"
            "    cuda_reference.CudaReferenceAttentionFunction.apply(*args)\n"
            "q = torch.randn(1, 2, 5, 8)\nmessages = []\n"
            "for bad in [(q.double(), q, q), (q, q, q[..., :4]), (q[0], q, q)] * 4:\n"
            "    try:\n        ext.forward(*bad, *D)\n"
            "    except (TypeError, RuntimeError) as e:\n        messages.append(str(e))\n"
            "print(len(messages), 'raised; first:', repr(messages[0]))\n")
    env = dict(os.environ, TORCH_SHOW_CPP_STACKTRACES="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    assert "12 raised; first: 'q has dtype Double;" in proc.stdout, proc.stdout
    assert "Exception raised from" not in proc.stdout, proc.stdout


def test_not_built_raises_a_clear_error(monkeypatch):
    """Without the extension (and with the build on first use turned off) flashtile imports
    and the reference says it was not built."""
    monkeypatch.setenv("FLASHTILE_BUILD_EXTENSION", "0")
    monkeypatch.setitem(sys.modules, "flashtile._cuda_reference", None)  # import now fails
    assert not cuda_reference.is_built()
    q, k, v = make_qkv(1, 2, 5, 7, 8, torch.float16)
    with pytest.raises(RuntimeError, match=r"impl='cuda'.*was not built"):
        CudaReferenceAttentionFunction.apply(q, k, v, None, None, None, None, 0.5, -1, -1, 0.0)


def test_flashtile_imports_without_the_extension(tmp_path):
    import subprocess

    code = ("import sys; sys.modules['flashtile._cuda_reference'] = None\n"
            "import flashtile, torch\n"
            "from flashtile import cuda_reference\n"
            "assert not cuda_reference.is_built()\n"
            "q = torch.zeros(1, 1, 2, 4, dtype=torch.float16)\n"
            "try:\n    cuda_reference.forward_float32(q, q, q)\n"
            "except RuntimeError as e:\n    print('raised:', e)\n")
    env = dict(os.environ, FLASHTILE_BUILD_EXTENSION="0")  # no build on first use either
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "raised: impl='cuda'" in proc.stdout and "not built" in proc.stdout


# ---------------------------------------------------------------------------------------
# The CUDA kernels (a GPU machine): the host build's twin, deterministic
# ---------------------------------------------------------------------------------------

def _on_cuda(results):
    return {name: None if t is None else t.cpu() for name, t in results.items()}


# (name, inputs(dtype) -> (q, k, v, d_out, cu_seqlens or None), problem keyword arguments)
GPU_CASES = [
    ("mha_causal", lambda dtype: (*make_qkv(2, 3, 77, 141, 72, dtype, layout="mixed", seed=11),
                                  make_grad_out(2, 3, 77, 72, dtype, seed=12), None), dict(window=CAUSAL)),
    ("gqa_window_softcap", lambda dtype: (*gqa_inputs(2, 8, 2, 130, 97, 64, dtype, layout="bnhd", seed=20), None),
     dict(window=(40, 7), softcap=20.0)),
    ("mqa_right_only", lambda dtype: (*gqa_inputs(1, 6, 1, 45, 200, 128, dtype, seed=21), None),
     dict(window=(-1, 33))),
    ("varlen", lambda dtype: varlen_inputs([1, 77, 5, 300], [30, 77, 1, 290], 8, 2, 64, dtype, seed=22),
     dict(window=(50, 0), softcap=10.0)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("name,make,features", GPU_CASES, ids=[case[0] for case in GPU_CASES])
def test_cuda_kernels_match_the_host_build(name, make, features, dtype):
    """The CUDA kernels and the host build run one algorithm: on the same inputs their
    float32 results agree to float32 rounding (not bitwise: the GPU sums over a tile by
    butterfly, the CPU in order), and both meet the rule; GQA, windows, softcap, varlen."""
    q, k, v, d_out, cu = make(dtype)
    args = problem(q, cu_seqlens=cu, **features)
    cpu = float32_results(q, k, v, **args, d_out=d_out)
    cuda_args = dict(args, cu_seqlens_q=None if cu is None else cu[0].cuda(),
                     cu_seqlens_k=None if cu is None else cu[1].cuda())
    gpu = _on_cuda(float32_results(q.cuda(), k.cuda(), v.cuda(), **cuda_args, d_out=d_out.cuda()))
    f64 = float64_results(q, k, v, args, d_out)
    assert not reference_problems(cpu, f64), reference_problems(cpu, f64)
    assert not reference_problems(gpu, f64), reference_problems(gpu, f64)
    for quantity in ("out", "dq", "dk", "dv"):
        scale = f64[quantity].abs().max().item()
        assert (gpu[quantity] - cpu[quantity]).abs().max().item() <= 2 * cuda_reference.REFERENCE_RTOL * scale, quantity
    assert torch.equal(torch.isinf(gpu["lse"]), torch.isinf(cpu["lse"]))


@pytest.mark.gpu
def test_cuda_kernels_are_deterministic_with_gqa():
    """dK/dV summed over a group of 8 query heads by one block per K/V head, in a fixed
    order, no atomics: every rerun gives the same bits (dense and varlen)."""
    for q, k, v, d_out, cu in (gqa_inputs(3, 16, 2, 150, 150, 64, torch.bfloat16, device="cuda", seed=23) + (None,),
                               varlen_inputs([40, 150, 3], [40, 150, 60], 16, 2, 64, torch.float16, seed=24,
                                             device="cuda")):
        fn = function_fn(problem(q, window=(60, 0), softcap=15.0, cu_seqlens=cu))
        first = run_attention(fn, q, k, v, None, None, d_out)
        for _ in range(3):
            again = run_attention(fn, q, k, v, None, None, d_out)
            for quantity in ("out", "lse", "dq", "dk", "dv"):
                assert torch.equal(again[quantity], first[quantity]), quantity
