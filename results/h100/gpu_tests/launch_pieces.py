"""What one Triton launch costs on the host, piece by piece (Triton 3.6's JITFunction.run):
v2's dK/dV launch as v2's backward makes it, then the pieces of JITFunction.run on the same
arguments, each the best of 5 rounds of 2000 calls, in microseconds.

Usage: python3 launch_pieces.py REPO_DIR"""
import json
import sys
import time

sys.path.insert(0, sys.argv[1])
import torch  # noqa: E402
from triton import knobs  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction, compute_cache_key  # noqa: E402

import flashtile  # noqa: E402
from flashtile.triton_kernels import v2 as V  # noqa: E402


def us(fn, calls=2000, rounds=5):
    fn()
    best = float("inf")
    for _ in range(rounds):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
    return round(best, 2)


q, k, v = (torch.randn(1, 2, 64, 64, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3))
flashtile.attention(q, k, v, causal=True).sum().backward()
captured = {}
original_run = JITFunction.run


def capture(self, *args, grid, warmup, **kwargs):
    captured.setdefault(self.fn.__name__, (self, args, grid, kwargs))
    return original_run(self, *args, grid=grid, warmup=warmup, **kwargs)


JITFunction.run = capture
flashtile.attention(q, k, v, causal=True).sum().backward()
JITFunction.run = original_run
fn, args, grid, kwargs = captured["_v2_dkdv_kernel"]
kwargs = dict(kwargs)
res = {"device": torch.cuda.get_device_name(), "args": len(args) + len(kwargs)}
res["JITFunction.run"] = us(lambda: fn.run(*args, grid=grid, warmup=False, **kwargs))
device = driver.active.get_current_device()
res["get_current_device"] = us(lambda: driver.active.get_current_device())
res["get_current_stream"] = us(lambda: driver.active.get_current_stream(device))
kernel_cache, kernel_key_cache, target, backend, binder = fn.device_caches[device]
full = dict(kwargs, debug=False, instrumentation_mode=knobs.compilation.instrumentation_mode)
res["binder"] = us(lambda: binder(*args, **full))
bound_args, specialization, options = binder(*args, **full)
res["compute_cache_key"] = us(lambda: compute_cache_key(kernel_key_cache, specialization, options))
kernel = kernel_cache[compute_cache_key(kernel_key_cache, specialization, options)]
grid_tuple = grid(bound_args) if callable(grid) else grid
stream = driver.active.get_current_stream(device)
values = list(bound_args.values())
res["launch_metadata"] = us(lambda: kernel.launch_metadata(grid_tuple, stream, *values))
g0, g1, g2 = (tuple(grid_tuple) + (1, 1))[:3]


def direct():
    kernel.run(g0, g1, g2, stream, kernel.function, kernel.packed_metadata, None, None, None, *values)


res["kernel.run"] = us(direct)
res["torch.empty"] = us(lambda: torch.empty((2, 64, 64), device="cuda", dtype=torch.float16))
print(json.dumps(res))
