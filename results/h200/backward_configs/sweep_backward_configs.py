"""Candidate launch configs of v2.py's portable backward kernels (dK/dV and dQ) on Hopper, timed
by the autotuner itself, then v2's forward+backward with the fastest beside cuDNN's, fp16.
A config is (rows owned, rows looped over, num_warps, num_stages), as in _common.py; a config that
does not fit shared memory or registers times as inf.
Usage: python results/h200/backward_configs/sweep_backward_configs.py D [D ...]
(D 128: with FLASHTILE_ONE_PASS_BACKWARD=0, or v2's backward at N >= 4096 is the Gluon one pass.)"""
import json
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flashtile
from flashtile.bench.measure import random_inputs, time_ms, workload_flops
from flashtile.triton_kernels import _common, v2
from flashtile.triton_kernels._common import Problem

CANDIDATES = {
    256: [(64, 32, 4, 2), (64, 64, 8, 1), (32, 32, 4, 2), (64, 64, 4, 2), (64, 32, 8, 2), (64, 64, 8, 2),
          (128, 32, 8, 2), (128, 64, 8, 1), (128, 32, 8, 1), (64, 128, 8, 1), (64, 32, 4, 3), (128, 16, 8, 2)],
    128: [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3), (128, 32, 8, 3), (64, 64, 4, 4),
          (128, 128, 8, 2), (64, 128, 8, 3), (128, 64, 4, 3), (64, 64, 8, 3)],
    64: [(128, 64, 8, 3), (64, 64, 4, 3), (64, 128, 8, 3), (128, 128, 8, 2), (128, 32, 8, 3), (128, 64, 4, 3),
         (128, 128, 8, 3), (64, 64, 4, 4), (128, 64, 8, 4), (64, 32, 4, 3)],
}
shipped = _common.CONFIG_SETS["backward"]
_common.CONFIG_SETS["backward"] = lambda capability, block_d: CANDIDATES.get(block_d) or shipped(capability, block_d)
KERNELS = {"dkdv": (v2._v2_dkdv_kernel, "BLOCK_N", "BLOCK_M"), "dq": (v2._v2_dq_kernel, "BLOCK_M", "BLOCK_N")}
for kernel, owned, looped in KERNELS.values():
    kernel.configs = _common.as_triton_configs([c for d in CANDIDATES for c in CANDIDATES[d]], owned, looped)

for d in [int(a) for a in sys.argv[1:]]:
    for n in (1024, 4096, 16384):
        for causal in (False, True):
            for kernel, _, _ in KERNELS.values():
                kernel.remembered.clear()
                kernel.cache.clear()
            (q, k, v), d_out = random_inputs(16384 // n, 2048 // d, n, d, torch.float16, "cuda")
            problem = Problem.of(q, k, None, None, None, None, d ** -0.5, -1, 0 if causal else -1, 0.0)
            row = dict(point=f"D{d} N{n}{' causal' if causal else ''}", device=torch.cuda.get_device_name())
            with torch.no_grad():
                out, lse = v2.v2_forward(q, k, v, problem)
                v2.v2_backward(d_out, q, k, v, out, lse, problem)  # autotunes both kernels
            for name, (kernel, owned, looped) in KERNELS.items():
                timings = {(c.kwargs[owned], c.kwargs[looped], c.num_warps, c.num_stages): t[0]
                           for c, t in kernel.configs_timings.items()}
                row[f"{name}_ms"] = {str(c): round(t, 4) for c, t in sorted(timings.items(), key=lambda ct: ct[1])}

            def flashtile_fwd_bwd():
                flashtile.attention(q, k, v, causal=causal).backward(d_out)

            def cudnn_fwd_bwd():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    F.scaled_dot_product_attention(q, k, v, is_causal=causal).backward(d_out)
            flops = workload_flops(16384 // n, 2048 // d, n, n, d, causal)["fwd_bwd"]
            times = {"v2": [], "cudnn": []}
            for _ in range(3):
                times["v2"].append(time_ms(flashtile_fwd_bwd, "cuda", [q, k, v]))
                times["cudnn"].append(time_ms(cudnn_fwd_bwd, "cuda", [q, k, v]))
            for name, t in times.items():
                row[f"{name}_fwd_bwd_tflops"] = round(flops / statistics.median(t) / 1e9, 1)
            print(json.dumps(row), flush=True)
