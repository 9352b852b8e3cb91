"""Where v2's do_bench fwd+bwd time exceeds its kernels' sum: do_bench, then a do_bench-like loop with
extra events (after the forward returns) and host timestamps; flex beside; window 4096 and causal."""
import sys, json, time, statistics as st
sys.path.insert(0, sys.argv[1])
import torch
from triton.testing import do_bench
import flashtile
from flashtile.bench.impls import attention_fn
N, H, D = 16384, 16, 128
q, k, v = (torch.randn(1, H, N, D, device="cuda", dtype=torch.float16).requires_grad_() for _ in range(3))
do = torch.randn_like(q)
cache = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int, device="cuda")
for label, window in (("win4096", (4095, 0)), ("causal", (-1, -1))):
    fns = {"v2": lambda: flashtile.attention(q, k, v, causal=True, window_size=window)}
    if window != (-1, -1):
        ff = attention_fn("flex", causal=True, window_size=window)
        fns["flex"] = lambda ff=ff: ff(q, k, v)
    for name, fn in fns.items():
        for _ in range(3):
            fn().backward(do)
        bench = [do_bench(lambda: fn().backward(do), warmup=25, rep=200, return_mode="median", grad_to_none=[q, k, v])
                 for _ in range(2)]
        n = 40
        ev = [[torch.cuda.Event(enable_timing=True) for _ in range(3)] for _ in range(n)]
        host = []
        torch.cuda.synchronize()
        for i in range(n):
            for t in (q, k, v):
                t.grad = None
            cache.zero_()
            ev[i][0].record()
            h0 = time.perf_counter()
            out = fn()
            ev[i][1].record()
            h1 = time.perf_counter()
            out.backward(do)
            ev[i][2].record()
            h2 = time.perf_counter()
            host.append((h1 - h0, h2 - h1))
        torch.cuda.synchronize()
        fwd = st.median(e[0].elapsed_time(e[1]) for e in ev)
        bwd = st.median(e[1].elapsed_time(e[2]) for e in ev)
        tot = st.median(e[0].elapsed_time(e[2]) for e in ev)
        print(json.dumps(dict(point=label, impl=name, do_bench_ms=[round(b, 3) for b in bench], loop_total_ms=round(tot, 3),
                              loop_fwd_ms=round(fwd, 3), loop_bwd_ms=round(bwd, 3),
                              host_fwd_ms=round(st.median(h[0] for h in host) * 1e3, 3),
                              host_bwd_ms=round(st.median(h[1] for h in host) * 1e3, 3))), flush=True)
        # graph-free check of host-boundness: many iterations back to back with no flush
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record(); h0 = time.perf_counter()
        for _ in range(20):
            fn().backward(do)
        h1 = time.perf_counter(); e1.record(); torch.cuda.synchronize()
        print(json.dumps(dict(point=label, impl=name, back_to_back_gpu_ms=round(e0.elapsed_time(e1) / 20, 3),
                              back_to_back_host_ms=round((h1 - h0) * 1e3 / 20, 3))), flush=True)
