"""On a Hopper GPU: the Gluon prototypes' output and lse against SDPA (math, float32), then their
forward TFLOP/s beside v2's and cuDNN's, per config, not causal and causal.
Usage: python prototypes/check_gluon_forward.py [SHAPES] with SHAPES like 4x16x4096x128,1x16x16384x128"""
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flashtile  # noqa: E402
from gluon_forward import gluon_forward  # noqa: E402

SHAPES = [tuple(map(int, s.split("x"))) for s in sys.argv[1].split(",")] if len(sys.argv) > 1 else \
    [(4, 16, 4096, 128), (1, 16, 16384, 128), (8, 32, 2048, 64)]
CONFIGS = [dict(block_n=64, num_stages=2), dict(block_n=128, num_stages=2)] + \
    [dict(two_consumers=True, block_n=bn, num_stages=st) for bn, st in ((128, 2), (64, 3), (128, 3), (64, 2))]

for b, h, n, d in SHAPES:
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.float16) for _ in range(3))
    for causal in (False, True):
        with sdpa_kernel(SDPBackend.MATH):
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
        ref_lse = None
        if n <= 4096:
            scores = (q.float() @ k.float().transpose(-1, -2)) * d ** -0.5
            if causal:
                scores = scores.masked_fill(torch.ones(n, n, device="cuda", dtype=torch.bool).triu(1), float("-inf"))
            ref_lse = torch.logsumexp(scores, -1)
            del scores
        flops = 4 * b * h * n * n * d // (2 if causal else 1)
        rows = []
        for config in CONFIGS:
            try:
                out, lse = gluon_forward(q, k, v, causal=causal, **config)
                torch.cuda.synchronize()
                err = (out.float() - ref).abs().max().item()
                lse_err = None if ref_lse is None else (lse - ref_lse).abs().max().item()
                ms = do_bench(lambda: gluon_forward(q, k, v, causal=causal, **config), return_mode="median")
                rows.append(dict(config, max_err=err, lse_err=lse_err, tflops=round(flops / ms / 1e9, 1)))
            except Exception as error:  # noqa: BLE001
                rows.append(dict(config, error=str(error).splitlines()[0][:300]))
        v2_ms = do_bench(lambda: flashtile.attention(q, k, v, causal=causal), return_mode="median")
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            cudnn_ms = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                                return_mode="median")
        v2_err = (flashtile.attention(q, k, v, causal=causal).float() - ref).abs().max().item()
        print(json.dumps(dict(shape=[b, h, n, d], causal=causal, gluon=rows, v2_tflops=round(flops / v2_ms / 1e9, 1),
                              v2_err=v2_err, cudnn_tflops=round(flops / cudnn_ms / 1e9, 1))), flush=True)
        del ref
