"""On an H100: v2 with the Gluon forward (v2_hopper.py) against v2 with FLASHTILE_GLUON=0 and
cuDNN, in one process, interleaved rounds; TFLOP/s forward and forward+backward by the
benchmark's timer. Usage:
python results/h100/gluon_forward/ab_hopper_forward.py [ROUNDS [LABEL_PART]] > FILE.jsonl
(LABEL_PART: only the points whose label contains it)"""
import json
import os
import statistics
import sys

import torch

from flashtile.bench.impls import attention_fn
from flashtile.bench.measure import random_inputs, time_ms, workload_flops

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
POINTS = [  # (label, batch, heads_q, heads_kv, n, d, dtype, options)
    *[(f"D{d} N{n}{' causal' if c else ''}", 16384 // n, 2048 // d, 2048 // d, n, d, torch.float16, dict(causal=c))
      for d in (64, 128, 256) for n in (1024, 4096, 16384) for c in (False, True)],
    ("D128 N4096 causal bf16", 4, 16, 16, 4096, 128, torch.bfloat16, dict(causal=True)),
    ("GQA 32/4 N16384 causal", 1, 32, 4, 16384, 128, torch.float16, dict(causal=True)),
    ("window 4096 N16384", 1, 16, 16, 16384, 128, torch.float16, dict(causal=True, window_size=(4095, 0))),
    ("softcap 50 N4096 causal", 4, 16, 16, 4096, 128, torch.float16, dict(causal=True, softcap=50.0)),
    # Next to no GPU work: the time per call is the host's (launch path, descriptors).
    ("host floor B1 H2 N128 D64", 1, 2, 2, 128, 64, torch.float16, dict()),
]
ONLY = sys.argv[2] if len(sys.argv) > 2 else ""
for label, b, hq, hkv, n, d, dtype, options in POINTS:
    if ONLY not in label:
        continue
    inputs, d_out = random_inputs(b, hq, n, d, dtype, "cuda", heads_kv=hkv)
    flops = workload_flops(b, hq, n, n, d, options.get("causal", False), options.get("window_size", (-1, -1)))
    contenders = {"gluon": ("v2", "1"), "v2": ("v2", "0")}
    if "window_size" not in options and "softcap" not in options:
        contenders["cudnn"] = ("sdpa_cudnn", "1")
    times = {}
    for rnd in range(ROUNDS):
        for name, (impl, gluon) in contenders.items():
            os.environ["FLASHTILE_GLUON"] = gluon
            fn = attention_fn(impl, **options)
            times.setdefault((name, "fwd"), []).append(time_ms(lambda: fn(*inputs), "cuda"))
            times.setdefault((name, "fwd_bwd"), []).append(
                time_ms(lambda: fn(*inputs).backward(d_out), "cuda", list(inputs)))
    row = dict(point=label, rounds=ROUNDS, device=torch.cuda.get_device_name())
    for (name, mode), t in times.items():
        row[f"{name}_{mode}_tflops"] = round(flops[mode] / statistics.median(t) / 1e9, 1)
        row[f"{name}_{mode}_ms"] = round(statistics.median(t), 4)
    print(json.dumps(row), flush=True)
