"""Small workloads, where the call is bound by the host: v2's forward+backward with dQ on the
side stream (as shipped) against one stream (`fork_stream` patched to None), and Flex, by the
benchmark's timer (do_bench medians, grads cleared), interleaved rounds; plus the host time of
one call (perf_counter around the call, no synchronize inside the loop).

Usage: python3 side_stream_small_ab.py REPO_DIR [ROUNDS], REPO_DIR a tree before `ac1c56a` (which
removed the side stream)."""
import json
import statistics
import sys
import time

sys.path.insert(0, sys.argv[1])
import torch  # noqa: E402

from flashtile.bench.cli import GRIDS  # noqa: E402
from flashtile.bench.features import FeatureSizes, varlen_contenders, varlen_inputs  # noqa: E402
from flashtile.bench.impls import attention_fn  # noqa: E402
from flashtile.bench.measure import gradient_like, random_inputs, time_ms  # noqa: E402
from flashtile.triton_kernels import v2 as v2_module  # noqa: E402

ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 4
SHIPPED = v2_module.fork_stream


def host_ms(fn, inputs, grad, calls=50):
    """Mean host milliseconds of one forward+backward call, the GPU left to run behind."""
    torch.cuda.synchronize()
    total = 0.0
    for _ in range(calls):
        for t in inputs:
            t.grad = None
        start = time.perf_counter()
        fn(*inputs).backward(grad)
        total += time.perf_counter() - start
    torch.cuda.synchronize()
    return total / calls * 1e3


def points():
    base = GRIDS["gpu"]["features"]
    for n, width in ((1024, 256), (16384, 256), (16384, 4096)):
        inputs, d_out = random_inputs(16384 // n, 16, n, 128, torch.float16, "cuda")
        options = dict(causal=True, window_size=(width - 1, 0))
        yield f"window {width}, N {n}", {name: attention_fn(name, **options) for name in ("v2", "flex")}, inputs, d_out
    for total in (1024, 4096):
        sizes = FeatureSizes(total, base.head_dim, base.heads, base.gqa_heads, base.window)
        fns = {name: fn for name, _, fn, _ in varlen_contenders(sizes, ("v2", "flex"), "cuda")}
        inputs, d_out = varlen_inputs(sizes, "packed", torch.float16, "cuda")
        yield f"varlen, {total} tokens", fns, inputs, d_out


for label, fns, inputs, d_out in points():
    contenders = {"v2_side_stream": fns["v2"], "v2_one_stream": fns["v2"], "flex": fns["flex"]}
    grads, times, hosts = {}, {}, {}
    for name, fn in contenders.items():
        v2_module.fork_stream = SHIPPED if name != "v2_one_stream" else (lambda device: None)
        fn(*inputs).backward(d_out)
        grads[name] = gradient_like(fn(*inputs), d_out)
    for rnd in range(ROUNDS):
        for name, fn in contenders.items():
            v2_module.fork_stream = SHIPPED if name != "v2_one_stream" else (lambda device: None)
            times.setdefault(name, []).append(time_ms(lambda: fn(*inputs).backward(grads[name]), "cuda", list(inputs)))
            hosts.setdefault(name, []).append(host_ms(fn, inputs, grads[name]))
    v2_module.fork_stream = SHIPPED
    print(json.dumps(dict(point=label, rounds=ROUNDS,
                          **{f"{name}_fwd_bwd_ms": round(statistics.median(t), 4) for name, t in times.items()},
                          **{f"{name}_host_ms": round(statistics.median(t), 4) for name, t in hosts.items()})), flush=True)
