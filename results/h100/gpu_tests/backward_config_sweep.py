"""Backward config sweep on the GPU: a wider sm_90 candidate list, every config timed by the
autotuner; prints each kernel's per-config timings per point."""
import sys, json, time, os
import torch
import flashtile.triton_kernels._common as C
CANDS = {128: [(128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 128, 8, 2), (64, 32, 4, 3), (64, 64, 8, 3)],
         64: [(128, 64, 8, 3), (64, 64, 4, 3), (64, 128, 8, 3), (128, 128, 8, 2), (128, 32, 8, 3), (128, 64, 8, 2), (64, 64, 8, 3)]}
orig = C.CONFIG_SETS["backward"]
C.CONFIG_SETS["backward"] = lambda cap, bd: CANDS.get(bd, orig(cap, bd)) if cap >= 90 else orig(cap, bd)
import flashtile
from flashtile.triton_kernels import v2
PTS = {"causal16k": (1, 16, 16, 16384, 128, True, (-1, -1)), "full4k": (4, 16, 16, 4096, 128, False, (-1, -1)),
       "gqa16k": (1, 32, 4, 16384, 128, True, (-1, -1)), "win4k_16k": (1, 16, 16, 16384, 128, True, (4095, 0)),
       "causal16k_d64": (1, 32, 32, 16384, 64, True, (-1, -1))}
for name in sys.argv[1].split(","):
    b, hq, hkv, n, d, causal, window = PTS[name]
    q = torch.randn(b, hq, n, d, device="cuda", dtype=torch.float16, requires_grad=True)
    k, v = (torch.randn(b, hkv, n, d, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(2))
    t0 = time.perf_counter()
    flashtile.attention(q, k, v, causal=causal, window_size=window).backward(torch.randn_like(q))
    torch.cuda.synchronize()
    row = {"point": name, "first_call_s": round(time.perf_counter() - t0, 1)}
    for kname in ("_v2_dkdv_kernel", "_v2_dq_kernel"):
        kern = getattr(v2, kname)
        t = getattr(kern, "configs_timings", None) or {}
        row[kname] = sorted([[c.kwargs.get("BLOCK_M"), c.kwargs.get("BLOCK_N"), c.num_warps, c.num_stages, round(float(ms[0] if isinstance(ms, (list, tuple)) else ms), 4)] for c, ms in t.items()], key=lambda r: r[-1])
        kern.configs_timings = None
    print(json.dumps(row), flush=True)
