"""How flashtile decides that an attention implementation is correct: the one tolerance rule.

The rule is FlashAttention-2's (Tri Dao's `tests/test_flash_attn.py` in the flash-attention
repository): an implementation in low precision (fp16/bf16) is judged against the same
computation in high precision, and it may be wrong by at most twice as much as PyTorch's own
computation in that low precision is wrong, plus a rounding-scale term:

    max|impl - f64| <= 2 * max|torch_lowprec - f64| + atol      for out, dq, dk, dv

- f64 is `attention_reference` on float64 copies of the inputs (autograd for the grads).
- torch_lowprec is `attention_reference(..., upcast=False)`: PyTorch's matmul / softmax in
  the inputs' own dtype, the accuracy a user gets without flashtile.
- atol is one unit in the last place (ulp) of the low-precision dtype at the magnitude
  0.3 + max|f64|. FlashAttention-2's tests write it as `2 * (ref + 0.3 - 0.3 - ref).abs().max()`
  in the low precision: the rounding error of adding 0.3, at most half an ulp of
  |ref + 0.3|, doubled, which over a tensor of any size is about one ulp at
  0.3 + max|ref|. We use that value directly because the trick gives exactly 0 when the
  reference is identically zero (dq when Nk = 1: the softmax of one key has zero gradient),
  where an fp32 accumulator legitimately leaves ~1e-7 from cancellation. One ulp is small:
  2.4e-4 for fp16 and 2.0e-3 for bf16 at magnitudes below 0.2; it only matters where
  PyTorch's own error is itself near zero.

The log-sum-exp is float32 in every implementation, so it gets a float32 tolerance instead
(`LSE_ATOL + LSE_RTOL * |lse_f64|`) on the entries where the reference is finite, and must be
-inf exactly where the reference is -inf (rows that see no key). Nothing may be NaN.

The model features go through the same code path as plain attention: every function that
runs attention takes them as keywords, `window_size`, `softcap`, and for a packed batch
`cu_seqlens_q`, `cu_seqlens_k` (with optional `max_seqlen_q`, `max_seqlen_k`), with
flashtile's meanings (flashtile.attention / varlen_attention). The truth is then
`attention_reference` or, with cu_seqlens, `varlen_attention_reference`; GQA needs nothing
but K/V with fewer heads than Q. An implementation is a callable

    fn(q, k, v, causal, scale, **features) -> (out, lse)

that receives only the features a case sets (a callable that does not know one fails with a
TypeError instead of silently computing something else).

Used by the tests (tests/), the benchmark and asv alike, as are the input factories below
(`make_qkv`, `make_varlen_qkv`, `make_grad_out`, `random_like`):

    q, k, v = make_qkv(2, 8, 113, 203, 64, torch.float16, device="cuda", kv_heads=2)
    report = compare_to_reference(q, k, v, causal=True, window_size=(64, 0), impl="v2",
                                  grad_out=random_like(q, seed=1))
    assert_matches_reference(report)   # AssertionError with every number on failure
    print(report)                      # one line: impl / torch errors per quantity
"""
import dataclasses
import math

import torch

from .reference import attention_reference, varlen_attention_reference

QUANTITIES = ("out", "dq", "dk", "dv")
# How many times PyTorch's own low-precision error an implementation may have (FA2's rule).
ERROR_FACTOR = 2.0
# atol in ulps of the low-precision dtype at magnitude 0.3 + max|f64| (see the module doc).
ATOL_ULPS = 1.0
ATOL_OFFSET = 0.3
# lse: float32 everywhere. 1e-4 is ~1000 float32 ulps at |lse| ~ 1 and leaves room for
# rounding in a Q K^T dot of up to 256 terms and a row sum over 16k keys; an fp16 lse would
# be off by ~1e-3 * |lse|, so this still tells float32 arithmetic from low precision. The
# relative term covers large lse (large scale or large inputs).
LSE_ATOL = 1e-4
LSE_RTOL = 1e-5


def ulp(dtype: torch.dtype, magnitude: float) -> float:
    """The spacing of `dtype`'s floating-point numbers at `magnitude` (> 0)."""
    finfo = torch.finfo(dtype)
    magnitude = max(float(magnitude), finfo.tiny)
    return finfo.eps * 2.0 ** math.floor(math.log2(magnitude))


