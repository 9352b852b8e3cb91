"""Shared test setup.

- Without a CUDA device, the kernels can only run on Triton's CPU interpreter, which must be
  switched on (TRITON_INTERPRET=1) before any kernel module is decorated with triton.jit.
  This file is imported by pytest before any test module, so it sets the variable here, at
  import time, when there is no GPU and the variable is not set at all. An explicit
  TRITON_INTERPRET=0 is respected (the AOT compile test needs real JIT functions).
- `@pytest.mark.gpu` tests are skipped, with the reason printed by `-ra`, when there is no
  CUDA device or when the interpreter is on (they need compiled kernels). A skip is never a
  pass: the summary line counts them as skipped.
- Tests that run kernels on CPU tensors are skipped, with a reason, when the interpreter is
  off (a GPU machine running without TRITON_INTERPRET=1).
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

import pytest  # noqa: E402

try:
    from hypothesis import settings
except ImportError:  # the property test then skips, saying so (tests/test_attention_cpu.py)
    settings = None
if settings is not None:
    # CI (CI=true, as .ci/run is run) draws the same property-test examples every time, so
    # a landing is never decided by a lucky or unlucky draw; elsewhere the draws are random
    # (hypothesis prints the seed and the falsifying example on failure).
    settings.register_profile("ci", derandomize=True, print_blob=True)
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        settings.load_profile("ci")


def pytest_configure(config):
    config.addinivalue_line("markers", "interpreter: runs kernels on CPU tensors; needs TRITON_INTERPRET=1")
    config.addinivalue_line("markers", "compiled: needs compiled Triton kernels (TRITON_INTERPRET unset or 0)")
    # Used by tests/test_attention_gpu.py for pytest-xdist's --dist loadgroup; declared here
    # so that runs without xdist do not warn about an unknown mark.
    config.addinivalue_line("markers", "xdist_group(name): run these tests in one xdist worker")


def pytest_report_header(config):
    return (f"flashtile tests: cuda={'yes: ' + torch.cuda.get_device_name() if HAS_CUDA else 'no'}, "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '(unset)')}")


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="gpu test: no CUDA device (torch.cuda.is_available() is False)")
    gpu_interpreted = pytest.mark.skip(reason="gpu test: TRITON_INTERPRET=1 is set; GPU tests need compiled kernels")
    no_interpreter = pytest.mark.skip(
        reason="runs kernels on CPU tensors: needs TRITON_INTERPRET=1 (set it to run the CPU suite)")
    interpreted = pytest.mark.skip(
        reason="needs compiled Triton JIT functions, not the interpreter's: "
               "TRITON_INTERPRET=0 python -m pytest tests/test_aot_compile.py")
    for item in items:
        if "gpu" in item.keywords:
            if not HAS_CUDA:
                item.add_marker(no_gpu)
            elif INTERPRETING:
                item.add_marker(gpu_interpreted)
        if "interpreter" in item.keywords and not INTERPRETING:
            item.add_marker(no_interpreter)
        # The AOT compile test (tests/test_aot_compile.py) inspects and compiles the real
        # triton.jit functions, which do not exist when the interpreter decorated the kernels.
        if ("compiled" in item.keywords or item.path.name == "test_aot_compile.py") and INTERPRETING:
            item.add_marker(interpreted)


# ---------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------

@pytest.fixture
def device():
    """Where kernels run in this session: the GPU unless the interpreter is on."""
    if INTERPRETING:
        return "cpu"
    if HAS_CUDA:
        return "cuda"
    pytest.skip("runs kernels: no CUDA device and TRITON_INTERPRET is not 1")


def make_qkv(B, H, n_q, n_k, D, dtype, device="cpu", layout="contiguous", seed=0, requires_grad=False):
    """q (B, H, n_q, D), k and v (B, H, n_k, D), N(0, 1), in one of these memory layouts:

    - "contiguous": plain (B, H, N, D) tensors.
    - "bnhd": each a `.transpose(1, 2)` view of (B, N, H, D) storage (the layout of a
      fused QKV projection), so the head stride is D and the sequence stride H * D.
    - "sliced": each a view of the first D columns of a (B, H, N, D + 24) tensor, so the
      last dim is not dense and rows are D + 24 apart.
    - "mixed": q bnhd, k sliced, v contiguous.
    The values depend only on the seed and shapes, not on the layout, so results in two
    layouts can be compared directly.
    """
    gen = torch.Generator().manual_seed(seed)
    dense = [torch.randn(B, H, n, D, generator=gen).to(dtype).to(device) for n in (n_q, n_k, n_k)]
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
        wide = torch.full((B, H, N, D + 24), float("nan"), dtype=t.dtype, device=t.device)
        wide[..., :D] = t
        return wide[..., :D]
    raise ValueError(how)


def make_grad_out(B, H, n_q, D, dtype, device="cpu", seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, n_q, D, generator=gen).to(dtype).to(device)


@pytest.fixture
def qkv_factory():
    return make_qkv


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """torch.empty / torch.empty_like hand out NaN-filled floating-point tensors, so an
    output element that a kernel forgets to write stays NaN. (torch.zeros is left alone:
    accumulators that need zeros ask for them.)"""
    real_empty, real_empty_like = torch.empty, torch.empty_like
    calls = []

    def poison(t):
        calls.append(t.shape)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(real_empty_like(*a, **kw)))
    return calls
