"""On an H100: the backward alone, TFLOP/s (2.5x the forward's FLOPs) by the benchmark's timer,
interleaved rounds in one process: v2's two passes (v2.py), v2_atomic's one pass in Gluon
(v2_hopper.py) and in Triton (FLASHTILE_GLUON=0), and cuDNN. It measures the tree of `d9c7393`,
where v2_atomic had that Gluon backward; the kernel was taken out after this measurement, so at
later trees "atomic_gluon" runs the Triton kernel too. Usage:
python results/h100/gluon_forward/ab_atomic_backward.py [ROUNDS [LABEL_PART]] > FILE.jsonl"""
import json
import os
import statistics
import sys

import torch

from flashtile.bench.impls import attention_fn
from flashtile.bench.measure import random_inputs, time_ms, workload_flops

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
ONLY = sys.argv[2] if len(sys.argv) > 2 else ""
POINTS = [(f"D{d} N{n}{' causal' if c else ''}", 16384 // n, 2048 // d, n, d, c)
          for d in (64, 128) for n in (1024, 4096, 16384) for c in (False, True)]
CONTENDERS = {"v2": ("v2", "1"), "atomic_gluon": ("v2_atomic", "1"), "atomic_triton": ("v2_atomic", "0"),
              "cudnn": ("sdpa_cudnn", "1")}


def backward_ms(fn, inputs, d_out):
    out = fn(*inputs)
    return time_ms(lambda: torch.autograd.grad(out, inputs, d_out, retain_graph=True), "cuda")


for label, b, h, n, d, causal in POINTS:
    if ONLY not in label:
        continue
    inputs, d_out = random_inputs(b, h, n, d, torch.float16, "cuda")
    flops = workload_flops(b, h, n, n, d, causal)
    times = {}
    for rnd in range(ROUNDS):
        for name, (impl, gluon) in CONTENDERS.items():
            os.environ["FLASHTILE_GLUON"] = gluon
            times.setdefault(name, []).append(backward_ms(attention_fn(impl, causal), inputs, d_out))
    row = dict(point=label, rounds=ROUNDS, device=torch.cuda.get_device_name())
    for name, t in times.items():
        row[f"{name}_bwd_tflops"] = round((flops["fwd_bwd"] - flops["fwd"]) / statistics.median(t) / 1e9, 1)
        row[f"{name}_bwd_ms"] = round(statistics.median(t), 4)
    print(json.dumps(row), flush=True)
