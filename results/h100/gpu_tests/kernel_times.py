"""Per-kernel CUDA times (torch.profiler) of v2 forward+backward on layout/varlen variants."""
import sys, json
sys.path.insert(0, sys.argv[1])
import torch
from torch.profiler import profile, ProfilerActivity
from triton.testing import do_bench
import flashtile
points = sys.argv[2].split(",")
dt = torch.float16
H, D, N = 16, 128, 10240
def mk(shape, perm=None):
    t = torch.randn(*shape, device="cuda", dtype=dt)
    if perm: t = t.permute(*perm)
    return t.requires_grad_()
cu = torch.tensor([0, N], dtype=torch.int32, device="cuda")
for name in points:
    if name == "dense_bhnd":
        q, k, v = (mk((1, H, N, D)) for _ in range(3)); fn = lambda: flashtile.attention(q, k, v, causal=True)
    elif name.startswith("dense_n"):
        n = int(name[7:]); q, k, v = (mk((1, H, n, D)) for _ in range(3)); fn = lambda: flashtile.attention(q, k, v, causal=True)
    elif name == "dense_bnhd":
        q, k, v = (mk((1, N, H, D), (0, 2, 1, 3)) for _ in range(3)); fn = lambda: flashtile.attention(q, k, v, causal=True)
    elif name == "varlen_nhd":
        q, k, v = (mk((N, H, D)) for _ in range(3)); fn = lambda: flashtile.varlen_attention(q, k, v, cu, cu, N, N, causal=True)
    elif name == "varlen_hnd":
        q, k, v = (mk((H, N, D), (1, 0, 2)) for _ in range(3)); fn = lambda: flashtile.varlen_attention(q, k, v, cu, cu, N, N, causal=True)
    elif name == "win_bhnd":
        q, k, v = (mk((1, H, 16384, D)) for _ in range(3)); fn = lambda: flashtile.attention(q, k, v, causal=True, window_size=(4095, 0))
    elif name == "win_bnhd":
        q, k, v = (mk((1, 16384, H, D), (0, 2, 1, 3)) for _ in range(3)); fn = lambda: flashtile.attention(q, k, v, causal=True, window_size=(4095, 0))
    do = torch.randn_like(q)
    for _ in range(3):
        fn().backward(do)
    fb = do_bench(lambda: fn().backward(do), warmup=25, rep=200, return_mode="median", grad_to_none=[q, k, v])
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            fn().backward(do)
        torch.cuda.synchronize()
    kt = {}
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" and e.count:
            kt[e.key[:60]] = round(e.device_time_total / 10 / 1000, 3)
    from flashtile.triton_kernels import v2 as _v2
    cfg = {}
    for kn in ("_v2_forward_kernel", "_v2_dkdv_kernel", "_v2_dq_kernel"):
        rem = getattr(_v2, kn).remembered
        cfg[kn] = [str(c) for c, _ in rem.values()]
        rem.clear()
    print(json.dumps(dict(point=name, fb_ms=round(fb, 3), kernels_ms=kt, configs=cfg)), flush=True)
