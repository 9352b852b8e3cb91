"""Cross-implementation parity: every implementation on the same inputs, judged against float64.

Implementations: every entry of flashtile.registry (the Triton kernels and the CUDA
reference) and, on the GPU, PyTorch's scaled_dot_product_attention ("sdpa") as a peer. The
rule is flashtile.testing's (FlashAttention-2's): out, dq, dk, dv within 2x PyTorch's own
same-precision error of float64 plus one ulp, lse within a float32 tolerance and -inf exactly
where no key is seen, no NaN. Every output is allocated NaN-filled (tests/conftest.py's
poisoned_allocations), so an element a kernel never writes fails; rows that see no key must
give exactly 0 in out and dq. The CUDA reference must in addition meet its own tight rule
(flashtile.cuda_reference.reference_problems), on the case's dtype and on float32 copies of
the same inputs.

One grid, two devices. GRID is written at real sizes and runs on the GPU
(@pytest.mark.gpu, FLASHTILE_AUTOTUNE=0 from conftest); on the CPU (CI) the same cases run at
small sizes (CPU_LENGTH, CPU_WINDOW: the interpreter's 16-wide tiles, Nq vs Nk, partial
tiles and window edges keep their relations), the Triton kernels on the interpreter and the
CUDA reference in its host build.

The grid covers, for every implementation:
- head dims 1, 7, 16, 40, 64, 80, 96, 128, 192, 256 (every tile width, with and without
  EVEN_D); fp16 and bf16; contiguous tensors and transposed views of (B, N, H, D) storage
  ((H, total, D) storage for varlen); lengths 1, 113, 203, 1023, 2047, 4097 beside round ones;
  Nq < Nk and Nq > Nk, with rows that see no key; explicit scales 0.05, 1 and 3;
- grouped-query attention with groups 1, 2, 4 and 8, MQA (Hkv = 1) included;
- windows: left only, right only, both, (0, 0), wider than the sequence, causal + left;
- softcap alone, with causal, with a right window, and with a two-sided window;
- varlen batches with sequences of length 1, odd lengths, Nq != Nk per sequence, one 10x
  longer than the others; plain, causal, and with GQA + window + softcap;
test_grid_coverage checks that list against GRID.

The GPU budget. A cold run is dominated by Triton compiling: a kernel compiles once per
signature, i.e. per dtype, head-dim tile, EVEN_D, VARLEN / WINDOW_LEFT / WINDOW_RIGHT / SOFTCAP
flags and, for each integer argument (lengths, strides, head counts, group, window sides),
whether it is 1, a multiple of 16 or neither (compile_signature). With FLASHTILE_AUTOTUNE=0
one config per signature: about 7 kernels (v1 forward and backward; v2 forward, delta, dK/dV,
dQ; v2_atomic's atomic dK/dV) of ~1-3 s each on an H100. GRID's 19 GPU cases share 10
signatures, so about 70 compiles; every other GPU test here reuses one of those signatures
(test_grid_coverage checks both), except the portable-config test, which compiles one
signature's 7 kernels with the sm_80 configs in a subprocess.
"""
import collections
import functools
import gc
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import triton
import triton.language as tl

import flashtile
from flashtile.cuda_reference import reference_problems
from flashtile.reference import effective_window, visible_keys
from flashtile.registry import DEFAULT_IMPLEMENTATION, IMPLEMENTATIONS, REGISTRY, TRITON_IMPLEMENTATIONS
from flashtile.testing import (assert_matches_reference, compare, flashtile_impl, make_qkv, make_varlen_qkv,
                               random_like, reference_results, rerun_bitwise, run_attention)
from flashtile.triton_kernels._common import Problem, binding_window, d_contiguous, program_rows

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:
    given = None

F16, BF16 = torch.float16, torch.bfloat16
DEVICES = ("cpu", "cuda")
PEERS = {"cpu": (), "cuda": ("sdpa",)}
# Implementations whose backward adds dQ with atomics, in whatever order the programs finish:
# only their dQ may differ bitwise from run to run.
ATOMIC_DQ = tuple(name for name, entry in REGISTRY.items() if entry.atomic_dq)
MiB = 1 << 20
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------

Case = collections.namedtuple(
    "Case", "name B Hq Hkv n_q n_k D dtype causal window softcap scale layout seqlens",
    defaults=(False, (-1, -1), 0.0, None, "contiguous", None))
Case.__doc__ = """One attention problem. Dense: B, n_q, n_k. Varlen: seqlens ((n_q, n_k) per
sequence), B and n_q, n_k unused. layout: "contiguous" or "transposed" (dense: views of
(B, N, H, D) storage; varlen: views of (H, total, D) storage)."""


def dense(name, B, heads, n_q, n_k, D, dtype, **options):
    return Case(name, B, heads[0], heads[1], n_q, n_k, D, dtype, **options)


def varlen(name, heads, seqlens, D, dtype, **options):
    return Case(name, len(seqlens), heads[0], heads[1], None, None, D, dtype, seqlens=tuple(seqlens), **options)


