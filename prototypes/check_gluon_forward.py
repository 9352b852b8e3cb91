"""On a Hopper GPU: the Gluon prototype's output and lse against SDPA (math, float32), then its
forward TFLOP/s beside v2's and cuDNN's, per config. Usage: python prototypes/check_gluon_forward.py"""
import json
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

sys.path.insert(0, "prototypes")
import flashtile  # noqa: E402
from gluon_forward import gluon_forward  # noqa: E402

for b, h, n, d in ((4, 16, 4096, 128), (1, 16, 16384, 128), (8, 32, 2048, 64)):
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.float16) for _ in range(3))
    with sdpa_kernel(SDPBackend.MATH):
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    ref_lse = torch.logsumexp((q.float() @ k.float().transpose(-1, -2)) * d ** -0.5, -1) if n <= 4096 else None
    flops = 4 * b * h * n * n * d
    rows = []
    for ws in (False, True):
        for block_n, stages in ((128, 2), (64, 2), (64, 3), (128, 3)):
            config = dict(block_n=block_n, num_stages=stages, warp_specialized=ws)
            try:
                out, lse = gluon_forward(q, k, v, **config)
                torch.cuda.synchronize()
                err = (out.float() - ref).abs().max().item()
                lse_err = None if ref_lse is None else (lse - ref_lse).abs().max().item()
                ms = do_bench(lambda: gluon_forward(q, k, v, **config), return_mode="median")
                rows.append(dict(config, max_err=err, lse_err=lse_err, tflops=round(flops / ms / 1e9, 1)))
            except Exception as error:  # noqa: BLE001
                rows.append(dict(config, error=str(error).splitlines()[0][:200]))
    v2_ms = do_bench(lambda: flashtile.attention(q, k, v), return_mode="median")
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        cudnn_ms = do_bench(lambda: F.scaled_dot_product_attention(q, k, v), return_mode="median")
    v2_err = (flashtile.attention(q, k, v).float() - ref).abs().max().item()
    print(json.dumps(dict(shape=[b, h, n, d], gluon=rows, v2_tflops=round(flops / v2_ms / 1e9, 1), v2_err=v2_err,
                          cudnn_tflops=round(flops / cudnn_ms / 1e9, 1))), flush=True)
