"""In one process, interleaved rounds: v2 fwd+bwd with dQ on the side stream (as built) and with
fork_stream patched to None (one stream); flex beside on the window point."""
import sys, json, os
sys.path.insert(0, sys.argv[1])
import torch
from triton.testing import do_bench
import flashtile
from flashtile.triton_kernels import v2 as _v2
from flashtile.bench.impls import attention_fn
assert flashtile.__file__.startswith(sys.argv[1])
FORK = _v2.fork_stream
POINTS = {  # B, Hq, Hkv, N, D, causal, window
    "win4096": (1, 16, 16, 16384, 128, True, (4095, 0)), "causal16k": (1, 16, 16, 16384, 128, True, (-1, -1)),
    "full1k": (16, 16, 16, 1024, 128, False, (-1, -1)), "full1k_d64": (16, 32, 32, 1024, 64, False, (-1, -1)),
    "causal4k": (4, 16, 16, 4096, 128, True, (-1, -1)), "gqa16k": (1, 32, 4, 16384, 128, True, (-1, -1)),
    "causal1k_d64": (16, 32, 32, 1024, 64, True, (-1, -1)),
}
rounds = int(sys.argv[3])
for name in sys.argv[2].split(","):
    b, hq, hkv, n, d, causal, window = POINTS[name]
    q = torch.randn(b, hq, n, d, device="cuda", dtype=torch.float16).requires_grad_()
    k, v = (torch.randn(b, hkv, n, d, device="cuda", dtype=torch.float16).requires_grad_() for _ in range(2))
    do = torch.randn_like(q)
    fns = {"side": lambda: flashtile.attention(q, k, v, causal=causal, window_size=window),
           "one_stream": lambda: flashtile.attention(q, k, v, causal=causal, window_size=window)}
    if window != (-1, -1):
        flexf = attention_fn("flex", causal=True, window_size=window)
        fns["flex"] = lambda flexf=flexf: flexf(q, k, v)
    res = {key: [] for key in fns}
    for rnd in range(rounds):
        for key, f in fns.items():
            _v2.fork_stream = (lambda device: None) if key == "one_stream" else FORK
            for _ in range(2):
                f().backward(do)
            res[key].append(round(do_bench(lambda: f().backward(do), warmup=25, rep=150, return_mode="median",
                                           grad_to_none=[q, k, v]), 4))
    med = {key: sorted(x)[len(x) // 2] for key, x in res.items()}
    print(json.dumps(dict(point=name, fb_ms=res, median=med, side_gain=round(med["one_stream"] / med["side"] - 1, 4))),
          flush=True)
