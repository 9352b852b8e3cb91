"""Eager call overhead of the torch.library operator (flashtile/ops.py) beside the autograd
Function it wraps, at shapes small enough that the kernels cost little next to the dispatch:
the measurement behind flashtile.attention calling the Function, not the operator, in eager mode.

    python scripts/dispatch_overhead.py   # on the GPU: every implementation; on the CPU: those
                                          # that run there compiled (the CUDA reference's host build)
    python scripts/dispatch_overhead.py --impl v2 --profile   # and where v2's host time goes
    python scripts/dispatch_overhead.py --impl v2 --shape 16,8,1024,256   # and at this (B, H, N, D)

Rows: `function` is REGISTRY[impl].load().apply, `op` is flashtile.ops.attention_forward (the
operator with its autograd, which torch.compile calls), `attention` is flashtile.attention (the
checks, then in eager mode the Function). Microseconds per call, forward alone and forward + backward:
the wall time of many calls back to back, then one synchronize. Not the benchmark's timer
(do_bench), which clears the L2 cache before each call and so hides the host time under that
clearing: here the host time is the thing measured. At a shape whose kernels take longer than
the host, that wall time is the GPU's; the `enqueue` columns are then the host's alone: the
same loop timed up to its last launch, before the synchronize (exact while the GPU's launch
queue has room for every kernel of the loop).
"""
import argparse
import math
import time

import torch

import flashtile
from flashtile import ops
from flashtile.bench.measure import synchronize
from flashtile.registry import IMPLEMENTATIONS, REGISTRY

SHAPES = ((1, 1, 1, 16), (1, 1, 16, 64), (2, 8, 128, 64))
CALLS = 200


ROUNDS = 5


def microseconds_per_call(fn, device, grad_tensors=(), calls=CALLS, enqueue=False):
    """The best of ROUNDS rounds of `calls` calls (the least disturbed by the rest of the machine);
    with `enqueue`, each round timed up to its last launch, not its last kernel."""
    fn()  # compile, autotune
    rounds = []
    for _ in range(ROUNDS):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
            for t in grad_tensors:
                t.grad = None
        if not enqueue:
            synchronize(device)
        rounds.append((time.perf_counter() - start) / calls * 1e6)
    return min(rounds)


def paths(impl, n, head_dim):
    function, scale = REGISTRY[impl].load(), 1.0 / math.sqrt(head_dim)
    return {
        "function": lambda q, k, v: function.apply(q, k, v, None, None, n, n, scale, -1, 0, 0.0)[0],
        "op": lambda q, k, v: ops.attention_forward(q, k, v, None, None, n, n, scale, -1, 0, 0.0, impl)[0],
        "attention": lambda q, k, v: flashtile.attention(q, k, v, causal=True, impl=impl),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impl", action="append", choices=IMPLEMENTATIONS,
                        help="default: all on the GPU, the non-Triton ones on the CPU")
    parser.add_argument("--profile", action="store_true",
                        help="then where the host time of flashtile.attention goes: cProfile of its forward+backward "
                        f"at {SHAPES[1]}, for the first implementation")
    parser.add_argument("--shape", action="append", default=[], metavar="B,H,N,D",
                        help="a shape to measure after the small ones (repeatable)")
    args = parser.parse_args()
    shapes = SHAPES + tuple(tuple(int(x) for x in shape.split(",")) for shape in args.shape)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    impls = args.impl or [name for name, entry in REGISTRY.items() if device == "cuda" or not entry.triton]
    print(f"{'impl':10} {'shape':18} {'path':10} {'forward us':>11} {'fwd+bwd us':>11} {'fwd enq':>8} {'f+b enq':>8}")
    for impl in impls:
        dtype = torch.float16 if device == "cuda" else torch.float32
        for shape in shapes:
            q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
            d_out = torch.randn_like(q)
            for name, fn in paths(impl, shape[2], shape[3]).items():
                with torch.no_grad():
                    forward = microseconds_per_call(lambda: fn(q, k, v), device)
                    forward_host = microseconds_per_call(lambda: fn(q, k, v), device, enqueue=True)
                both = microseconds_per_call(lambda: fn(q, k, v).backward(d_out), device, (q, k, v))
                both_host = microseconds_per_call(lambda: fn(q, k, v).backward(d_out), device, (q, k, v), enqueue=True)
                print(f"{impl:10} {str(shape):18} {name:10} {forward:11.1f} {both:11.1f} {forward_host:8.1f} "
                      f"{both_host:8.1f}")
    if args.profile:
        profile_host_time(impls[0], device)


def profile_host_time(impl, device, dtype=None, shape=SHAPES[1], calls=CALLS):
    """cProfile's view of `calls` forward+backward calls of flashtile.attention at `shape` (the
    profiler itself slows Python-heavy code, so read it for proportions, not for microseconds)."""
    import cProfile
    import pstats

    dtype = dtype or (torch.float16 if device == "cuda" else torch.float32)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    d_out = torch.randn_like(q)

    def step():
        flashtile.attention(q, k, v, causal=True, impl=impl).backward(d_out)

    step()
    synchronize(device)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        step()
    synchronize(device)
    profiler.disable()
    print(f"\n{impl}: cProfile of {calls} forward+backward calls of flashtile.attention at {shape}")
    for order in ("tottime", "cumulative"):
        pstats.Stats(profiler).sort_stats(order).print_stats(25)


if __name__ == "__main__":
    main()
