"""Back-to-back fwd+bwd, window 4096: grads kept (accumulating) or set to None each iteration; v2 with
dQ on the side stream or patched to one stream; flex beside."""
import sys, json, time
sys.path.insert(0, sys.argv[1])
import torch
import flashtile
from flashtile.triton_kernels import v2 as _v2
from flashtile.bench.impls import attention_fn
FORK = _v2.fork_stream
N, H, D = 16384, 16, 128
q, k, v = (torch.randn(1, H, N, D, device="cuda", dtype=torch.float16).requires_grad_() for _ in range(3))
do = torch.randn_like(q)
ff = attention_fn("flex", causal=True, window_size=(4095, 0))
fns = {"v2_side": lambda: flashtile.attention(q, k, v, causal=True, window_size=(4095, 0)),
       "v2_one": lambda: flashtile.attention(q, k, v, causal=True, window_size=(4095, 0)),
       "flex": lambda: ff(q, k, v)}
for rnd in range(2):
    for name, fn in fns.items():
        _v2.fork_stream = (lambda device: None) if name == "v2_one" else FORK
        for none in (False, True):
            for _ in range(3):
                fn().backward(do)
            torch.cuda.synchronize()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for _ in range(20):
                if none:
                    q.grad = k.grad = v.grad = None
                fn().backward(do)
            e1.record(); torch.cuda.synchronize()
            print(json.dumps(dict(round=rnd, impl=name, grads_none=none, ms=round(e0.elapsed_time(e1) / 20, 3))), flush=True)
