"""`python -m flashtile.bench` (or `flashtile-bench`): speed, memory and accuracy of every
implementation beside PyTorch's.

Three measurements, each over a grid of (dtype, head dim D, causal, sequence length N):

- speed: forward and forward+backward latency (ms) and TFLOP/s. Shapes follow the
  FlashAttention papers: 16k tokens a batch (B = 16384 / N) and model dim 2048 (H = 2048 / D).
  FLOPs: forward 4 B H Nq Nk D, halved when causal; forward+backward 3.5x that
  (flashtile.reference.attention_flops). Times are medians of triton.testing.do_bench (CUDA
  events), after a warm-up call (and so after compilation and autotuning).
- memory: the peak memory one forward and one forward+backward call allocates on top of
  q, k, v and dO (torch.cuda.max_memory_allocated around the call), at B = 1 and
  H = 2048 / D, so that FlashAttention's O(N) shows against the naive O(N^2).
- stability: max |error| of O, dQ, dK, dV against float64 (flashtile.reference), for each
  implementation and for PyTorch's own computation in the same precision, at B = 1, H = 4.

Implementations: flashtile's v1, v2, v2_atomic; the CUDA reference ("cuda") when it is built;
PyTorch SDPA restricted to one backend (sdpa_flash, sdpa_cudnn, sdpa_efficient); and
"naive", softmax(scale Q K^T) V in plain PyTorch ops, which materialises the N x N scores.
A point that runs out of memory shows as OOM and the run goes on.

Prints markdown tables; with --out DIR also writes DIR/bench.json (every measurement and the
environment) and PNG plots (flashtile/bench_plots.py).

Without a GPU the command still runs, at tiny sizes, on Triton's CPU interpreter (and the CUDA
reference's host build, if built): its timings are CPU figures that say nothing of GPU speed.

    python -m flashtile.bench                        # the default grid (fp16), tables on stdout
    python -m flashtile.bench --dtypes bf16 --out results/h100/report_bf16
    python -m flashtile.bench --quick --out /tmp/b   # a tiny grid, in seconds
"""
import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from .reference import attention_flops
from .testing import QUANTITIES, run_attention, torch_float64, torch_lowprec

FLASHTILE_IMPLS = ("v1", "v2", "v2_atomic")
SDPA_BACKENDS = ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient")
ALL_IMPLS = FLASHTILE_IMPLS + ("cuda",) + SDPA_BACKENDS + ("naive",)
# The name under which the stability table lists PyTorch's own low-precision computation.
TORCH_SAME_PRECISION = "torch (same precision)"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}

CPU_NOTE = ("NOTE: no CUDA device. These are CPU figures (Triton's interpreter, PyTorch on the host) "
            "at tiny sizes: they check that the benchmark runs and say nothing about GPU speed.")

# Grids: (seqs, head dims) per mode; causal and dtypes default to "0,1" and "fp16" everywhere.
GRIDS = {
    "gpu": dict(seqs="256,512,1024,2048,4096,8192,16384", head_dims="64,128",
                stability_seqs="256,1024,4096"),
    "gpu_quick": dict(seqs="1024,2048", head_dims="64", stability_seqs="256,1024"),
    "cpu": dict(seqs="32,64,128", head_dims="32", stability_seqs="32,64,128"),
    "cpu_quick": dict(seqs="16,32", head_dims="16", stability_seqs="16,32"),
}


# ---------------------------------------------------------------------------------------
# Implementations
# ---------------------------------------------------------------------------------------

def cuda_reference_built() -> bool:
    """True when flashtile.cuda_reference exists in this install and its extension is built."""
    try:
        if importlib.util.find_spec("flashtile.cuda_reference") is None:
            return False
        from . import cuda_reference

        return bool(cuda_reference.is_built())
    except Exception:  # a half-built or broken extension counts as not built
        return False


def default_impls(on_gpu: bool):
    impls = list(FLASHTILE_IMPLS)
    if cuda_reference_built():
        impls.append("cuda")
    # On the CPU the cuDNN and memory-efficient SDPA backends do not exist.
    impls += list(SDPA_BACKENDS) if on_gpu else ["sdpa_flash"]
    return impls + ["naive"]


