"""Shared test setup.

- Without a CUDA device, the kernels can only run on Triton's CPU interpreter, which must be
  switched on (TRITON_INTERPRET=1) before any kernel module is decorated with triton.jit.
  This file is imported by pytest before any test module, so it sets the variable here, at
  import time, when there is no GPU and the variable is not set at all. An explicit
  TRITON_INTERPRET=0 is respected (the ahead-of-time compile sweep needs real JIT functions).
- FLASHTILE_AUTOTUNE=0 for the session unless the caller set it: the tests are about
  numerics, and launching each kernel's first shipped config instead of timing all of them
  keeps a GPU run from an empty Triton cache to one compile per kernel signature.
- `@pytest.mark.gpu` tests are skipped, with the reason printed by `-ra`, when there is no
  CUDA device or when the interpreter is on (they need compiled kernels). A skip is never a
  pass: the summary line counts them as skipped.
- `@pytest.mark.interpreter` tests run kernels on CPU tensors and are skipped, with a
  reason, when the interpreter is off (a GPU machine running without TRITON_INTERPRET=1).
- `@pytest.mark.aot` tests (the ahead-of-time compile sweep) need compiled JIT functions
  and are skipped under the interpreter; plain `pytest` deselects them (pyproject.toml).
- On a GPU, once the session's tests are collected, tests/warm_triton_cache.py compiles the
  parity grid's kernels in background processes (when test_parity's GPU tests are among
  them and pytest-xdist is not in use); FLASHTILE_WARM_CACHE=0 switches it off.
- Inputs come from flashtile.testing's factories; they are re-exported here for the scripts
  that import them from tests/.
"""
import os
import signal
import subprocess
import sys
import tempfile

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
os.environ.setdefault("FLASHTILE_AUTOTUNE", "0")

import pytest  # noqa: E402

from flashtile.testing import make_grad_out, make_qkv, relayout  # noqa: E402,F401

try:
    from hypothesis import settings
except ImportError:  # the property test then skips, naming the extra (tests/test_parity.py)
    settings = None
if settings is not None:
    # CI (CI=true, as .ci/run is run) draws the same property-test examples every time, so
    # a landing is never decided by a lucky or unlucky draw; elsewhere the draws are random
    # (hypothesis prints the seed and the falsifying example on failure).
    settings.register_profile("ci", derandomize=True, print_blob=True)
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        settings.load_profile("ci")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device and compiled kernels; skipped (never passed) "
                                       "without them")
    config.addinivalue_line("markers", "interpreter: runs kernels on CPU tensors; needs TRITON_INTERPRET=1")
    config.addinivalue_line("markers", "aot: the ahead-of-time compile sweep (TRITON_INTERPRET=0, no GPU needed); "
                                       "run with -m aot")
    config.addinivalue_line("markers", "build: extra builds of the CUDA reference (nvcc per target, a "
                                       "-static-libstdc++ build); run with -m build")
    # For pytest-xdist's --dist loadgroup; declared so that runs without xdist do not warn.
    config.addinivalue_line("markers", "xdist_group(name): run these tests in one xdist worker")


def pytest_report_header(config):
    return (f"flashtile tests: cuda={'yes: ' + torch.cuda.get_device_name() if HAS_CUDA else 'no'}, "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '(unset)')}, "
            f"FLASHTILE_AUTOTUNE={os.environ['FLASHTILE_AUTOTUNE']}")


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="gpu test: no CUDA device (torch.cuda.is_available() is False)")
    gpu_interpreted = pytest.mark.skip(reason="gpu test: TRITON_INTERPRET=1 is set; GPU tests need compiled kernels")
    no_interpreter = pytest.mark.skip(
        reason="runs kernels on CPU tensors: needs TRITON_INTERPRET=1 (set it to run the CPU suite)")
    interpreted = pytest.mark.skip(
        reason="needs compiled Triton JIT functions, not the interpreter's: "
               "TRITON_INTERPRET=0 python -m pytest -m aot tests/test_aot_compile.py")
    for item in items:
        if "gpu" in item.keywords:
            if not HAS_CUDA:
                item.add_marker(no_gpu)
            elif INTERPRETING:
                item.add_marker(gpu_interpreted)
        if "interpreter" in item.keywords and not INTERPRETING:
            item.add_marker(no_interpreter)
        if "aot" in item.keywords and INTERPRETING:
            item.add_marker(interpreted)


_warm_cache = None


def pytest_collection_finish(session):
    """Start compiling the parity grid's kernels in the background (warm_triton_cache.py)."""
    global _warm_cache
    if (not HAS_CUDA or INTERPRETING or "PYTEST_XDIST_WORKER" in os.environ
            or os.environ.get("FLASHTILE_WARM_CACHE", "1") == "0"):
        return
    if not any(item.path.name == "test_parity.py" and "gpu" in item.keywords for item in session.items):
        return
    log = os.path.join(tempfile.gettempdir(), "flashtile-warm-triton-cache.log")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "warm_triton_cache.py")
    with open(log, "w") as out:
        # A session of its own, so that its pool of processes can be stopped with it.
        _warm_cache = subprocess.Popen([sys.executable, script], stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"compiling the GPU parity grid's kernels in the background (log: {log})")


def pytest_sessionfinish(session):
    if _warm_cache is not None and _warm_cache.poll() is None:
        os.killpg(_warm_cache.pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------

@pytest.fixture
def device():
    """Where kernels run in this session: the GPU unless the interpreter is on."""
    if INTERPRETING:
        return "cpu"
    if HAS_CUDA:
        return "cuda"
    pytest.skip("runs kernels: no CUDA device and TRITON_INTERPRET is not 1")


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
