"""asv benchmarks of flashtile's attention kernels, one commit at a time.

This suite (the current tree's) runs against whichever flashtile is installed, down to the
first kernel commit (ec27a67), so it only uses what every commit has: the autograd
Functions `flashtile.triton_kernels.{v1,v2,v2_atomic}` with `.apply(q, k, v, causal, scale)
-> (out, lse)`, and `flashtile.attention(..., impl="cuda")` where `flashtile.cuda_reference`
exists and is built. An implementation the installed commit lacks is skipped
(NotImplementedError in setup); so is a point that runs out of memory.

- `Metrics.track_*`: one `setup_cache` per commit measures the whole grid in one process, in
  order: forward and forward+backward TFLOP/s from CUDA-event timings (triton.testing.do_bench
  medians, after a warm-up call that compiles and autotunes), the peak memory of one
  forward+backward beyond its inputs (torch.cuda.max_memory_allocated), and the max |error| of
  O, dQ, dK, dV against float64 (at B = 1, H = 2). The track_* benchmarks read that cache.
- `Timing.time_*`: asv's own wall-clock timing (each call ends with torch.cuda.synchronize)
  of forward and forward+backward, for the kernels that change from commit to commit, at
  the largest N and D of the grid.

The grid (fp16; B = 16384 / N, H = 2048 / D as in `python -m flashtile.bench`) is kept small
so that a commit records in a few minutes on an H100. Autotuning is on, as users run it, and
its choices are kept on disk (TRITON_CACHE_AUTOTUNING=1, set here unless the environment says
otherwise): a commit autotunes each shape once, in setup_cache, and the processes of the
Timing benchmarks reuse the choice instead of tuning again.

Without a CUDA device the suite runs by itself a tiny grid on the CPU, the Triton kernels
on the interpreter (CPU timings, no memory figures): a plumbing check that completes in a
few minutes; the first parameter's name says so in asv's tables.

Implementation names come from flashtile.registry where the installed commit has it (called
through `flashtile.attention(..., impl=name)`), else from the list every older commit had.
"""
import importlib
import importlib.util
import os
import sys
import time

# torch is imported here so that asv's forkserver imports it once; nothing here initialises
# CUDA (a CUDA context made before the fork would break every forked benchmark): the
# device count comes from NVML.
import torch  # noqa: E402


def _cuda_device_visible():
    previous = os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK")
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    try:
        return torch.cuda.is_available()
    finally:
        if previous is None:
            del os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"]
        else:
            os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = previous


TINY = not _cuda_device_visible()
# Before flashtile is imported: Triton's Autotuner reads it when a kernel is decorated.
os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")
if TINY:
    # Before flashtile is imported: the kernels are decorated for the interpreter then.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    print("flashtile asv: no CUDA device, running the tiny CPU grid (Triton on its interpreter)",
          file=sys.stderr)

if TINY:
    SEQS, HEAD_DIMS, TOKENS, MODEL_DIM = [32, 64], [16], 64, 32
else:
    SEQS, HEAD_DIMS, TOKENS, MODEL_DIM = [2048, 8192], [64, 128], 16384, 2048
CAUSAL = [False, True]
DTYPE = torch.float16
ERROR_HEADS = 2
# Before the registry: the autograd Functions of the Triton implementations, with the
# signature .apply(q, k, v, causal, scale) -> (out, lse).
OLD_FUNCTIONS = {"v1": "FlashAttentionV1Function", "v2": "FlashAttentionV2Function",
                 "v2_atomic": "FlashAttentionV2AtomicFunction"}


def device():
    return "cpu" if TINY else "cuda"