def naive_attention(q, k, v, causal):
    """softmax(scale q k^T) v in the inputs' dtype, the N x N scores and probabilities stored."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:  # bottom-right aligned, as flashtile and FlashAttention-2
        n_q, n_k = q.shape[-2], k.shape[-2]
        hidden = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).triu(n_k - n_q + 1)
        scores = scores.masked_fill(hidden, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def attention_callable(name, causal):
    """f(q, k, v) -> out for one implementation name."""
    if name in FLASHTILE_IMPLS or name == "cuda":
        import flashtile

        return lambda q, k, v: flashtile.attention(q, k, v, causal=causal, impl=name)
    if name in SDPA_BACKENDS:
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
                   "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION}[name]

        def sdpa(q, k, v):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return sdpa
    if name == "naive":
        return lambda q, k, v: naive_attention(q, k, v, causal)
    raise ValueError(f"unknown implementation {name!r}; known: {', '.join(ALL_IMPLS)}")


def failure(error) -> str:
    """What a table shows for a point that could not run: OOM, or the error's first line."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return "OOM"
    return f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"


def free_memory(device):
    if device == "cuda":
        torch.cuda.empty_cache()


def random_inputs(batch, heads, n, head_dim, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v, d_out = (torch.randn(batch, heads, n, head_dim, device=device, dtype=dtype, generator=gen)
                      for _ in range(4))
    return [t.requires_grad_() for t in (q, k, v)], d_out


# ---------------------------------------------------------------------------------------
# Speed
# ---------------------------------------------------------------------------------------

def time_ms(fn, device, grad_tensors=None, cpu_reps=3):
    """Median milliseconds of fn(): do_bench (CUDA events) on the GPU, perf_counter on the CPU."""
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


def measure_speed(name, batch, heads, n, head_dim, causal, dtype, device, cpu_reps=3):
    """One row: forward and forward+backward latency and TFLOP/s, or the error that stopped it."""
    row = dict(impl=name, B=batch, H=heads, N=n, D=head_dim, causal=causal, dtype=str(dtype).replace("torch.", ""))
    try:
        fn = attention_callable(name, causal)
        (q, k, v), d_out = random_inputs(batch, heads, n, head_dim, dtype, device)
        fn(q, k, v).backward(d_out)  # warm-up: compile and autotune outside the timing
        fwd = time_ms(lambda: fn(q, k, v), device, cpu_reps=cpu_reps)
        fwd_bwd = time_ms(lambda: fn(q, k, v).backward(d_out), device, [q, k, v], cpu_reps=cpu_reps)
    except (RuntimeError, ValueError, TypeError, NotImplementedError, ImportError) as error:
        # OOM, or e.g. an SDPA backend that does not take this shape.
        row["error"] = failure(error)
        return row
    finally:
        q = k = v = d_out = None
        free_memory(device)
    flops = {mode: attention_flops(batch, heads, n, n, head_dim, causal, mode) for mode in ("fwd", "fwd_bwd")}
    row.update(fwd_ms=fwd, fwd_bwd_ms=fwd_bwd,
               fwd_tflops=flops["fwd"] / fwd / 1e9, fwd_bwd_tflops=flops["fwd_bwd"] / fwd_bwd / 1e9)
    return row


# ---------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------

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


def measure_memory(name, batch, heads, n, head_dim, causal, dtype, device):
    """Peak extra MiB of one forward call and of one forward+backward call."""
    row = dict(impl=name, B=batch, H=heads, N=n, D=head_dim, causal=causal, dtype=str(dtype).replace("torch.", ""))
    try:
        fn = attention_callable(name, causal)
        (q, k, v), d_out = random_inputs(batch, heads, n, head_dim, dtype, device)
        fn(q, k, v).backward(d_out)  # compile, autotune and let SDPA pick its kernels first
        q.grad = k.grad = v.grad = None
        free_memory(device)

        def forward():
            with torch.no_grad():
                fn(q, k, v)

        row["fwd_mib"] = peak_extra_mib(forward, device)
        # The gradients are part of what a backward allocates: start from none.
        row["fwd_bwd_mib"] = peak_extra_mib(lambda: fn(q, k, v).backward(d_out), device)
    except (RuntimeError, ValueError, TypeError, NotImplementedError, ImportError) as error:
        row["error"] = failure(error)
    finally:
        q = k = v = d_out = None
        free_memory(device)
    return row


# ---------------------------------------------------------------------------------------
# Stability
# ---------------------------------------------------------------------------------------

def outputs_and_grads(fn, q, k, v, d_out):
    """{"out", "dq", "dk", "dv"} of fn(q, k, v) -> out, on fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, d_out)
    return dict(zip(QUANTITIES, [out.detach()] + [g.detach() for g in grads]))


def measure_stability(names, batch, heads, n, head_dim, causal, dtype, device):
    """Rows of max |x - x_f64| for x in O, dQ, dK, dV: one per implementation, and one for
    PyTorch's own computation in `dtype` (the scale any low-precision kernel is judged on)."""
    base = dict(B=batch, H=heads, N=n, D=head_dim, causal=causal, dtype=str(dtype).replace("torch.", ""))
    (q, k, v), d_out = random_inputs(batch, heads, n, head_dim, dtype, device, seed=1)
    rows = []
    try:
        # The truth of flashtile.testing: float64 leaves, so that the gradients are float64 too.
        truth = run_attention(torch_float64, q.double(), k.double(), v.double(), causal, None, d_out.double())
    except RuntimeError as error:  # the float64 reference itself did not fit
        return [dict(base, impl=name, error=failure(error)) for name in (TORCH_SAME_PRECISION,) + tuple(names)]
    lowprec = lambda q, k, v: torch_lowprec(q, k, v, causal, None)[0]  # noqa: E731
    for name in (TORCH_SAME_PRECISION,) + tuple(names):
        row = dict(base, impl=name)
        try:
            fn = lowprec if name == TORCH_SAME_PRECISION else attention_callable(name, causal)
            got = outputs_and_grads(fn, q, k, v, d_out)
            row.update({key: (got[key].double() - truth[key]).abs().max().item() for key in QUANTITIES})
        except (RuntimeError, ValueError, TypeError, NotImplementedError, ImportError) as error:
            row["error"] = failure(error)
        rows.append(row)
        got = None
        free_memory(device)
    return rows


# ---------------------------------------------------------------------------------------
# Environment and tables
# ---------------------------------------------------------------------------------------

def source_commit(where=os.path.dirname(os.path.abspath(__file__))):
    """The commit of the measured code: FLASHTILE_COMMIT when set, else git's HEAD at `where`,
    with "+changes" appended when tracked files differ from it. The device tool copies the
    working tree beside a .git that can be an older snapshot: the mark shows that HEAD is not
    what ran, and FLASHTILE_COMMIT names what did."""
    commit = os.environ.get("FLASHTILE_COMMIT", "")
    if commit:
        return commit
    git = lambda *args: subprocess.run(["git", *args], capture_output=True, text=True, cwd=where)  # noqa: E731
    try:
        head = git("rev-parse", "HEAD").stdout.strip()
        changed = head and git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except OSError:
        return "unknown"
    return (head + "+changes" if changed else head) or "unknown"


def environment(device):
    import triton

    on_gpu = device == "cuda"
    return dict(device=device,
                gpu=torch.cuda.get_device_name() if on_gpu else "none",
                cpu=platform.processor() or platform.machine(),
                torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version() if on_gpu else None,
                python=platform.python_version(), commit=source_commit(),
                date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                portable=os.environ.get("FLASHTILE_PORTABLE", "0") == "1",
                autotune=os.environ.get("FLASHTILE_AUTOTUNE", "1") != "0",
                interpreter=os.environ.get("TRITON_INTERPRET", "0") == "1",
                cuda_reference_built=cuda_reference_built(),
                note=None if on_gpu else CPU_NOTE)


def grid_table(rows, cell, key_names=("dtype", "D", "causal", "N")):
    """A markdown table: one line per case (key_names), one column per implementation."""
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    cases = list(dict.fromkeys(tuple(r[k] for k in key_names) for r in rows))
    by_key = {(r["impl"],) + tuple(r[k] for k in key_names): r for r in rows}
    lines = ["| " + " | ".join(key_names) + " | " + " | ".join(impls) + " |",
             "|" + "---|" * (len(key_names) + len(impls))]
    for case in cases:
        cells = []
        for impl in impls:
            r = by_key.get((impl,) + case)
            if r is None:
                cells.append("-")
            elif "error" in r:
                cells.append("OOM" if r["error"] == "OOM" else "n.a.")
            else:
                cells.append(cell(r))
        lines.append("| " + " | ".join(str(int(c) if isinstance(c, bool) else c) for c in case) + " | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def number(x):
    """3 significant digits, no exponent above 1: 364, 12.5, 0.0123."""
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def markdown_table(rows):
    """Forward / forward+backward TFLOP/s, one line per (dtype, D, causal, N)."""
    return grid_table(rows, lambda r: f"{number(r['fwd_tflops'])} / {number(r['fwd_bwd_tflops'])}")


def latency_table(rows):
    return grid_table(rows, lambda r: f"{number(r['fwd_ms'])} / {number(r['fwd_bwd_ms'])}")


def memory_table(rows):
    return grid_table(rows, lambda r: f"{number(r['fwd_mib'])} / {number(r['fwd_bwd_mib'])}")


def stability_table(rows):
    """max |error| vs float64 of O, dQ, dK, dV: one line per case and implementation."""
    lines = ["| dtype | D | causal | N | impl | O | dQ | dK | dV |", "|" + "---|" * 9]
    for r in rows:
        cells = (["OOM" if r["error"] == "OOM" else "n.a."] * 4 if "error" in r
                 else [f"{r[key]:.1e}" for key in QUANTITIES])
        name = f"*{r['impl']}*" if r["impl"] == TORCH_SAME_PRECISION else r["impl"]
        lines.append(f"| {r['dtype']} | {r['D']} | {int(r['causal'])} | {r['N']} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def errors_in(rows):
    """The distinct non-OOM errors, so that an n.a. in a table can be looked up."""
    seen = {}
    for r in rows:
        if "error" in r and r["error"] != "OOM":
            seen.setdefault((r["impl"], r["error"]), None)
    return [f"- {impl}: {error}" for impl, error in seen]


# ---------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------

def progress_bar(total, on):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
    if tqdm is None or not on:
        class Plain:  # no tqdm: one line per point
            def __init__(self):
                self.done = 0

            def set_description(self, text):
                self.text = text

            def update(self, k=1):
                self.done += k
                if on:
                    print(f"[{self.done}/{total}] {self.text}", file=sys.stderr, flush=True)

            def close(self):
                pass

        return Plain()
    return tqdm(total=total, file=sys.stderr, mininterval=1.0, dynamic_ncols=True, unit="pt")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="flashtile-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impls", default=None, help=f"comma-separated, from {','.join(ALL_IMPLS)} "
                        "(default: all that can run here)")
    parser.add_argument("--seqs", default=None, help=f"sequence lengths (default {GRIDS['gpu']['seqs']})")
    parser.add_argument("--head-dims", default=None, help="default 64,128")
    parser.add_argument("--causal", default="0,1", help="0, 1 or 0,1")
    parser.add_argument("--dtypes", default="fp16", help="fp16, bf16 or fp16,bf16")
    parser.add_argument("--tokens", type=int, default=16384, help="B * N of the speed grid")
    parser.add_argument("--model-dim", type=int, default=2048, help="H * D of the speed and memory grids")
    parser.add_argument("--stability-seqs", default=None, help="sequence lengths of the stability table "
                        f"(default {GRIDS['gpu']['stability_seqs']}; float64 needs B H N^2 * 8 bytes a matrix)")
    parser.add_argument("--stability-heads", type=int, default=4)
    parser.add_argument("--parts", default="speed,memory,stability", help="which measurements")
    parser.add_argument("--quick", action="store_true", help=f"a tiny grid: N {GRIDS['gpu_quick']['seqs']}, D 64")
    parser.add_argument("--out", default=None, help="directory for bench.json and the PNG plots")
    parser.add_argument("--no-plots", action="store_true", help="with --out: JSON only")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--from-json", default=None, metavar="BENCH_JSON",
                        help="measure nothing: print the tables of a bench.json (and with --out, plot it)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.from_json:
        results, env = load_json(args.from_json)
        finish(results, env, args.out, plots=bool(args.out) and not args.no_plots)
        return results["speed"]
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        # The kernels must be decorated by the interpreter: before any kernel module is imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        print(CPU_NOTE, file=sys.stderr, flush=True)
    device = "cuda" if on_gpu else "cpu"
    grid = GRIDS[("gpu" if on_gpu else "cpu") + ("_quick" if args.quick else "")]
    seqs = [int(x) for x in (args.seqs or grid["seqs"]).split(",")]
    head_dims = [int(x) for x in (args.head_dims or grid["head_dims"]).split(",")]
    stability_seqs = [int(x) for x in (args.stability_seqs or grid["stability_seqs"]).split(",")]
    causals = [bool(int(x)) for x in args.causal.split(",")]
    dtypes = [DTYPES[x] for x in args.dtypes.split(",")]
    impls = args.impls.split(",") if args.impls else default_impls(on_gpu)
    for name in impls:
        if name not in ALL_IMPLS:
            sys.exit(f"unknown implementation {name!r}; known: {', '.join(ALL_IMPLS)}")
    parts = args.parts.split(",")
    cpu_reps = 1 if args.quick else 3

    def speed_shape(n, head_dim):
        if not on_gpu:
            return 1, 2
        return max(1, args.tokens // n), args.model_dim // head_dim

    def memory_shape(n, head_dim):
        return (1, 2) if not on_gpu else (1, args.model_dim // head_dim)

    cases = [(dt, d, c) for dt in dtypes for d in head_dims for c in causals]
    plan = []  # (part, dtype, D, causal, N, impl or None)
    if "speed" in parts:
        plan += [("speed", dt, d, c, n, name) for dt, d, c in cases for n in seqs for name in impls]
    if "memory" in parts:
        plan += [("memory", dt, d, c, n, name) for dt, d, c in cases for n in seqs for name in impls]
    if "stability" in parts:
        plan += [("stability", dt, d, c, n, None) for dt, d, c in cases for n in stability_seqs]
    env = environment(device)
    settings = dict(vars(args), seqs=seqs, head_dims=head_dims, stability_seqs=stability_seqs, impls=impls,
                    command=" ".join(["python -m flashtile.bench"] + list(sys.argv[1:] if argv is None else argv)))
    results = dict(speed=[], memory=[], stability=[])
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    bar = progress_bar(len(plan), not args.no_progress)
    for part, dtype, head_dim, causal, n, name in plan:
        bar.set_description(f"{part} {str(dtype)[6:]} D={head_dim} causal={int(causal)} N={n} {name or ''}")
        if part == "speed":
            results["speed"].append(measure_speed(name, *speed_shape(n, head_dim), n, head_dim, causal, dtype,
                                                  device, cpu_reps))
        elif part == "memory":
            results["memory"].append(measure_memory(name, *memory_shape(n, head_dim), n, head_dim, causal, dtype,
                                                    device))
        else:
            heads = args.stability_heads if on_gpu else 2
            results["stability"] += measure_stability(impls, 1, heads, n, head_dim, causal, dtype, device)
        bar.update(1)
        if args.out:  # after every point, so that an interrupted run keeps what it measured
            save_json(args.out, env, settings, results)
    bar.close()
    finish(results, env, args.out, plots=not args.no_plots)
    return results["speed"]


def save_json(out_dir, env, settings, results):
    path = os.path.join(out_dir, "bench.json")
    with open(path + ".tmp", "w") as f:
        json.dump(dict(environment=env, settings=settings, rows=results["speed"], memory=results["memory"],
                       stability=results["stability"]), f, indent=1)
    os.replace(path + ".tmp", path)


def load_json(path):
    """(results, environment) of a bench.json, as main() keeps them."""
    with open(path) as f:
        data = json.load(f)
    results = dict(speed=data.get("rows", []), memory=data.get("memory", []), stability=data.get("stability", []))
    return results, data["environment"]


def finish(results, env, out_dir, plots=True):
    """Print the markdown report; with out_dir, write the plots beside bench.json."""
    print(report_markdown(results, env))
    if env["device"] != "cuda":
        print("\n" + CPU_NOTE)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        written = ["bench.json"] if os.path.exists(os.path.join(out_dir, "bench.json")) else []
        if plots:
            from .bench_plots import write_plots

            written += write_plots(results, env, out_dir)
        print(f"\nwrote {', '.join(written)} under {out_dir}")


def report_markdown(results, env):
    on_gpu = env["device"] == "cuda"
    where = env["gpu"] if on_gpu else f"CPU ({env['cpu']}), Triton interpreter"
    head, plus, changes = env["commit"].partition("+")
    short_commit = head[:10] + plus + changes  # the hash shortened, a "+changes" mark kept
    lines = [f"## flashtile.bench on {where}",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, commit {short_commit}, "
             f"{env['date']}"]
    if on_gpu and env.get("note"):  # e.g. rows merged from a later run (the CPU note is printed apart)
        lines.append(env["note"])
    speed, memory, stability = results["speed"], results["memory"], results["stability"]
    if speed:
        r = speed[0]
        batches = {x["B"] * x["N"] for x in speed}
        shape = (f"B = {r['B'] * r['N']} / N, H = {r['H'] * r['D']} / D" if len(batches) == 1
                 else f"B = {r['B']}, H = {r['H']}")
        lines += ["", f"### Forward / forward+backward TFLOP/s ({shape})", "", markdown_table(speed),
                  "", "### Forward / forward+backward latency, ms", "", latency_table(speed)]
    if memory:
        r = memory[0]
        lines += ["", "### Peak memory beyond q, k, v, dO: forward (no grad) / forward+backward, MiB "
                  f"(B = {r['B']}, H = {r['H'] * r['D']} / D)", "", memory_table(memory)]
    if stability:
        lines += ["", "### max |error| vs float64 of O, dQ, dK, dV "
                  f"(B = 1, H = {stability[0]['H']}; *{TORCH_SAME_PRECISION}* is PyTorch's own computation "
                  "in that dtype)", "", stability_table(stability)]
    notes = errors_in(speed + memory + stability)
    if notes:
        lines += ["", "n.a. means:"] + notes
    return "\n".join(lines)


if __name__ == "__main__":
    main()