# Grouped by compile signature (see the module doc): cases in one group differ only in
# what Triton does not specialise on (a length's value within its class, scale, softcap).
GRID = [
    dense("tiny", 2, (3, 3), 1, 1, 1, F16),
    # no mask; odd lengths, Nq < Nk and Nq > Nk; explicit scales
    dense("odd", 2, (3, 3), 113, 203, 40, BF16, scale=0.05),
    dense("odd-swapped", 2, (3, 3), 203, 113, 40, BF16, scale=3.0),
    # a window wider than the sequence bounds nothing: the launchers drop it (binding_window)
    dense("window-wider-than-sequence", 2, (3, 3), 113, 203, 40, BF16, window=(8192, 8192)),
    # causal and a right-only window (the same flags); rows that see no key
    dense("causal", 1, (3, 3), 1024, 2048, 128, F16, causal=True),
    dense("causal-rows-without-keys", 1, (3, 3), 2048, 1024, 128, F16, causal=True),
    dense("right-window", 1, (3, 3), 2048, 2048, 128, F16, window=(-1, 48)),
    # a left-only window, odd width
    dense("left-window", 1, (2, 2), 4097, 4097, 80, F16, window=(257, -1), layout="transposed"),
    dense("left-window-short-q", 2, (2, 2), 1023, 4097, 80, F16, window=(257, -1), layout="transposed"),
    # two-sided windows, MQA
    dense("window-mqa", 1, (8, 1), 1023, 2047, 256, BF16, window=(256, 32)),
    dense("window-zero-rows-without-keys", 1, (8, 1), 2047, 1023, 256, BF16, window=(0, 0)),
    dense("sliding-causal-mqa", 1, (8, 1), 2047, 2047, 256, BF16, causal=True, window=(512, -1)),
    # softcap, GQA group 2
    dense("softcap-gqa2", 2, (4, 2), 1023, 1024, 64, BF16, softcap=30.0),
    dense("softcap-saturated", 2, (4, 2), 1023, 1024, 64, BF16, softcap=5.0, scale=1.0),
    # softcap with causal / a right window, GQA group 8
    dense("softcap-causal-gqa8", 1, (16, 2), 1023, 1023, 96, F16, causal=True, softcap=10.0, layout="transposed"),
    dense("softcap-right-window-gqa8", 1, (16, 2), 1023, 1023, 96, F16, window=(-1, 64), softcap=10.0,
          layout="transposed"),
    # varlen: a sequence of one token, odd lengths, Nq != Nk, one sequence 10x the others
    varlen("varlen", (3, 3), [(1, 1), (97, 203), (970, 970), (77, 40)], 16, BF16),
    varlen("varlen-causal-gqa4", (8, 2), [(17, 1), (1, 17), (1023, 1023), (100, 99)], 192, F16, causal=True,
           layout="transposed"),
    varlen("varlen-window-softcap-mqa", (4, 1), [(97, 97), (971, 970), (1, 1), (40, 97)], 7, BF16,
           window=(63, 5), softcap=20.0),
]
GRID_BY_NAME = {case.name: case for case in GRID}
assert len(GRID_BY_NAME) == len(GRID), "case names must be unique"

# The CPU's stand-ins for the GPU's lengths and window sides (the interpreter's tiles are
# 16 x 16): the same order between Nq and Nk, odd stays odd and round stays round, a 10x
# longer sequence stays 10x longer, and a window stays narrower than the keys (or wider,
# for the case that says so) while spanning more than one tile where the GPU's does.
CPU_LENGTH = {1: 1, 17: 17, 40: 3, 77: 5, 97: 7, 99: 2, 100: 3, 113: 13, 203: 23, 970: 70, 971: 71, 1023: 31,
              1024: 32, 2047: 47, 2048: 48, 4097: 65}
CPU_WINDOW = {-1: -1, 0: 0, 5: 2, 32: 4, 48: 5, 63: 7, 64: 8, 256: 16, 257: 19, 512: 24, 8192: 1000}


def on_cpu(case):
    """The case at the CPU's sizes."""
    window = tuple(CPU_WINDOW[side] for side in case.window)
    if case.seqlens is not None:
        seqlens = tuple((CPU_LENGTH[a], CPU_LENGTH[b]) for a, b in case.seqlens)
        return case._replace(seqlens=seqlens, window=window)
    return case._replace(n_q=CPU_LENGTH[case.n_q], n_k=CPU_LENGTH[case.n_k], window=window)


CASES = {"cuda": GRID, "cpu": [on_cpu(case) for case in GRID]}


def case_of(device, name, **changes):
    """Grid case `name` at `device`'s sizes, with `changes` (e.g. a larger B: same signature)."""
    return CASES[device][[c.name for c in GRID].index(name)]._replace(**changes)


# ---------------------------------------------------------------------------------------
# What a case means: inputs, features, which rows see keys
# ---------------------------------------------------------------------------------------

def is_varlen(case):
    return case.seqlens is not None


def sequence_pairs(case):
    """(n_q, n_k) of each sequence (B times the same pair for a dense case)."""
    return case.seqlens if is_varlen(case) else ((case.n_q, case.n_k),) * case.B


def has_rows_without_keys(case):
    window = effective_window(case.causal, case.window)
    return any(n_q and not visible_keys(n_q, n_k, window).any(dim=1).all() for n_q, n_k in sequence_pairs(case))