def shape(n, d):
    """(B, H) of the grid point: 16k tokens a batch, model dim 2048."""
    return max(1, TOKENS // n), MODEL_DIM // d


def naive_attention(q, k, v, causal):
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:  # bottom-right aligned (Nq = Nk here, so the usual lower triangle)
        n_q, n_k = q.shape[-2], k.shape[-2]
        hidden = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).triu(n_k - n_q + 1)
        scores = scores.masked_fill(hidden, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def installed_module(name):
    """True if module `name` (flashtile.x) lies in the installed flashtile package itself.

    find_spec alone is not enough: an editable install of another checkout on the same
    Python answers for flashtile.* modules that the installed commit does not have."""
    import flashtile

    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        return False
    package_dir = os.path.dirname(os.path.abspath(flashtile.__file__))
    return os.path.abspath(spec.origin).startswith(package_dir + os.sep)


# The flashtile implementations of the commit under test: the registry's names where it has
# one, else the names every commit before it had (asv runs this suite on old commits).
HAS_REGISTRY = installed_module("flashtile.registry")
if HAS_REGISTRY:
    from flashtile.registry import IMPLEMENTATIONS as FLASHTILE_IMPLS
    from flashtile.registry import TRITON_IMPLEMENTATIONS
else:
    FLASHTILE_IMPLS = ("v1", "v2", "v2_atomic", "cuda")
    TRITON_IMPLEMENTATIONS = ("v1", "v2", "v2_atomic")
IMPLS = list(FLASHTILE_IMPLS) + ["sdpa_flash", "naive"]
TIMED_IMPLS = list(FLASHTILE_IMPLS)


def attention_function(impl, causal):
    """f(q, k, v) -> out; NotImplementedError when the installed flashtile lacks `impl`."""
    if impl in FLASHTILE_IMPLS and HAS_REGISTRY:
        import flashtile
        from flashtile import registry

        if not registry.REGISTRY[impl].triton:  # the CUDA reference's extension
            _require_built_extension(impl)
        return lambda q, k, v: flashtile.attention(q, k, v, causal=causal, impl=impl)
    if impl in OLD_FUNCTIONS:
        try:
            module = importlib.import_module(f"flashtile.triton_kernels.{impl}")
        except ImportError as error:
            raise NotImplementedError(f"this commit has no flashtile.triton_kernels.{impl} ({error})")
        function = getattr(module, OLD_FUNCTIONS[impl])
        return lambda q, k, v: function.apply(q, k, v, causal, q.shape[-1] ** -0.5)[0]
    if impl == "cuda":
        if not installed_module("flashtile.cuda_reference"):
            raise NotImplementedError("this commit has no flashtile.cuda_reference")
        _require_built_extension(impl)
        import flashtile

        return lambda q, k, v: flashtile.attention(q, k, v, causal=causal, impl="cuda")
    if impl == "sdpa_flash":
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdpa(q, k, v):
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return sdpa
    if impl == "naive":
        return lambda q, k, v: naive_attention(q, k, v, causal)
    raise ValueError(impl)


def _require_built_extension(impl):
    """NotImplementedError when the CUDA reference cannot be used in this install: not built
    (older commits), or the host build while the suite runs on a GPU."""
    from flashtile import cuda_reference

    if not cuda_reference.is_built():
        raise NotImplementedError(f"impl={impl!r}: flashtile.cuda_reference is not built in this install")
    if device() == "cuda" and not cuda_reference.built_with_cuda():
        raise NotImplementedError(f"impl={impl!r}: the CUDA reference was built without CUDA (host build)")


def inputs(batch, heads, n, d, where, seed=0):
    gen = torch.Generator(device=where).manual_seed(seed)
    q, k, v, d_out = (torch.randn(batch, heads, n, d, device=where, dtype=DTYPE, generator=gen) for _ in range(4))
    return [t.requires_grad_() for t in (q, k, v)], d_out


def forward_backward(fn, q, k, v, d_out):
    """Gradients by torch.autograd.grad: nothing accumulates into .grad between calls."""
    return torch.autograd.grad(fn(q, k, v), (q, k, v), d_out)


def median_ms(fn, where):
    if where == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=10, rep=60, return_mode="median")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[1]


def max_error(fn, n, d, causal, where, truth_cache):
    """max over O, dQ, dK, dV of max |x - x_float64|, at B = 1, H = ERROR_HEADS."""
    (q, k, v), d_out = inputs(1, ERROR_HEADS, n, d, where, seed=1)
    key = (n, d, causal)
    if key not in truth_cache:
        leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        out = naive_attention(*leaves, causal)
        truth_cache.clear()  # one float64 problem in memory at a time
        truth_cache[key] = [out.detach()] + list(torch.autograd.grad(out, leaves, d_out.double()))
    out = fn(q, k, v)
    got = [out.detach()] + list(torch.autograd.grad(out, (q, k, v), d_out))
    return max((x.double() - t).abs().max().item() for x, t in zip(got, truth_cache[key]))


