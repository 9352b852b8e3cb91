"""Where v2's fwd+bwd time goes: do_bench time, then a profile of 10 iterations
done as do_bench does them (grads None, L2 flushed), CPU ops included."""
import sys, json
sys.path.insert(0, sys.argv[1])
import torch
from torch.profiler import profile, ProfilerActivity
from triton.testing import do_bench
import flashtile
N, H, D = 16384, 16, 128
q, k, v = (torch.randn(1, H, N, D, device="cuda", dtype=torch.float16).requires_grad_() for _ in range(3))
do = torch.randn_like(q)
cache = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
for label, window in (("win4096", (4095, 0)), ("causal", (-1, -1))):
    fn = lambda: flashtile.attention(q, k, v, causal=True, window_size=window)
    for _ in range(3):
        fn().backward(do)
    fb = do_bench(lambda: fn().backward(do), warmup=25, rep=200, return_mode="median", grad_to_none=[q, k, v])
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            for t in (q, k, v):
                t.grad = None
            cache.zero_()
            fn().backward(do)
        torch.cuda.synchronize()
    print(f"== {label} fb_ms {fb:.3f}")
    print(prof.key_averages().table(sort_by="device_time_total", row_limit=22, max_name_column_width=60))
    # gaps: GPU idle between consecutive kernels of one iteration
    evs = sorted([e for e in prof.events() if e.device_type.name == "CUDA"], key=lambda e: e.time_range.start)
    print("kernel timeline of the last iteration (start us rel, dur us, name):")
    last = evs[-8:]
    t0 = last[0].time_range.start
    for e in last:
        print(f"  {e.time_range.start - t0:9.1f} {e.time_range.elapsed_us():8.1f} {e.name[:60]}")
