"""A/B speed: v2 of whichever flashtile is first on sys.path, beside sdpa in the same process."""
import sys, json, torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench
import flashtile

label, points = sys.argv[1], sys.argv[2].split(",")
SHAPES = {  # name: (B, Hq, Hkv, N, D, causal)
    "gqa16k": (1, 32, 4, 16384, 128, True),
    "mha4k": (4, 16, 16, 4096, 128, True),
    "mha1k": (16, 16, 16, 1024, 128, True),
    "mha1k_nc": (16, 16, 16, 1024, 128, False),
}
out = []
for name in points:
    b, hq, hkv, n, d, causal = SHAPES[name]
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, hq, n, d, device="cuda", dtype=torch.float16, generator=g).requires_grad_()
    k, v = (torch.randn(b, hkv, n, d, device="cuda", dtype=torch.float16, generator=g).requires_grad_() for _ in range(2))
    do = torch.randn_like(q)
    flops = 4 * b * hq * n * n * d / (2 if causal else 1)
    fns = {"v2": lambda: flashtile.attention(q, k, v, causal=causal, impl="v2")}
    for backend, key in ((SDPBackend.FLASH_ATTENTION, "sdpa_flash"), (SDPBackend.CUDNN_ATTENTION, "sdpa_cudnn")):
        def f(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=hq != hkv)
        fns[key] = f
    for impl, fn in fns.items():
        try:
            fn().backward(do)
            fwd = do_bench(fn, warmup=25, rep=200, return_mode="median")
            fb = do_bench(lambda: fn().backward(do), warmup=25, rep=200, return_mode="median", grad_to_none=[q, k, v])
            row = dict(side=label, point=name, impl=impl, fwd_tflops=flops / fwd / 1e9, fwd_bwd_tflops=3.5 * flops / fb / 1e9)
        except Exception as e:
            row = dict(side=label, point=name, impl=impl, error=str(e).splitlines()[0][:100])
        print(json.dumps(row), flush=True)
