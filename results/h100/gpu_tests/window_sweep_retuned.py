"""Window sweep, causal, N 16384, H 16, D 128 fp16: flex, and v2 of the package at argv[1] with
the autotune caches cleared before each width (RETUNE=1) or not; per-kernel times and picks."""
import sys, json, os
sys.path.insert(0, sys.argv[1])
import torch
from torch.profiler import profile, ProfilerActivity
from triton.testing import do_bench
import flashtile
from flashtile.triton_kernels import v2 as _v2
assert flashtile.__file__.startswith(sys.argv[1])
label = sys.argv[2]
widths = [int(w) for w in sys.argv[3].split(",")]
impls = sys.argv[4].split(",")
retune = os.environ.get("RETUNE", "1") == "1"
N, H, D = 16384, 16, 128
g = torch.Generator(device="cuda").manual_seed(0)
q, k, v = (torch.randn(1, H, N, D, device="cuda", dtype=torch.float16, generator=g).requires_grad_() for _ in range(3))
do = torch.randn_like(q)
KN = ("_v2_forward_kernel", "_v2_dkdv_kernel", "_v2_dq_kernel")
for w in widths:
    visible = sum(min(i + 1, w) for i in range(N))
    flops = 4 * H * visible * D
    for impl in impls:
        if impl == "flex":
            from flashtile.bench.impls import attention_fn
            f = attention_fn("flex", causal=True, window_size=(w - 1, 0))
            fn = lambda: f(q, k, v)
        else:
            if retune:
                for kn in KN:
                    kern = getattr(_v2, kn); kern.remembered.clear(); kern.cache.clear()
            fn = lambda: flashtile.attention(q, k, v, causal=True, window_size=(w - 1, 0), impl=impl)
        for _ in range(2):
            fn().backward(do)
        fwd = do_bench(fn, warmup=25, rep=200, return_mode="median")
        fb = do_bench(lambda: fn().backward(do), warmup=25, rep=200, return_mode="median", grad_to_none=[q, k, v])
        row = dict(side=label, impl=impl, window=w, fwd_ms=round(fwd, 3), fb_ms=round(fb, 3),
                   fwd_tflops=round(flops / fwd / 1e9, 1), fb_tflops=round(3.5 * flops / fb / 1e9, 1))
        if impl != "flex":
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    fn().backward(do)
                torch.cuda.synchronize()
            row["kernels_ms"] = {e.key[:40]: round(e.device_time_total / 10 / 1000, 3)
                                 for e in prof.key_averages() if e.device_type.name == "CUDA" and e.count}
            row["configs"] = {kn: [str(c) for c, _ in getattr(_v2, kn).remembered.values()] for kn in KN}
        print(json.dumps(row), flush=True)
