"""How the benchmark measures, in one place: the timer, the first-call clock, the peak-memory
probe, the inputs, the FLOP count of a workload, and the rule that a point which cannot run
becomes a recorded failure instead of stopping the run.

- Time: the median of triton.testing.do_bench (CUDA events) on the GPU, of a few
  time.perf_counter calls on the CPU. Steady state: measured after a warm-up call, and so after
  compilation and autotuning; that warm-up call is itself timed as the first-call cost. On the
  GPU each figure is the lower of GPU_ROUNDS medians, and the row keeps them all (`_rounds`).
- FLOPs: flashtile.reference.attention_flops only (forward 4 B H Nq Nk D over the visible
  keys; forward+backward 3.5x that).
- Memory: torch.cuda.max_memory_allocated around the call on the GPU; on the CPU, the tensor
  storage PyTorch ops allocate (HostTensorMemory).
"""
import statistics
import time

import torch

from ..reference import attention_flops


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def free_memory(device):
    if device == "cuda":
        torch.cuda.empty_cache()


def time_ms(fn, device, grad_tensors=None, cpu_reps=3):
    """Median milliseconds of fn(): do_bench (CUDA events) on the GPU, perf_counter on the CPU.
    grad_tensors have their .grad cleared between calls (a backward would accumulate)."""
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median", grad_to_none=grad_tensors)
    times = []
    for _ in range(cpu_reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
        for t in grad_tensors or ():
            t.grad = None
    return statistics.median(times)


def wall_ms(fn, device):
    """Milliseconds of one call of fn(), synchronised: what a first call costs, compilation and
    autotuning included (less any kernel Triton's on-disk cache already holds)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3


def keep_busy(fn, device, seconds=0.5):
    """On a GPU, call fn() until `seconds` have passed, then synchronise. After the seconds a
    first call spends compiling, with the GPU idle, the first timing that followed ran slow
    (v2 at N 1024 up to 2x below a later round: docs/results.md, "v2's forward in Gluon").
    Nothing on the CPU."""
    if device != "cuda":
        return
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
    synchronize(device)


def gradient_like(out, d_out):
    """d_out's values in out's memory layout: the gradient an upstream op hands back usually
    has the layout of what it was given (a packed (total, H, D) output gets a packed gradient),
    and a contender must not be timed copying a gradient that came in another layout."""
    if out.stride() == d_out.stride():
        return d_out
    return torch.empty_strided(out.shape, out.stride(), dtype=d_out.dtype, device=d_out.device).copy_(d_out)


def failure(error) -> str:
    """What a table shows for a point that could not run: OOM, or the error's first line."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return "OOM"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:160] if text else ''}"


def random_inputs(batch, heads_q, n_q, head_dim, dtype, device, heads_kv=None, n_k=None, seed=0):
    """((q, k, v), d_out): q (B, Hq, Nq, D), k and v (B, Hkv, Nk, D) leaves that require grad,
    d_out like q; standard normal, seeded."""
    heads_kv, n_k = heads_kv or heads_q, n_k or n_q
    gen = torch.Generator(device=device).manual_seed(seed)
    shapes = [(batch, heads_q, n_q, head_dim)] + [(batch, heads_kv, n_k, head_dim)] * 2
    q, k, v = (torch.randn(s, device=device, dtype=dtype, generator=gen).requires_grad_() for s in shapes)
    return (q, k, v), torch.randn(shapes[0], device=device, dtype=dtype, generator=gen)


def workload_flops(batch, heads_q, n_q, n_k, head_dim, causal=False, window_size=(-1, -1)):
    """{"fwd", "fwd_bwd"} FLOPs of one attention call (attention_flops; GQA counts query heads)."""
    return {mode: attention_flops(batch, heads_q, n_q, n_k, head_dim, causal, mode, window_size)
            for mode in ("fwd", "fwd_bwd")}


def packed_flops(lengths, heads, head_dim, causal=False):
    """{"fwd", "fwd_bwd"} FLOPs of a packed batch: the sum over its sequences (real tokens only)."""
    per_sequence = [workload_flops(1, heads, n, n, head_dim, causal) for n in lengths]
    return {mode: sum(f[mode] for f in per_sequence) for mode in ("fwd", "fwd_bwd")}


def tflops(flops, ms):
    return flops / ms / 1e9


# Medians taken of each GPU figure, the lowest kept, all recorded. Points that follow a long
# first call (seconds of compiling with the GPU idle) have timed slow even after `keep_busy`:
# on an H200, v2's forward at D 256, causal, N 1024 took 0.373 ms after a 14 s first call, where
# an A/B of the same kernel took 0.177 ms (docs/results.md, "The ping-pong forward"). Whether a
# second round is faster is what the recorded rounds show.
GPU_ROUNDS = 2


def settled_ms(fn, device, grad_tensors=None, cpu_reps=3):
    """(the lowest of GPU_ROUNDS medians of `time_ms`, all of them); on the CPU one median."""
    rounds = [time_ms(fn, device, grad_tensors, cpu_reps) for _ in range(GPU_ROUNDS if device == "cuda" else 1)]
    return min(rounds), rounds


def measure_speed(fn, inputs, d_out, device, flops, cpu_reps=3):
    """Forward and forward+backward of fn(*inputs) -> out: latency (ms), TFLOP/s, and the first
    call's cost (forward+backward, compilation and autotuning included). The backward is
    given d_out's values in the layout of fn's output (`gradient_like`).

    Returns the measured keys: first_call_ms, fwd_ms, fwd_tflops, fwd_bwd_ms, fwd_bwd_tflops,
    and fwd_ms_rounds, fwd_bwd_ms_rounds (every round's median, `settled_ms`); a part that
    failed gives fwd_error / fwd_bwd_error instead (e.g. a backend with no backward here).
    Never raises for a failing implementation."""
    row = {}
    try:
        row["first_call_ms"] = wall_ms(lambda: fn(*inputs).backward(d_out), device)
        d_out = gradient_like(fn(*inputs), d_out)
        keep_busy(lambda: fn(*inputs).backward(d_out), device)
    except Exception as error:  # noqa: BLE001 - any failure of the measured code is a result
        row["fwd_bwd_error"] = failure(error)
    for t in inputs:
        t.grad = None
    try:
        row["fwd_ms"], row["fwd_ms_rounds"] = settled_ms(lambda: fn(*inputs), device, cpu_reps=cpu_reps)
        row["fwd_tflops"] = tflops(flops["fwd"], row["fwd_ms"])
    except Exception as error:  # noqa: BLE001
        row["fwd_error"] = failure(error)
    if "fwd_bwd_error" not in row:
        try:
            row["fwd_bwd_ms"], row["fwd_bwd_ms_rounds"] = settled_ms(lambda: fn(*inputs).backward(d_out), device,
                                                                     list(inputs), cpu_reps)
            row["fwd_bwd_tflops"] = tflops(flops["fwd_bwd"], row["fwd_bwd_ms"])
        except Exception as error:  # noqa: BLE001
            row["fwd_bwd_error"] = failure(error)
    if "fwd_error" in row and "fwd_bwd_error" in row:
        row["error"] = row["fwd_error"]  # nothing measured: the point is a failure as a whole
    free_memory(device)
    return row


class HostTensorMemory:
    """Peak bytes of tensor storage that PyTorch ops allocate while active, on the CPU.

    The CPU allocator keeps no statistics, so this watches every op through a
    TorchDispatchMode: a new output storage counts from the op that made it until it is
    freed (checked at every later op). It counts what torch.cuda.max_memory_allocated
    counts on the GPU, at op granularity."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker.record(out)
                return out

        self.mode, self.live, self.current, self.peak = Mode(), {}, 0, 0

    def record(self, out):
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._pytree import tree_flatten

        for key in [key for key, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                if storage.nbytes() and storage.data_ptr() not in self.live:
                    self.live[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def peak_extra_mib(fn, device):
    """MiB that fn() allocates at its peak beyond what was allocated before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    with HostTensorMemory() as tracker:
        fn()
    return tracker.peak / 2**20