def measure(impl, n, d, causal, where, truth_cache):
    """The Metrics entry of one grid point: numbers, or {"skip": why}."""
    try:
        fn = attention_function(impl, causal)
    except NotImplementedError as error:
        return {"skip": str(error)}
    batch, heads = shape(n, d)
    flops = 4.0 * batch * heads * n * n * d * (0.5 if causal else 1.0)
    entry = {}
    try:
        (q, k, v), d_out = inputs(batch, heads, n, d, where)
        forward_backward(fn, q, k, v, d_out)  # compile and autotune outside the timing
        fwd = median_ms(lambda: fn(q, k, v), where)
        fwd_bwd = median_ms(lambda: forward_backward(fn, q, k, v, d_out), where)
        entry.update(fwd_tflops=flops / fwd / 1e9, fwd_bwd_tflops=3.5 * flops / fwd_bwd / 1e9)
        if where == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            forward_backward(fn, q, k, v, d_out)
            torch.cuda.synchronize()
            entry["peak_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
        q = k = v = d_out = None
        entry["max_error"] = max_error(fn, n, d, causal, where, truth_cache)
    except torch.cuda.OutOfMemoryError:
        entry = {"skip": "out of memory"}
    finally:
        q = k = v = d_out = None
        if where == "cuda":
            torch.cuda.empty_cache()
    return entry


PARAMS = [IMPLS, SEQS, HEAD_DIMS, CAUSAL]
# On the CPU the first parameter's name says, in every table asv prints, what ran.
PARAM_NAMES = ["impl (no CUDA: tiny CPU grid)" if TINY else "impl", "N", "D", "causal"]


class Metrics:
    """TFLOP/s (CUDA events), peak memory and max error, measured once per commit."""
    params = PARAMS
    param_names = PARAM_NAMES
    timeout = 1800

    def setup_cache(self):
        where = device()
        truth_cache = {}
        results = {}
        # Shapes outermost, so that one float64 reference serves every implementation.
        for n in SEQS:
            for d in HEAD_DIMS:
                for causal in CAUSAL:
                    for impl in IMPLS:
                        results[(impl, n, d, causal)] = measure(impl, n, d, causal, where, truth_cache)
        return results

    setup_cache.timeout = 1800

    def setup(self, cache, impl, n, d, causal):
        entry = cache[(impl, n, d, causal)]
        if "skip" in entry:
            raise NotImplementedError(entry["skip"])

    def track_fwd_tflops(self, cache, impl, n, d, causal):
        return cache[(impl, n, d, causal)]["fwd_tflops"]

    def track_fwd_bwd_tflops(self, cache, impl, n, d, causal):
        return cache[(impl, n, d, causal)]["fwd_bwd_tflops"]

    def track_peak_memory(self, cache, impl, n, d, causal):
        return cache[(impl, n, d, causal)]["peak_mib"]

    def track_max_error(self, cache, impl, n, d, causal):
        return cache[(impl, n, d, causal)]["max_error"]


def _requires(key):
    """A benchmark-level setup (asv runs it after the class's): skip where `key` was not
    measured (peak memory on the CPU)."""
    def setup(cache, impl, n, d, causal):
        if key not in cache[(impl, n, d, causal)]:
            raise NotImplementedError(f"{key} is not measured on {device()}")
    return setup


for _name, _key, _unit in (("track_fwd_tflops", "fwd_tflops", "TFLOP/s"),
                           ("track_fwd_bwd_tflops", "fwd_bwd_tflops", "TFLOP/s"),
                           ("track_peak_memory", "peak_mib", "MiB"),
                           ("track_max_error", "max_error", "max |x - x_f64|")):
    getattr(Metrics, _name).unit = _unit
    getattr(Metrics, _name).setup = _requires(_key)


class Timing:
    """asv's wall-clock timing of one forward and one forward+backward call (synchronised)."""
    params = [TIMED_IMPLS, SEQS[-1:], HEAD_DIMS[-1:], CAUSAL]
    param_names = PARAM_NAMES
    number = 0  # asv picks it: calls per sample so that a sample lasts sample_time
    sample_time = 0.05
    repeat = (3, 10, 2.0)
    warmup_time = 0.2
    rounds = 1
    timeout = 600
    if TINY:  # the interpreter takes about a second a call: fewer samples
        repeat = (1, 3, 1.0)
        warmup_time = 0

    def setup(self, impl, n, d, causal):
        self.where = device()
        self.fn = attention_function(impl, causal)
        try:
            (self.q, self.k, self.v), self.d_out = inputs(*shape(n, d), n, d, self.where)
            forward_backward(self.fn, self.q, self.k, self.v, self.d_out)  # compile, autotune (disk-cached)
        except torch.cuda.OutOfMemoryError:
            raise NotImplementedError("out of memory")
        self.sync()

    def sync(self):
        if self.where == "cuda":
            torch.cuda.synchronize()

    def time_forward(self, impl, n, d, causal):
        self.fn(self.q, self.k, self.v)
        self.sync()

    def time_forward_backward(self, impl, n, d, causal):
        forward_backward(self.fn, self.q, self.k, self.v, self.d_out)
        self.sync()


def precompile(jobs=8):
    """Compile every Triton kernel the suite launches, in `jobs` processes at once, so that
    the serial setup_cache mostly times (it finds the binaries in Triton's cache).

    Run by scripts/asv_record.sh before each commit's `asv run`; its autotuning choices are
    thrown away (TRITON_CACHE_AUTOTUNING=0 in the workers: they time configs side by side)."""
    import concurrent.futures
    import multiprocessing

    tasks = [(impl, d, causal) for impl in TRITON_IMPLEMENTATIONS for d in HEAD_DIMS for causal in CAUSAL]
    os.environ["TRITON_CACHE_AUTOTUNING"] = "0"  # inherited by the spawned workers
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        for task, outcome in zip(tasks, pool.map(_compile_one, tasks)):
            print("precompile", *task, outcome, flush=True)


def _compile_one(task):
    impl, d, causal = task
    try:
        fn = attention_function(impl, causal)
    except NotImplementedError as error:
        return f"skipped: {error}"
    start = time.time()
    (q, k, v), d_out = inputs(1, 2, SEQS[0], d, device())
    forward_backward(fn, q, k, v, d_out)
    return f"{time.time() - start:.1f} s"