def make_inputs(case, device, seed):
    """(q, k, v, d_out, features) for a case; features are run_attention's keywords."""
    features = dict(window_size=case.window, softcap=case.softcap)
    if is_varlen(case):
        seqlens_q, seqlens_k = zip(*case.seqlens)
        q, k, v, cu_q, cu_k = make_varlen_qkv(seqlens_q, seqlens_k, case.Hq, case.D, case.dtype, device=device,
                                              layout="hnd" if case.layout == "transposed" else "contiguous",
                                              seed=seed, kv_heads=case.Hkv)
        features.update(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    else:
        q, k, v = make_qkv(case.B, case.Hq, case.n_q, case.n_k, case.D, case.dtype, device=device,
                           layout="bnhd" if case.layout == "transposed" else "contiguous", seed=seed,
                           kv_heads=case.Hkv)
    return q, k, v, random_like(q, seed=seed + 1), features


_cache = {}


def case_data(case, device):
    """(q, k, v, d_out, features, f64, low) for a case, computed once and kept until the next
    case (the tests run case by case, implementation by implementation)."""
    key = (case, device)
    if key not in _cache:
        _cache.clear()
        if device == "cuda":
            torch.cuda.empty_cache()
        seed = 1000 + 10 * case.D + case.Hq
        q, k, v, d_out, features = make_inputs(case, device, seed)
        f64, low = reference_results(q, k, v, case.causal, case.scale, d_out, **features)
        _cache[key] = (q, k, v, d_out, features, f64, low)
    return _cache[key]


def sdpa(q, k, v, causal, scale, window_size=(-1, -1)):
    """PyTorch's scaled_dot_product_attention with flashtile's (bottom-right) window; it
    returns no lse (run_case substitutes the reference's, so only out and grads are judged)."""
    import torch.nn.functional as F

    window = effective_window(causal, window_size)
    mask = None if window == (-1, -1) else visible_keys(q.shape[2], k.shape[2], window, q.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out, None


def runs(impl, case):
    """sdpa has no softcap and no packed batches, and gives rows that see no key its own
    convention (not 0 and -inf); every flashtile implementation runs every case."""
    return impl != "sdpa" or not (is_varlen(case) or case.softcap or has_rows_without_keys(case))


def keyless_row_problems(results, f64, varlen_layout):
    """Rows that see no key (lse_f64 = -inf) must give exactly 0 in out and dq."""
    keyless = f64["lse"] == float("-inf")
    if varlen_layout:  # lse (Hq, total) against out (total, Hq, D)
        keyless = keyless.transpose(0, 1)
    problems = []
    for name in ("out", "dq"):
        if results[name] is not None and results[name].shape[:-1] == keyless.shape:
            if results[name][keyless].any():
                problems.append(f"{name} is not exactly 0 on the {int(keyless.sum())} rows that see no key")
    return problems


def run_case(impl, case, device):
    q, k, v, d_out, features, f64, low = case_data(case, device)
    if impl == "sdpa":
        fn = lambda *args, **kw: (sdpa(*args, **kw)[0], f64["lse"].float())  # noqa: E731
    else:
        fn = flashtile_impl(impl)
    results = run_attention(fn, q, k, v, case.causal, case.scale, d_out, **features)
    report = compare(results, f64, low, case.dtype, name=impl)
    problems = report.problems() + keyless_row_problems(results, f64, is_varlen(case))
    if impl == "cuda":
        problems += [f"reference rule, {case.dtype}: {p}" for p in reference_problems(results, f64, case.dtype)]
        # float32 copies hold the same values, so the same float64 truth applies.
        as_float32 = run_attention(fn, q.float(), k.float(), v.float(), case.causal, case.scale, d_out.float(),
                                   **features)
        problems += [f"reference rule, float32 inputs: {p}" for p in reference_problems(as_float32, f64)]
    assert not problems, f"{report}\n  " + "\n  ".join(problems)
    return report


def grid_params(device):
    # Case-major order: the one-case cache serves all implementations of a case. Under
    # pytest-xdist (--dist loadgroup) a case's implementations share one worker, so
    # workers compile different cases' kernels in parallel and each computes a case's
    # float64 reference once.
    marks = [pytest.mark.gpu if device == "cuda" else pytest.mark.interpreter]
    return [pytest.param(device, case, impl, id=f"{device}-{case.name}-{impl}",
                         marks=marks + [pytest.mark.xdist_group(f"{device}-{case.name}")])
            for case in CASES[device] for impl in IMPLEMENTATIONS + PEERS[device] if runs(impl, case)]


def device_params():
    return [pytest.param("cpu", marks=pytest.mark.interpreter, id="cpu"),
            pytest.param("cuda", marks=pytest.mark.gpu, id="cuda")]


@pytest.fixture(autouse=True)
def free_gpu_memory():
    yield
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------
# The parity grid
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("device,case,impl", grid_params("cpu") + grid_params("cuda"))
def test_parity(device, case, impl, poisoned_allocations):
    run_case(impl, case, device)


# ---------------------------------------------------------------------------------------
# The grid's coverage and its compile budget (runs everywhere, no kernel)
# ---------------------------------------------------------------------------------------

def _int_class(x):
    """How Triton specialises an integer argument: 1, a multiple of 16, or neither."""
    return "1" if x == 1 else "16k" if x % 16 == 0 else "-"


def compile_signature(case):
    """What makes a kernel compile anew for this case (see the module doc): the dtype, the
    constexprs, and the class of every integer the launchers pass (strides of q, k, v, out,
    dk and lse in the case's layout, head counts, group, lengths, window sides, length buckets)."""
    D = case.D
    block_d = max(16, 1 << (D - 1).bit_length())
    transposed = case.layout == "transposed"
    if is_varlen(case):
        n_q, n_k = (max(lengths) for lengths in zip(*case.seqlens))
        total_q, total_k = (sum(lengths) for lengths in zip(*case.seqlens))
        rows_q, rows_k = total_q, total_k  # the kernels' n_q / n_k: packed rows (Problem.kernel_rows)
        rows = lambda H, total: (0, total * D, D) if transposed else (0, D, H * D)  # noqa: E731
        strides = rows(case.Hq, total_q) + rows(case.Hkv, total_k) + (0, D, case.Hq * D, 0, D, case.Hkv * D,
                                                                     0, total_q)
    else:
        n_q, n_k = case.n_q, case.n_k
        rows_q, rows_k = n_q, n_k
        rows = lambda H, n: (n * H * D, D, H * D) if transposed else (H * n * D, n * D, D)  # noqa: E731
        strides = rows(case.Hq, n_q) + rows(case.Hkv, n_k) + (case.Hq * n_q * D, n_q * D, D,
                                                              case.Hkv * n_k * D, n_k * D, D, case.Hq * n_q, n_q)
    left, right = binding_window(*effective_window(case.causal, case.window), n_q, n_k)
    bucket = lambda n: 1 << (max(n, 1) - 1).bit_length()  # noqa: E731
    ints = strides + (case.Hq, case.Hkv, case.Hq // case.Hkv, rows_q, rows_k, D, max(left, 0), max(right, 0),
                      bucket(n_q), bucket(n_k))
    flags = (is_varlen(case), left >= 0, right >= 0, case.softcap > 0)
    return (str(case.dtype), block_d, D == block_d) + flags + tuple(_int_class(x) for x in ints)


def _windows(case):
    left, right = case.window
    if case.causal:
        right = 0
    return left, right


@pytest.mark.parametrize("n_q,n_k", [(1, 1), (1, 9), (9, 1), (9, 9), (5, 12), (12, 5)])
def test_windows_that_bound_nothing_are_dropped(n_q, n_k):
    """binding_window turns a side into -1 exactly when that side hides no key from any query,
    so the launchers can skip its edge loops without changing which keys a query sees."""
    sides = range(-1, max(n_q, n_k) + 2)
    for left in sides:
        for right in sides:
            dropped = binding_window(left, right, n_q, n_k)
            assert torch.equal(visible_keys(n_q, n_k, dropped), visible_keys(n_q, n_k, (left, right)))
            for side, (given, kept) in enumerate(zip((left, right), dropped)):
                if given >= 0 and kept == -1:
                    continue
                assert kept == given
                if given >= 0:  # kept: one step wider must change what some query sees
                    wider = [left, right]
                    wider[side] = -1
                    assert not torch.equal(visible_keys(n_q, n_k, tuple(wider)), visible_keys(n_q, n_k, (left, right)))


def packed_slots(lengths, block):
    """The program slots of each sequence in a packed varlen grid of one head, as
    packed_program_block assigns them: [c[b] // block + b, c[b+1] // block + b + 1)."""
    ends = [0]
    for n in lengths:
        ends.append(ends[-1] + n)
    return [range(ends[b] // block + b, ends[b + 1] // block + b + 1) for b in range(len(lengths))]


@pytest.mark.parametrize("block", [16, 64, 128])
def test_packed_varlen_grid_slots(block):
    """Problem.grid's varlen size, total // BLOCK + batch per head, leaves each sequence enough
    slots: the ranges tile the grid in order, each holds cdiv(len, BLOCK) blocks and at most
    one spare, whatever the lengths (0, 1, multiples of BLOCK, one far longer than the rest)."""
    rng = torch.Generator().manual_seed(block)
    for _ in range(500):
        batch = int(torch.randint(1, 12, (1,), generator=rng))
        pool = torch.tensor([0, 1, block - 1, block, block + 1, 2 * block, 10 * block + 3])
        lengths = torch.where(torch.rand(batch, generator=rng) < 0.5, pool[torch.randint(0, len(pool), (batch,),
                                                                                        generator=rng)],
                              torch.randint(0, 3 * block, (batch,), generator=rng)).tolist()
        slots = packed_slots(lengths, block)
        assert slots[0].start == 0 and slots[-1].stop == sum(lengths) // block + batch
        for before, after in zip(slots, slots[1:]):
            assert before.stop == after.start
        for n, owned in zip(lengths, slots):
            assert -(-n // block) <= len(owned) <= -(-n // block) + 1, (lengths, n, owned)


@triton.jit
def _packed_decode_kernel(CU_SEQLENS, OUT, n_heads, total_rows, BLOCK: tl.constexpr, LONGEST_FIRST: tl.constexpr):
    batch, head, first_row, row0, length = program_rows(CU_SEQLENS, n_heads, total_rows, BLOCK, LONGEST_FIRST, True)
    decoded = tl.where(tl.arange(0, 8) == 0, batch, tl.where(tl.arange(0, 8) == 1, head, tl.where(
        tl.arange(0, 8) == 2, first_row, tl.where(tl.arange(0, 8) == 3, row0, length))))
    tl.store(OUT + tl.program_id(0) * 5 + tl.arange(0, 8), decoded, mask=tl.arange(0, 8) < 5)


@pytest.mark.interpreter
@pytest.mark.parametrize("longest_first", [False, True])
@pytest.mark.parametrize("spare_rows", [0, 40])
def test_packed_varlen_grid_decode(longest_first, spare_rows):
    """The kernels' decode of the packed grid (program_rows with VARLEN) gives every block of
    every (sequence, head) to exactly one program, with its sequence's first row and length;
    the others (spare slots, and rows of the tensor past cu_seqlens[-1]) start past their
    sequence's end. LONGEST_FIRST gives a sequence's blocks last first."""
    block, heads = 16, 2
    lengths = [0, 1, 16, 17, 0, 160, 15, 33]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    total = sum(lengths) + spare_rows
    programs = (total // block + len(lengths)) * heads
    out = torch.full((programs, 5), -7, dtype=torch.int32)
    _packed_decode_kernel[(programs,)](cu, out, heads, total, block, longest_first)
    blocks = collections.defaultdict(list)
    for batch, head, first_row, row0, length in out.tolist():
        assert (row0, length) == (cu[batch], lengths[batch])
        if first_row < length:
            assert first_row >= 0 and first_row % block == 0
            blocks[batch, head].append(first_row)
    for batch, n in enumerate(lengths):
        for head in range(heads):
            order = list(range(0, n, block))
            assert blocks[batch, head] == (order[::-1] if longest_first else order)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("impl", TRITON_IMPLEMENTATIONS)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_empty_and_uneven_sequences(device, impl, causal):
    """Empty sequences (on either side), one-token ones and one 10x longer than the rest in
    one packed batch: every sequence's blocks find their programs in the packed grid."""
    seqlens = [(0, 0), (1, 1), (5, 7), (0, 3), (4, 0), (70, 70), (7, 5), (16, 16)]
    seqlens_q, seqlens_k = zip(*seqlens)
    q, k, v, cu_q, cu_k = make_varlen_qkv(seqlens_q, seqlens_k, 4, 16, F16, device=device, seed=11, kv_heads=2)
    compare_case(impl, q, k, v, random_like(q, seed=12), varlen(None, (4, 2), seqlens, 16, F16, causal=causal),
                 cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


def test_grid_coverage():
    """GRID holds what the module doc promises, on both devices."""
    for device, cases in CASES.items():
        assert {c.D for c in cases} == {1, 7, 16, 40, 64, 80, 96, 128, 192, 256}
        assert {c.dtype for c in cases} == {F16, BF16}
        assert {c.layout for c in cases} == {"contiguous", "transposed"}
        assert {c.layout for c in cases if is_varlen(c)} == {"contiguous", "transposed"}
        assert {c.Hq // c.Hkv for c in cases} >= {1, 2, 8} and any(c.Hkv == 1 for c in cases)
        dense_cases = [c for c in cases if not is_varlen(c)]
        assert any(c.n_q < c.n_k for c in dense_cases) and any(c.n_q > c.n_k for c in dense_cases)
        assert any(has_rows_without_keys(c) for c in dense_cases if c.causal)
        assert any(has_rows_without_keys(c) for c in dense_cases if c.window != (-1, -1))
        windows = [(c, _windows(c)) for c in dense_cases]
        assert any(l >= 0 and r < 0 for c, (l, r) in windows), "left only"
        assert any(l < 0 and 0 < r for c, (l, r) in windows if not c.causal), "right only"
        assert any(l > 0 and r > 0 for c, (l, r) in windows), "both sides"
        assert any((l, r) == (0, 0) for c, (l, r) in windows), "(0, 0)"
        assert any(min(l, r) >= max(c.n_q, c.n_k) for c, (l, r) in windows), "wider than the sequence"
        assert any(c.causal and l >= 0 for c, (l, r) in windows), "causal + left"
        softcapped = [c for c in cases if c.softcap]
        assert any(not c.causal and c.window == (-1, -1) for c in softcapped)
        assert any(c.causal for c in softcapped) and any(c.window != (-1, -1) for c in softcapped)
        varlens = [c for c in cases if is_varlen(c)]
        assert any(c.causal for c in varlens) and any(c.softcap and c.window != (-1, -1) for c in varlens)
        lengths = [n for c in varlens for pair in c.seqlens for n in pair]
        assert 1 in lengths and any(n % 2 for n in lengths)
        assert any(a != b for c in varlens for a, b in c.seqlens)
        assert any(max(n for n, _ in c.seqlens) >= 10 * sorted(n for n, _ in c.seqlens)[-2] for c in varlens)
    # the peer runs on GQA and on windows somewhere
    assert any(runs("sdpa", c) and c.Hq != c.Hkv for c in GRID)
    assert any(runs("sdpa", c) and c.window != (-1, -1) for c in GRID)


def test_gpu_compile_budget():
    """The GPU grid's compile signatures, and the other GPU tests reuse them."""
    signatures = {compile_signature(case) for case in GRID}
    assert len(signatures) <= 10, f"{len(signatures)} signatures: each costs ~7 compiles on a cold cache"
    for name, case in GPU_SPECIAL_CASES.items():
        assert compile_signature(case) in signatures, f"{name} compiles kernels of its own"


# ---------------------------------------------------------------------------------------
# Behaviour the grid does not reach, on both devices
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", ["odd", "causal"])
@pytest.mark.parametrize("direction", ["growing", "shrinking"])
def test_online_softmax_rescaling(device, impl, name, direction):
    """Scores whose row maximum moves from block to block, by a lot.

    Keys grow (or shrink) in norm along the sequence, so each new key block raises the
    running maximum (or never does), and scale 4 makes scores of order 100: exp without the
    max subtracted would overflow float32. Exercises the rescaling of the running sum and
    output (the correction factor) and the -inf handling of the first block."""
    case = case_of(device, name)
    q, k, v, d_out, features = make_inputs(case, device, seed=3)
    ramp = torch.linspace(0.25, 4.0, case.n_k, device=device)
    if direction == "shrinking":
        ramp = ramp.flip(0)
    k = (k.float() * ramp[:, None]).to(case.dtype)
    report = compare_case(impl, q, k, v, d_out, case, scale=4.0)
    finite = torch.isfinite(report.reference["lse"])
    assert report.reference["lse"][finite].abs().max() > 88.0  # exp(88.7) overflows float32


def compare_case(impl, q, k, v, d_out, case, scale=None, **features):
    report = compare(run_attention(flashtile_impl(impl), q, k, v, case.causal, scale, d_out, **features),
                     *reference_results(q, k, v, case.causal, scale, d_out, **features), case.dtype, name=impl)
    assert_matches_reference(report)
    return report


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_rows_without_keys_ignore_their_grad_out(device, impl):
    """Rows that see no key contribute nothing to any gradient, whatever their grad_out."""
    case = case_of(device, "causal-rows-without-keys")
    q, k, v, d_out, _ = make_inputs(case, device, seed=7)
    keyless = case.n_q - case.n_k
    loud = d_out.clone()
    loud[:, :, :keyless] = 1000.0
    fn = flashtile_impl(impl)
    quiet = run_attention(fn, q, k, v, True, None, d_out)
    noisy = compare_case(impl, q, k, v, loud, case).results
    assert torch.all(noisy["dq"][:, :, :keyless] == 0)
    for name in bitwise_repeatable(impl):
        assert torch.equal(quiet[name], noisy[name]), name


def bitwise_repeatable(impl):
    """The results `impl` computes in a fixed order: all but an atomic dQ."""
    return ("out", "lse", "dk", "dv") + (() if impl in ATOMIC_DQ else ("dq",))


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("layout", ["sliced", "mixed"])
def test_strided_inputs(device, impl, layout):
    """Views of a wider head dim (padded with NaN, so a read past D shows) and a mix of
    layouts give the contiguous inputs' results, bit for bit where the order is fixed."""
    case = case_of(device, "causal")
    contiguous = make_qkv(case.B, case.Hq, case.n_q, case.n_k, case.D, case.dtype, device=device, seed=9)
    strided = make_qkv(case.B, case.Hq, case.n_q, case.n_k, case.D, case.dtype, device=device, seed=9,
                       layout=layout)
    assert not all(t.is_contiguous() for t in strided)
    d_out = random_like(contiguous[0], seed=10)
    expected = run_attention(flashtile_impl(impl), *contiguous, True, None, d_out)
    report = compare_case(impl, *strided, d_out, case)
    for name in bitwise_repeatable(impl):
        assert torch.equal(report.results[name], expected[name]), f"{name} differs from the contiguous run"


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("how", ["expanded", "transposed", "sliced"])
def test_strided_grad_out(device, impl, how):
    """The upstream gradient can have any strides: stride 0 (the gradient of a sum), a
    transposed view, a slice of a wider tensor."""
    case = case_of(device, "causal")
    q, k, v, d_out, _ = make_inputs(case, device, seed=11)
    if how == "expanded":
        d_out = d_out[:1, :1, :1].expand_as(d_out)
    elif how == "transposed":
        d_out = d_out.transpose(1, 2).contiguous().transpose(1, 2)
    else:
        d_out = torch.cat([d_out, d_out], dim=-1)[..., case.D:]
    assert not d_out.is_contiguous()
    expected = run_attention(flashtile_impl(impl), q, k, v, True, None, d_out.contiguous())
    report = compare_case(impl, q, k, v, d_out, case)
    for name in bitwise_repeatable(impl):
        assert torch.equal(report.results[name], expected[name]), name


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_gradients_for_a_subset_of_inputs(device, impl):
    """Only q (or only k and v) requiring grad gives the gradients of all three."""
    case = case_of(device, "softcap-gqa2")
    q, k, v, d_out, features = make_inputs(case, device, seed=17)
    full = run_attention(flashtile_impl(impl), q, k, v, False, None, d_out, **features)
    options = dict(impl=impl, softcap=case.softcap)
    q_leaf = q.clone().requires_grad_()
    (dq,) = torch.autograd.grad(flashtile.attention(q_leaf, k, v, **options), [q_leaf], d_out)
    k_leaf, v_leaf = k.clone().requires_grad_(), v.clone().requires_grad_()
    dk, dv = torch.autograd.grad(flashtile.attention(q, k_leaf, v_leaf, **options), [k_leaf, v_leaf], d_out)
    partial = dict(full, dq=dq, dk=dk, dv=dv)
    for name in bitwise_repeatable(impl):
        assert torch.equal(partial[name], full[name]), name
    f64, low = reference_results(q, k, v, False, None, d_out, **features)
    assert_matches_reference(compare(partial, f64, low, case.dtype, name=impl))


# ---------------------------------------------------------------------------------------
# Property test (CPU): random shapes and features
# ---------------------------------------------------------------------------------------

if given is not None:
    @pytest.mark.interpreter
    @settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(B=st.integers(1, 2), Hkv=st.integers(1, 2), group=st.sampled_from([1, 2, 3]), n_q=st.integers(1, 40),
           n_k=st.integers(1, 40), D=st.integers(1, 64), causal=st.booleans(),
           window=st.tuples(st.integers(-1, 40), st.integers(-1, 40)), softcap=st.sampled_from([0.0, 0.0, 4.0]),
           dtype=st.sampled_from([F16, BF16]), impl=st.sampled_from(IMPLEMENTATIONS), seed=st.integers(0, 2**16))
    def test_property_matches_reference(B, Hkv, group, n_q, n_k, D, causal, window, softcap, dtype, impl, seed):
        q, k, v = make_qkv(B, Hkv * group, n_q, n_k, D, dtype, seed=seed, kv_heads=Hkv)
        case = Case("drawn", B, Hkv * group, Hkv, n_q, n_k, D, dtype, causal, window, softcap)
        compare_case(impl, q, k, v, random_like(q, seed=seed + 1), case, window_size=window, softcap=softcap)
else:
    @pytest.mark.skip(reason="hypothesis is not installed: pip install flashtile[test]")
    def test_property_matches_reference():
        pass


# ---------------------------------------------------------------------------------------
# GPU only: determinism, large grids and tensors, memory, the portable configs
# ---------------------------------------------------------------------------------------

# Each reuses a grid case's compile signature (test_gpu_compile_budget checks it).
GPU_SPECIAL_CASES = {
    "determinism": GRID_BY_NAME["softcap-causal-gqa8"]._replace(B=8),
    "many_heads": GRID_BY_NAME["window-mqa"]._replace(B=8750, n_q=33, n_k=47, window=(16, 16)),
    "rows_above_2_31": GRID_BY_NAME["causal"]._replace(n_q=2**24 + 16, n_k=64),
    "row_offsets_above_2_31": GRID_BY_NAME["causal"]._replace(Hq=16385, Hkv=16385, n_q=1040, n_k=1040,
                                                              layout="transposed"),
    "long": GRID_BY_NAME["causal"]._replace(n_q=16384, n_k=16384),
    "long_gqa": GRID_BY_NAME["softcap-right-window-gqa8"]._replace(Hkv=8, n_q=16383, n_k=16383),
    "memory": GRID_BY_NAME["causal"]._replace(B=8, n_q=16384, n_k=16384),
    "memory_gqa": GRID_BY_NAME["softcap-causal-gqa8"]._replace(B=4, Hq=32, Hkv=4, n_q=16383, n_k=16383),
}


@pytest.mark.gpu
@pytest.mark.parametrize("impl", [name for name in IMPLEMENTATIONS if name not in ATOMIC_DQ])
def test_backward_is_bitwise_deterministic(impl):
    """No atomics in the backward: reruns give the same bits for every result, GQA's dK/dV
    (summed over each group of query heads in a fixed order) included."""
    case = GPU_SPECIAL_CASES["determinism"]
    q, k, v, d_out, features = make_inputs(case, "cuda", seed=30)
    rerun_bitwise(flashtile_impl(impl), q, k, v, case.causal, d_out, runs=10, label=impl, **features)


@pytest.mark.gpu
def test_backward_on_a_callers_stream_and_in_a_cuda_graph():
    """On a caller's own stream and captured into a CUDA graph (whose capture stream is not the
    default one), v2's forward and backward give the default stream's results bit for bit."""
    case = GPU_SPECIAL_CASES["determinism"]
    q, k, v, d_out, features = make_inputs(case, "cuda", seed=32)
    fn = flashtile_impl("v2")
    run = lambda: run_attention(fn, q, k, v, case.causal, None, d_out, **features)  # noqa: E731
    expected = run()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        on_stream = run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    for name in ("dq", "dk", "dv"):
        captured[name].fill_(float("nan"))  # poisoned: only the replay writes them
    graph.replay()
    torch.cuda.synchronize()
    for name in ("out", "lse", "dq", "dk", "dv"):
        assert torch.equal(on_stream[name], expected[name]), f"{name} differs on a caller's stream"
        assert torch.equal(captured[name], expected[name]), f"{name} differs in a CUDA graph"


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_tensors_on_a_gpu_other_than_the_current_one(impl):
    """Inputs on cuda:1 while cuda:0 is current (a model moved with .to("cuda:1") and no
    set_device): every kernel runs on the tensors' GPU, and the results are those of the call
    made with cuda:1 current."""
    case = GPU_SPECIAL_CASES["determinism"]
    q, k, v, d_out, features = make_inputs(case, "cuda:1", seed=33)
    with torch.cuda.device(1):
        expected = run_attention(flashtile_impl(impl), q, k, v, case.causal, None, d_out, **features)
    with torch.cuda.device(0), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        got = run_attention(flashtile_impl(impl), q, k, v, case.causal, None, d_out, **features)
        torch.cuda.synchronize(1)
    kernels = [(event.name, event.device_index) for event in prof.events() if event.device_type.name == "CUDA"]
    assert kernels and all(index == 1 for _, index in kernels), kernels  # nothing launched on cuda:0
    for name in ("out", "lse", "dq", "dk", "dv"):
        assert got[name].device == q.device, name
        if name in bitwise_repeatable(impl):
            assert torch.equal(got[name], expected[name]), name
        else:  # dQ added with atomics: equal up to the order of the additions
            torch.testing.assert_close(got[name], expected[name], rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ATOMIC_DQ)
def test_atomic_dq_leaves_dk_dv_deterministic(impl):
    """Only dQ is added with atomics: the forward, dK and dV repeat exactly."""
    case = GPU_SPECIAL_CASES["determinism"]
    q, k, v, d_out, features = make_inputs(case, "cuda", seed=31)
    rerun_bitwise(flashtile_impl(impl), q, k, v, case.causal, d_out, runs=10, names=bitwise_repeatable(impl),
                  label=impl, **features)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", TRITON_IMPLEMENTATIONS)
def test_more_than_65535_heads(impl):
    """B * Hq = 70000 (programs beyond CUDA's 65535 limit on grid y and z), MQA; checked
    against the reference on batches spread over the whole range."""
    case = GPU_SPECIAL_CASES["many_heads"]
    # Drawn on the GPU: 600 M elements drawn on the CPU (make_inputs) take ~10 s.
    q, d_out = (_fill_randn(torch.empty(case.B, case.Hq, case.n_q, case.D, device="cuda", dtype=case.dtype),
                            seed, 0, case.B) for seed in (40, 41))
    k, v = (_fill_randn(torch.empty(case.B, case.Hkv, case.n_k, case.D, device="cuda", dtype=case.dtype),
                        seed, 0, case.B) for seed in (42, 43))
    features = dict(window_size=case.window, softcap=case.softcap)
    results = run_attention(flashtile_impl(impl), q, k, v, case.causal, None, d_out, **features)
    batches = torch.tensor([0, 1, 17, 4095, 4096, case.B - 1], device="cuda")
    sub = lambda t: t[batches]  # noqa: E731
    f64, low = reference_results(sub(q), sub(k), sub(v), case.causal, None, sub(d_out), **features)
    assert_matches_reference(compare({n: sub(t) for n, t in results.items()}, f64, low, case.dtype, name=impl))
    for name, t in results.items():
        assert not torch.isnan(t).any(), name


def _fill_randn(t, seed, chunk_dim, chunk):
    """Fill a large tensor with N(0, 1) in slices along chunk_dim: no float32 temporary of its size."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    for start in range(0, t.shape[chunk_dim], chunk):
        part = t.narrow(chunk_dim, start, min(chunk, t.shape[chunk_dim] - start))
        part.copy_(torch.randn(part.shape, generator=gen, device="cuda"))
    return t


@pytest.mark.gpu
@pytest.mark.xdist_group("whole_gpu")  # tens of GB each: never two at once under xdist
def test_forward_on_a_tensor_above_2_31_elements():
    """q and out of 3 x (2^24 + 16) x 128 elements: rows past element 2^31 of a head need
    64-bit offsets. Causal with 64 keys: the last 64 rows (which straddle element 2^31 of
    the last head) see keys and are judged by the rule against the reference on those rows;
    every other row sees no key and must be exactly 0 with lse -inf."""
    case = GPU_SPECIAL_CASES["rows_above_2_31"]
    q = _fill_randn(torch.empty(1, case.Hq, case.n_q, case.D, device="cuda", dtype=case.dtype), 50, 2, 2**21)
    assert (case.n_q - case.n_k) * case.D < 2**31 <= case.n_q * case.D
    _, k, v = make_qkv(1, case.Hq, 1, case.n_k, case.D, case.dtype, device="cuda", seed=51)
    out, lse = flashtile.attention(q, k, v, causal=True, impl=DEFAULT_IMPLEMENTATION, return_lse=True)
    seeing = slice(case.n_q - case.n_k, None)
    f64, low = reference_results(q[:, :, seeing], k, v, True)
    assert_matches_reference(compare({"out": out[:, :, seeing], "lse": lse[:, :, seeing], "dq": None, "dk": None,
                                      "dv": None}, f64, low, case.dtype, name=DEFAULT_IMPLEMENTATION))
    keyless = torch.tensor([0, 1, 2**23, case.n_q - case.n_k - 1], device="cuda")
    assert torch.all(out[:, :, keyless] == 0) and torch.all(lse[:, :, keyless] == float("-inf"))


@pytest.mark.gpu
@pytest.mark.xdist_group("whole_gpu")
@pytest.mark.parametrize("impl", TRITON_IMPLEMENTATIONS)
def test_backward_with_row_offsets_above_2_31(impl):
    """(B, N, H, D) storage with H = 16385: the sequence stride is H * D ~ 2^21 elements, so
    row 1039 of a head lies 2.18e9 elements in; forward and backward, checked on a few heads.
    Each of q, k, v, out, dO, dq, dk, dv is 4.4 GB."""
    case = GPU_SPECIAL_CASES["row_offsets_above_2_31"]
    shape = (1, case.n_q, case.Hq, case.D)
    q, k, v, d_out = (_fill_randn(torch.empty(shape, device="cuda", dtype=case.dtype), seed, 1, 64).transpose(1, 2)
                      for seed in (60, 61, 62, 63))
    assert (case.n_q - 1) * q.stride(2) >= 2**31 and q.numel() > 2**31
    results = run_attention(flashtile_impl(impl), q, k, v, True, None, d_out)
    heads = torch.tensor([0, 1, 8192, case.Hq - 1], device="cuda")
    sub = lambda t: t[:, heads]  # noqa: E731
    f64, low = reference_results(sub(q), sub(k), sub(v), True, None, sub(d_out))
    assert_matches_reference(compare({n: sub(t) for n, t in results.items()}, f64, low, case.dtype, name=impl))
    for name in ("out", "dq", "dk", "dv"):  # the rows past 2^31 were written (no NaN anywhere)
        assert not torch.isnan(results[name][:, :, -8:]).any(), name


@functools.lru_cache(maxsize=1)
def long_case_data(which):
    """Inputs and, per K/V head, the (float64, low-precision) references of a long case. The
    float64 reference keeps several N x N matrices per head for autograd (2 GB each at
    N = 16384), so it runs one K/V head (and its group of query heads) at a time."""
    case = GPU_SPECIAL_CASES[which]
    q, k, v, d_out, features = make_inputs(case, "cuda", seed=90)
    group = case.Hq // case.Hkv
    references = []
    for kv_head in range(case.Hkv):
        q_heads, kv_heads = slice(kv_head * group, (kv_head + 1) * group), slice(kv_head, kv_head + 1)
        f64, low = reference_results(q[:, q_heads], k[:, kv_heads], v[:, kv_heads], case.causal, None,
                                     d_out[:, q_heads], **features)
        references.append((q_heads, kv_heads, f64, low))
    return (q, k, v, d_out, features), references


@pytest.mark.gpu
@pytest.mark.xdist_group("whole_gpu")  # float64 references of N x N per head: one at a time under xdist
@pytest.mark.parametrize("impl", TRITON_IMPLEMENTATIONS)
@pytest.mark.parametrize("which", ["long", "long_gqa"])
def test_long_sequences(impl, which):
    """N = 16384: 128-256 key blocks per row block, judged head by head."""
    case = GPU_SPECIAL_CASES[which]
    (q, k, v, d_out, features), references = long_case_data(which)
    results = run_attention(flashtile_impl(impl), q, k, v, case.causal, None, d_out, **features)
    for q_heads, kv_heads, f64, low in references:
        part = {name: t[:, kv_heads if name in ("dk", "dv") else q_heads] for name, t in results.items()}
        assert_matches_reference(compare(part, f64, low, case.dtype, name=f"{impl}, query heads {q_heads}"))


def keeps_float32_dq(impl, q, k, v, case):
    """Whether impl's causal backward of these inputs adds dQ into a float32 buffer: the atomic
    ones do, and v2 where its one-pass Hopper backward serves."""
    from flashtile.triton_kernels import v2

    if impl != "v2":
        return impl in ATOMIC_DQ
    q, k, v = (d_contiguous(t) for t in (q, k, v))  # as v2_backward asks it
    problem = Problem.of(q, k, None, None, None, None, q.shape[-1] ** -0.5, -1, 0, case.softcap)
    return v2.one_pass_backward_serves(q, k, v, problem)


@pytest.mark.gpu
@pytest.mark.xdist_group("whole_gpu")
@pytest.mark.parametrize("impl", TRITON_IMPLEMENTATIONS)
@pytest.mark.parametrize("which", ["memory", "memory_gqa"])
def test_peak_memory_is_linear_in_n(impl, which):
    """Forward + backward at N = 16384 allocate the outputs, the gradients, O(N) statistics
    and (atomic dQ, v2's one pass) a float32 dq accumulator: no N x N matrix (one head's fp16
    scores alone would be 512 MiB), and with GQA no copy of K and V repeated to the query heads
    (dK, dV come back with Hkv heads)."""
    case = GPU_SPECIAL_CASES[which]
    q, k, v, d_out, features = make_inputs(case, "cuda", seed=70)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def forward_backward():
        out = flashtile.attention(*leaves, causal=True, impl=impl, softcap=case.softcap)
        return out, torch.autograd.grad(out, leaves, d_out)

    forward_backward()  # warm-up: compiling and autotuning allocate
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out, grads = forward_backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    q_bytes, kv_bytes = q.numel() * q.element_size(), k.numel() * k.element_size()
    must_exist = 2 * q_bytes + 2 * kv_bytes  # out, dq, dk, dv
    stats = 4 * case.B * case.Hq * case.n_q * 4  # float32 (B, Hq, N) statistics: lse, delta, m, l
    dq_accumulator = 2 * q_bytes if keeps_float32_dq(impl, q, k, v, case) else 0  # a float32 copy of dq
    slack = stats + 64 * MiB
    allowed = must_exist + dq_accumulator + slack
    assert peak <= allowed, (f"{impl}: peak {peak / MiB:.0f} MiB above the inputs, allowed {allowed / MiB:.0f} MiB "
                             f"(outputs and grads {must_exist / MiB:.0f} MiB)")
    if case.Hq != case.Hkv:  # K and V repeated to Hq heads would not fit in the slack
        assert (case.Hq // case.Hkv - 1) * 2 * kv_bytes > slack
    assert all(g.shape == t.shape for g, t in zip(grads, leaves))


PORTABLE_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    from flashtile.registry import TRITON_IMPLEMENTATIONS
    from flashtile.testing import check_attention, make_qkv, random_like
    from flashtile.triton_kernels._common import device_capability

    assert device_capability() == 80, device_capability()
    B, H, n_q, n_k, D = (int(arg) for arg in sys.argv[1:6])
    q, k, v = make_qkv(B, H, n_q, n_k, D, getattr(torch, sys.argv[6]), device="cuda", seed=80)
    for impl in TRITON_IMPLEMENTATIONS:
        print("ok", check_attention(q, k, v, causal=True, impl=impl, grad_out=random_like(q, seed=81)), flush=True)
    print("portable parity passed")
""")


@pytest.mark.gpu
def test_portable_configs_in_a_subprocess():
    """FLASHTILE_PORTABLE=1 forces the sm_80 configuration sets (what an A100 gets): the
    same parity checks must pass with them. A subprocess, since the configs are chosen
    when the kernel modules are imported."""
    env = dict(os.environ, FLASHTILE_PORTABLE="1")
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    case = GRID_BY_NAME["causal"]  # a grid signature, compiled here with the sm_80 configs
    args = [str(x) for x in (case.B, case.Hq, case.n_q, case.n_k, case.D)] + [str(case.dtype)[6:]]
    proc = subprocess.run([sys.executable, "-c", PORTABLE_SCRIPT, *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-5000:]}"
    assert "portable parity passed" in proc.stdout
    assert proc.stdout.count("ok ") == len(TRITON_IMPLEMENTATIONS)
