"""A/B: v2 of the flashtile package under sys.argv[2] (a folder) on named points; sdpa_cudnn beside it."""
import sys, json, time
sys.path.insert(0, sys.argv[2])
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench
import flashtile
assert flashtile.__file__.startswith(sys.argv[2]), flashtile.__file__
label, points, with_cudnn = sys.argv[1], sys.argv[3].split(","), sys.argv[4] == "1"
impls = sys.argv[5].split(",") if len(sys.argv) > 5 else ["v2"]
dtype = getattr(torch, sys.argv[6]) if len(sys.argv) > 6 else torch.float16
SHAPES = {  # name: (B, H, N, D, causal, window[, Hkv])
    "gqa16k": (1, 32, 16384, 128, True, (-1, -1), 4),
    "full1k": (16, 16, 1024, 128, False, (-1, -1)),
    "causal10k": (1, 16, 10240, 128, True, (-1, -1)),
    "causal10k_odd": (1, 16, 10232, 128, True, (-1, -1)),
    "full4k_odd": (4, 16, 4001, 128, False, (-1, -1)),
    "win4k_16k": (1, 16, 16384, 128, True, (4095, 0)),
    "win512x2_4k": (4, 16, 4096, 128, False, (512, 512)),
    "causal16k": (1, 16, 16384, 128, True, (-1, -1)),
    "full8k": (2, 16, 8192, 128, False, (-1, -1)),
    "causal8k": (2, 16, 8192, 128, True, (-1, -1)),
    "causal4k": (4, 16, 4096, 128, True, (-1, -1)),
    "full4k": (4, 16, 4096, 128, False, (-1, -1)),
    "d256_1k": (16, 8, 1024, 256, False, (-1, -1)),
    "d256_4k": (4, 8, 4096, 256, False, (-1, -1)),
    "d256_4k_c": (4, 8, 4096, 256, True, (-1, -1)),
    "d256_16k_c": (1, 8, 16384, 256, True, (-1, -1)),
}
def visible(n, causal, window):
    left, right = window
    if causal: right = 0
    import numpy as np
    i = np.arange(n)[:, None]; j = np.arange(n)[None, :]
    m = np.ones((n, n), bool)
    if left >= 0: m &= j >= i - left
    if right >= 0: m &= j <= i + right
    return int(m.sum())
VARLEN = {"varlen_mix": [1024, 1024, 1024, 10240, 1024, 1024, 1024], "varlen_long": [10240]}
for name in points:
    if name in VARLEN:  # causal varlen, H 16, D 128, packed (total, H, D)
        lengths = VARLEN[name]
        cu = torch.tensor([0] + [sum(lengths[:i + 1]) for i in range(len(lengths))], dtype=torch.int32, device="cuda")
        total, longest = sum(lengths), max(lengths)
        q, k, v = (torch.randn(total, 16, 128, device="cuda", dtype=dtype).requires_grad_() for _ in range(3))
        do = torch.randn_like(q)
        flops = 4 * 16 * sum(n * (n + 1) // 2 for n in lengths) * 128
        fns = {impl: (lambda impl=impl: flashtile.varlen_attention(q, k, v, cu, cu, longest, longest, causal=True, impl=impl))
               for impl in impls}
        for impl, fn in fns.items():
            t0 = time.perf_counter(); fn().backward(do); torch.cuda.synchronize(); first = time.perf_counter() - t0
            fwd = do_bench(fn, warmup=25, rep=200, return_mode="median")
            fb = do_bench(lambda: fn().backward(do), warmup=25, rep=200, return_mode="median", grad_to_none=[q, k, v])
            print(json.dumps(dict(side=label, point=name, impl=impl, fwd_tflops=round(flops / fwd / 1e9, 1),
                                  fwd_bwd_tflops=round(3.5 * flops / fb / 1e9, 1), fwd_ms=round(fwd, 3), fb_ms=round(fb, 3),
                                  first_call_s=round(first, 2))), flush=True)
        continue
    b, h, n, d, causal, window, *rest = SHAPES[name]
    hkv = rest[0] if rest else h
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, h, n, d, device="cuda", dtype=dtype, generator=g).requires_grad_()
    k, v = (torch.randn(b, hkv, n, d, device="cuda", dtype=dtype, generator=g).requires_grad_() for _ in range(2))
    do = torch.randn_like(q)
    flops = 4 * b * h * visible(n, causal, window) * d
    wkw = {} if window == (-1, -1) else dict(window_size=window)
    fns = {impl: (lambda impl=impl: flashtile.attention(q, k, v, causal=causal, impl=impl, **wkw)) for impl in impls}
    if with_cudnn and window == (-1, -1):
        def f():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=hkv != h)
        fns["sdpa_cudnn"] = f
    for impl, fn in fns.items():
        try:
            t0 = time.perf_counter(); fn().backward(do); torch.cuda.synchronize(); first = time.perf_counter() - t0
            fwd = do_bench(fn, warmup=25, rep=200, return_mode="median")
            fb = do_bench(lambda: fn().backward(do), warmup=25, rep=200, return_mode="median", grad_to_none=[q, k, v])
            row = dict(side=label, point=name, impl=impl, dtype=str(dtype)[6:], fwd_tflops=round(flops / fwd / 1e9, 1),
                       fwd_bwd_tflops=round(3.5 * flops / fb / 1e9, 1), first_call_s=round(first, 2))
        except Exception as e:
            row = dict(side=label, point=name, impl=impl, dtype=str(dtype)[6:], error=str(e).splitlines()[0][:200])
        print(json.dumps(row), flush=True)

from flashtile.triton_kernels import v2 as _v2
print(json.dumps(dict(side=label, configs={kn: {str(key[0]): str(c) for key, (c, _) in getattr(getattr(_v2, kn), 'remembered', {}).items()}
                                           for kn in ("_v2_forward_kernel", "_v2_dkdv_kernel", "_v2_dq_kernel")})), flush=True)
