"""v2's Gluon forward (v2_hopper.py) against an earlier copy of it and cuDNN's forward, in one
process, interleaved rounds, forward-only TFLOP/s. First the forwards' outputs against each other
at odd shapes with every feature. The earlier kernel is read from a file (e.g. `git show
b5539d8:flashtile/triton_kernels/v2_hopper.py > FILE`), the current one at NUM_STAGES in STAGES.
Usage: python results/h200/gluon_forward/ab_forward_pipelined.py BEFORE.py [ROUNDS [LABEL_PART [STAGES]]]"""
import importlib.util
import json
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from flashtile.bench.measure import random_inputs, time_ms, workload_flops
from flashtile.triton_kernels import v2_hopper
from flashtile.triton_kernels._common import Problem

spec = importlib.util.spec_from_file_location("flashtile.triton_kernels.v2_hopper_before", sys.argv[1])
before = importlib.util.module_from_spec(spec)
spec.loader.exec_module(before)
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 3
ONLY = sys.argv[3] if len(sys.argv) > 3 else ""
STAGES = [int(s) for s in sys.argv[4].split(",")] if len(sys.argv) > 4 else [2]


def problem_of(q, k, window=(-1, -1), softcap=0.0):
    return Problem.of(q, k, None, None, None, None, q.shape[-1] ** -0.5, window[0], window[1], softcap)


def current(stages):
    def forward(q, k, v, problem):
        v2_hopper.NUM_STAGES = stages if problem.head_dim < 256 else 2  # D 256: three slots overflow shared memory
        return v2_hopper.v2_hopper_forward(q, k, v, problem)
    return forward


CONTENDERS = {"before": before.v2_hopper_forward, **{f"now_s{s}": current(s) for s in STAGES}}
CHECKS = [(1, 2, 2, 113, 113, 64, (-1, 0), 0.0), (2, 4, 2, 1023, 517, 128, (100, 0), 30.0),
          (1, 3, 1, 300, 1000, 256, (-1, -1), 0.0), (2, 2, 2, 1000, 300, 128, (-1, 0), 0.0),
          (1, 2, 2, 2048, 2048, 128, (256, 64), 0.0), (1, 8, 2, 1, 17, 64, (-1, -1), 50.0),
          (1, 2, 2, 300, 1000, 64, (10, -1), 0.0)]
if not ONLY:
    for b, hq, hkv, nq, nk, d, window, softcap in CHECKS:
        (q, k, v), _ = random_inputs(b, hq, nq, d, torch.float16, "cuda", heads_kv=hkv, n_k=nk)
        problem = problem_of(q, k, window, softcap)
        ref_out, ref_lse = before.v2_hopper_forward(q, k, v, problem)
        row = dict(check=f"B{b} H{hq}/{hkv} {nq}x{nk} D{d} window{window} softcap{softcap}")
        for name, forward in CONTENDERS.items():
            out, lse = forward(q, k, v, problem)
            seen = torch.isfinite(ref_lse)
            row[name] = dict(out=(out.float() - ref_out.float()).abs().max().item(),
                             lse=(lse[seen] - ref_lse[seen]).abs().max().item() if seen.any() else 0.0,
                             same_unseen=bool(torch.equal(lse[~seen], ref_lse[~seen])), finite=bool(out.isfinite().all()))
        print(json.dumps(row), flush=True)

POINTS = [(f"D{d} N{n}{' causal' if c else ''}", 16384 // n, 2048 // d, n, d, c)
          for d in (64, 128, 256) for n in (1024, 4096, 16384) for c in (False, True)]
for label, b, h, n, d, causal in POINTS:
    if ONLY not in label:
        continue
    (q, k, v), _ = random_inputs(b, h, n, d, torch.float16, "cuda")
    q, k, v = q.detach(), k.detach(), v.detach()
    problem = problem_of(q, k, (-1, 0) if causal else (-1, -1))
    flops = workload_flops(b, h, n, n, d, causal, (-1, -1))["fwd"]
    runs = {name: (lambda forward=forward: forward(q, k, v, problem)) for name, forward in CONTENDERS.items()}

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    runs["cudnn"] = cudnn
    times = {}
    for _ in range(ROUNDS):
        for name, run in runs.items():
            times.setdefault(name, []).append(time_ms(run, "cuda"))
    row = dict(point=label, rounds=ROUNDS, device=torch.cuda.get_device_name())
    for name, t in times.items():
        row[f"{name}_fwd_tflops"] = round(flops / statistics.median(t) / 1e9, 1)
    print(json.dumps(row), flush=True)