def rounding_atol(dtype: torch.dtype, reference: torch.Tensor) -> float:
    """atol of the rule: ATOL_ULPS ulps of `dtype` at 0.3 + max|reference| (module doc)."""
    biggest = reference.abs().max().item() if reference.numel() else 0.0
    return ATOL_ULPS * ulp(dtype, ATOL_OFFSET + biggest)


# ---------------------------------------------------------------------------------------
# Inputs: one factory for tests, benchmark and asv
# ---------------------------------------------------------------------------------------
# Values are drawn on the CPU from a seeded generator and then moved, so that a seed gives
# the same inputs on every device and in every layout.

def _randn(shape, dtype, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def make_qkv(B, H, n_q, n_k, D, dtype, device="cpu", layout="contiguous", seed=0, requires_grad=False,
             kv_heads=None):
    """q (B, H, n_q, D), k and v (B, kv_heads, n_k, D) (kv_heads defaults to H), N(0, 1),
    in one of these memory layouts:

    - "contiguous": plain (B, H, N, D) tensors.
    - "bnhd": each a `.transpose(1, 2)` view of (B, N, H, D) storage (the layout of a
      fused QKV projection), so the head stride is D and the sequence stride H * D.
    - "sliced": each a view of the first D columns of a (B, H, N, D + 32) tensor, so the
      last dim is not dense and rows are D + 32 apart (as divisible by 16 as D is, so a
      compiled kernel is specialised as for the contiguous tensor).
    - "mixed": q bnhd, k sliced, v contiguous.
    The values depend only on the seed and shapes, not on the layout or the device, so
    results in two layouts can be compared directly.
    """
    kv_heads = H if kv_heads is None else kv_heads
    gen = torch.Generator().manual_seed(seed)
    shapes = ((B, H, n_q, D), (B, kv_heads, n_k, D), (B, kv_heads, n_k, D))
    dense = [torch.randn(shape, generator=gen).to(dtype).to(device) for shape in shapes]
    layouts = {"mixed": ("bnhd", "sliced", "contiguous")}.get(layout, (layout,) * 3)
    tensors = [relayout(t, how) for t, how in zip(dense, layouts)]
    if requires_grad:
        tensors = [t.requires_grad_() for t in tensors]
    return tensors


def relayout(t, how):
    """A tensor equal to `t` (B, H, N, D) laid out as `how` (see make_qkv)."""
    B, H, N, D = t.shape
    if how == "contiguous":
        return t.contiguous()
    if how == "bnhd":
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if how == "sliced":
        wide = torch.full((B, H, N, D + 32), float("nan"), dtype=t.dtype, device=t.device)
        wide[..., :D] = t
        return wide[..., :D]
    raise ValueError(f"unknown layout {how!r}: contiguous, bnhd, sliced or mixed")


def cu_seqlens(lengths, device="cpu"):
    """int32 (len(lengths) + 1,) prefix sums starting at 0: where each packed sequence starts."""
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    return torch.tensor(starts, dtype=torch.int32, device=device)


def make_varlen_qkv(seqlens_q, seqlens_k, H, D, dtype, device="cpu", layout="contiguous", seed=0,
                    requires_grad=False, kv_heads=None):
    """A packed batch: (q, k, v, cu_seqlens_q, cu_seqlens_k) with q (sum(seqlens_q), H, D) and
    k, v (sum(seqlens_k), kv_heads, D), N(0, 1), sequence b of lengths seqlens_q[b] and
    seqlens_k[b] (flash_attn_varlen_func's layout).

    layout "contiguous": plain (total, H, D) tensors; "hnd": each a `.transpose(0, 1)` view
    of (H, total, D) storage (head-major), so the row stride is D and the head stride total * D.
    """
    if len(seqlens_q) != len(seqlens_k):
        raise ValueError(f"one length per sequence on both sides, got {len(seqlens_q)} and {len(seqlens_k)}")
    kv_heads = H if kv_heads is None else kv_heads
    gen = torch.Generator().manual_seed(seed)
    shapes = ((sum(seqlens_q), H, D), (sum(seqlens_k), kv_heads, D), (sum(seqlens_k), kv_heads, D))
    tensors = [torch.randn(shape, generator=gen).to(dtype).to(device) for shape in shapes]
    if layout == "hnd":
        tensors = [t.transpose(0, 1).contiguous().transpose(0, 1) for t in tensors]
    elif layout != "contiguous":
        raise ValueError(f"unknown varlen layout {layout!r}: contiguous or hnd")
    if requires_grad:
        tensors = [t.requires_grad_() for t in tensors]
    return (*tensors, cu_seqlens(seqlens_q, device), cu_seqlens(seqlens_k, device))


def make_grad_out(B, H, n_q, D, dtype, device="cpu", seed=1):
    """An upstream gradient for out (B, H, n_q, D), N(0, 1)."""
    return _randn((B, H, n_q, D), dtype, seed).to(device)


def random_like(t, seed=1):
    """N(0, 1) of t's shape, dtype and device (contiguous): e.g. an upstream gradient."""
    return _randn(tuple(t.shape), t.dtype, seed).to(t.device)


# ---------------------------------------------------------------------------------------
# Running an implementation and the references
# ---------------------------------------------------------------------------------------

# The model features and the values that leave them off (flashtile.attention's defaults).
FEATURE_DEFAULTS = {"window_size": (-1, -1), "softcap": 0.0, "cu_seqlens_q": None, "cu_seqlens_k": None,
                    "max_seqlen_q": None, "max_seqlen_k": None}


def set_features(features: dict) -> dict:
    """The features of `features` that differ from their defaults: what a callable receives.
    TypeError for a name that is not a feature (a typo must not turn a feature off)."""
    unknown = sorted(set(features) - set(FEATURE_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown attention features {unknown}; known: {sorted(FEATURE_DEFAULTS)}")
    chosen = {}
    for name, value in features.items():
        default = FEATURE_DEFAULTS[name]
        off = value is None if default is None else (tuple(value) if name == "window_size" else value) == default
        if not off:
            chosen[name] = tuple(value) if name == "window_size" else value
    if ("cu_seqlens_q" in chosen) != ("cu_seqlens_k" in chosen):
        raise TypeError("cu_seqlens_q and cu_seqlens_k go together (a packed batch needs both)")
    return chosen


def flashtile_impl(name: str):
    """The callable `compare_to_reference` takes, for a flashtile implementation name:
    flashtile.varlen_attention when the case has cu_seqlens, else flashtile.attention."""
    import flashtile

    def run(q, k, v, causal, scale, **features):
        if "cu_seqlens_q" in features:
            cu_q, cu_k = features.pop("cu_seqlens_q"), features.pop("cu_seqlens_k")
            max_q, max_k = features.pop("max_seqlen_q", None), features.pop("max_seqlen_k", None)
            return flashtile.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal, scale=scale,
                                              impl=name, return_lse=True, **features)
        return flashtile.attention(q, k, v, causal=causal, scale=scale, impl=name, return_lse=True, **features)

    run.__name__ = name
    return run


def _reference(q, k, v, causal, scale, upcast, features):
    options = dict(window_size=features.get("window_size", (-1, -1)), softcap=features.get("softcap", 0.0))
    if "cu_seqlens_q" in features:  # max_seqlen_* only size a kernel's grid
        return varlen_attention_reference(q, k, v, features["cu_seqlens_q"], features["cu_seqlens_k"], causal,
                                          scale, upcast, **options)
    return attention_reference(q, k, v, causal=causal, scale=scale, upcast=upcast, **options)


def torch_lowprec(q, k, v, causal, scale, **features):
    """PyTorch's own computation in the inputs' dtype."""
    return _reference(q, k, v, causal, scale, False, features)


def torch_float64(q, k, v, causal, scale, **features):
    """The truth: the reference on float64 copies."""
    return _reference(q.double(), k.double(), v.double(), causal, scale, True, features)


def run_attention(fn, q, k, v, causal=False, scale=None, grad_out=None, **features):
    """{"out", "lse", "dq", "dk", "dv"} of `fn(q, k, v, causal, scale, **features) -> (out, lse)`.

    features: window_size, softcap, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k;
    only those that differ from their defaults reach `fn`.
    The gradients are d(sum(out * grad_out))/d(q, k, v), by autograd, when grad_out is given
    (else None). q, k, v keep their strides: a tensor that does not require grad is made a
    leaf by detach(), which shares its storage and strides. Nothing accumulates into .grad.
    """
    features = set_features(features)
    backward = grad_out is not None
    inputs = [t if (t.requires_grad or not backward) else t.detach().requires_grad_() for t in (q, k, v)]
    with torch.set_grad_enabled(backward):
        out, lse = fn(*inputs, causal, scale, **features)
    result = {"out": out.detach(), "lse": lse.detach(), "dq": None, "dk": None, "dv": None}
    if backward:
        dq, dk, dv = torch.autograd.grad(out, inputs, grad_out)
        result.update(dq=dq, dk=dk, dv=dv)
    return result


def rerun_bitwise(fn, q, k, v, causal, grad_out, runs, names=("out", "lse", "dq", "dk", "dv"), label="impl",
                  **features):
    """`runs` results of run_attention(fn, ...) on the same inputs, asserting that the
    results named in `names` are bitwise equal to the first run's in every rerun."""
    results = [run_attention(fn, q, k, v, causal, None, grad_out, **features)]
    for run in range(2, runs + 1):
        again = run_attention(fn, q, k, v, causal, None, grad_out, **features)
        for name in names:
            assert torch.equal(again[name], results[0][name]), f"{label}: {name} differs on run {run}"
        results.append(again)
    return results


def reference_results(q, k, v, causal=False, scale=None, grad_out=None, **features):
    """(float64 truth, PyTorch low precision) results, each as `run_attention` returns them."""
    # float64 leaves (not low-precision leaves upcast inside the graph), so that the
    # reference gradients are float64 too rather than rounded back to the inputs' dtype.
    f64 = run_attention(torch_float64, q.detach().double(), k.detach().double(), v.detach().double(),
                        causal, scale, None if grad_out is None else grad_out.double(), **features)
    low = run_attention(torch_lowprec, q.detach(), k.detach(), v.detach(), causal, scale, grad_out, **features)
    return f64, low


@dataclasses.dataclass
class QuantityError:
    name: str
    impl: float  # max|impl - f64|
    torch: float  # max|torch_lowprec - f64|
    atol: float

    @property
    def bound(self) -> float:
        return ERROR_FACTOR * self.torch + self.atol

    @property
    def ok(self) -> bool:
        return self.impl <= self.bound  # False for NaN errors


@dataclasses.dataclass
class Report:
    """Everything the rule looks at, for one case; `problems()` lists what breaks it."""
    name: str
    dtype: torch.dtype
    errors: dict  # quantity -> QuantityError
    lse_error: float  # max|lse - lse_f64| over entries where lse_f64 is finite
    lse_bound_ratio: float  # max of |lse - lse_f64| / (LSE_ATOL + LSE_RTOL |lse_f64|): <= 1 passes
    lse_inf_mismatches: int  # entries -inf in one of lse, lse_f64 and not in the other
    lse_dtype: torch.dtype
    shape_problems: list
    nan: list  # names of impl results that contain NaN
    results: dict  # the implementation's results
    reference: dict  # the float64 results

    def problems(self) -> list:
        found = list(self.shape_problems)
        found += [f"{name} contains NaN" for name in self.nan]
        for e in self.errors.values():
            if not e.ok:
                found.append(f"{e.name}: max|impl - f64| = {e.impl:.3e} > {ERROR_FACTOR:g} * "
                             f"{e.torch:.3e} (torch {str(self.dtype)[6:]} vs f64) + {e.atol:.2e} = {e.bound:.3e}")
        if self.lse_dtype != torch.float32:
            found.append(f"lse has dtype {self.lse_dtype}, expected torch.float32")
        if self.lse_inf_mismatches:
            found.append(f"lse: {self.lse_inf_mismatches} entries -inf in one of impl / f64 but not the other")
        if not self.lse_bound_ratio <= 1.0:
            found.append(f"lse: max|lse - lse_f64| = {self.lse_error:.3e} exceeds {LSE_ATOL:g} + "
                         f"{LSE_RTOL:g} |lse_f64| (worst ratio {self.lse_bound_ratio:.2f})")
        return found

    @property
    def ok(self) -> bool:
        return not self.problems()

    def __str__(self):
        parts = [f"{e.name} {e.impl:.2e}/{e.torch:.2e}" for e in self.errors.values()]
        return (f"{self.name} {str(self.dtype)[6:]}: impl/torch-lowprec max error vs f64: "
                f"{' '.join(parts)} | lse {self.lse_error:.1e}")


def _max_abs_error(x, truth) -> float:
    if truth.numel() == 0:
        return 0.0
    return (x.double() - truth).abs().max().item()


def compare(results, f64, low, dtype, name="impl") -> Report:
    """Apply the rule to already computed results (dicts from `run_attention`).

    The three dicts may come from slices of a larger problem (e.g. a few heads), as long as
    they describe the same slice."""
    shape_problems, nan, errors = [], [], {}
    for key in ("out", "lse") + QUANTITIES[1:]:
        x = results[key]
        if x is None:
            continue
        if x.shape != f64[key].shape:
            shape_problems.append(f"{key} has shape {tuple(x.shape)}, expected {tuple(f64[key].shape)}")
        elif key != "lse" and x.dtype != dtype:
            shape_problems.append(f"{key} has dtype {x.dtype}, expected {dtype}")
        if torch.isnan(x).any().item():
            nan.append(key)
    for key in QUANTITIES:
        if results[key] is None or results[key].shape != f64[key].shape:
            continue
        errors[key] = QuantityError(key, _max_abs_error(results[key], f64[key]),
                                    _max_abs_error(low[key], f64[key]), rounding_atol(dtype, f64[key]))
    lse, lse_f64 = results["lse"], f64["lse"]
    lse_error, ratio, mismatches = 0.0, 0.0, 0
    if lse.shape == lse_f64.shape and lse.numel():
        # -inf exactly where the reference is -inf; +inf is never right.
        mismatches = int(((lse == float("-inf")) != (lse_f64 == float("-inf"))).sum().item())
        mismatches += int((lse == float("inf")).sum().item())
        finite = torch.isfinite(lse_f64)
        if finite.any():
            diff = (lse.double()[finite] - lse_f64[finite]).abs()
            lse_error = diff.max().item()
            ratio = (diff / (LSE_ATOL + LSE_RTOL * lse_f64[finite].abs())).max().item()
            if math.isnan(lse_error):
                ratio = math.nan
    return Report(name, dtype, errors, lse_error, ratio, mismatches, lse.dtype, shape_problems, nan,
                  results, f64)


def compare_to_reference(q, k, v, causal=False, scale=None, impl="v2", grad_out=None, **features) -> Report:
    """Run `impl` and both references on (q, k, v) and apply the rule.

    impl: a flashtile implementation name, or a callable f(q, k, v, causal, scale, **features)
    -> (out, lse). grad_out: the upstream gradient of out; None compares the forward only.
    features: window_size, softcap, cu_seqlens_q / cu_seqlens_k (a packed batch: q, k, v are
    (total, heads, D)), max_seqlen_q / max_seqlen_k, as flashtile.attention / varlen_attention.
    q, k, v are used as given (strides included) by the implementation; the references get
    float64 copies and low-precision detached copies.
    """
    fn = flashtile_impl(impl) if isinstance(impl, str) else impl
    results = run_attention(fn, q, k, v, causal, scale, grad_out, **features)
    f64, low = reference_results(q, k, v, causal, scale, grad_out, **features)
    return compare(results, f64, low, q.dtype, name=getattr(fn, "__name__", "impl"))


def assert_matches_reference(report: Report):
    """Raise AssertionError, with every number, unless `report` satisfies the rule."""
    problems = report.problems()
    if problems:
        raise AssertionError(f"{report}\n  " + "\n  ".join(problems))


def check_attention(q, k, v, causal=False, scale=None, impl="v2", grad_out=None, **features) -> Report:
    """compare_to_reference + assert_matches_reference; returns the report."""
    report = compare_to_reference(q, k, v, causal, scale, impl, grad_out, **features)
    assert_matches_reference(report)
    return report
