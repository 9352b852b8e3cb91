"""On an H100: v2_hopper.py's forward at each (BLOCK_M, BLOCK_N, warps) config, and its backward
at 2 and 3 ring stages, beside v2.py's kernels (FLASHTILE_GLUON=0) and cuDNN, in one process,
interleaved rounds; TFLOP/s by the benchmark's timer (backward alone: the graph of one forward,
differentiated again and again). Usage:
python prototypes/sweep_hopper_configs.py [ROUNDS] > FILE.jsonl"""
import json
import os
import statistics
import sys

import torch

from flashtile.bench.impls import attention_fn
from flashtile.bench.measure import random_inputs, time_ms, workload_flops
from flashtile.triton_kernels import v2_hopper

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 2
FORWARD_CONFIGS = [(128, 64, 8), (128, 128, 8), (64, 64, 4), (64, 128, 4)]
BACKWARD_STAGES = [2, 3]
POINTS = [  # (label, batch, heads_q, heads_kv, n, d, dtype, options, time the backward)
    *[(f"D{d} N{n}{' causal' if c else ''}", 16384 // n, 2048 // d, 2048 // d, n, d, torch.float16, dict(causal=c),
       n >= 4096) for d in (64, 128) for n in (1024, 4096, 16384) for c in (False, True)],
    ("D128 N4096 causal bf16", 4, 16, 16, 4096, 128, torch.bfloat16, dict(causal=True), False),
    ("GQA 32/4 N16384 causal", 1, 32, 4, 16384, 128, torch.float16, dict(causal=True), False),
    *[(f"window {w} N16384", 1, 16, 16, 16384, 128, torch.float16, dict(causal=True, window_size=(w - 1, 0)), False)
      for w in (256, 1024, 4096)],
]


def forward_config(config):
    block_m, block_n, warps = config
    v2_hopper.FORWARD_BLOCKS = {64: (block_m, block_n), 128: (block_m, block_n)}
    v2_hopper.FORWARD_WARPS = warps


def backward_ms(fn, inputs, d_out):
    out = fn(*inputs)
    return time_ms(lambda: torch.autograd.grad(out, inputs, d_out, retain_graph=True), "cuda")


default_blocks = dict(v2_hopper.FORWARD_BLOCKS)
for label, b, hq, hkv, n, d, dtype, options, with_backward in POINTS:
    inputs, d_out = random_inputs(b, hq, n, d, dtype, "cuda", heads_kv=hkv)
    flops = workload_flops(b, hq, n, n, d, options.get("causal", False), options.get("window_size", (-1, -1)))
    times = {}
    for rnd in range(ROUNDS):
        for config in FORWARD_CONFIGS:
            os.environ["FLASHTILE_GLUON"] = "1"
            forward_config(config)
            fn = attention_fn("v2", **options)
            times.setdefault("gluon_fwd_%d_%d_%d" % config, []).append(time_ms(lambda: fn(*inputs), "cuda"))
        v2_hopper.FORWARD_BLOCKS = dict(default_blocks)
        v2_hopper.FORWARD_WARPS = 8
        os.environ["FLASHTILE_GLUON"] = "0"
        fn = attention_fn("v2", **options)
        times.setdefault("v2_fwd", []).append(time_ms(lambda: fn(*inputs), "cuda"))
        if with_backward:
            times.setdefault("v2_bwd", []).append(backward_ms(fn, inputs, d_out))
            os.environ["FLASHTILE_GLUON"] = "1"
            for stages in BACKWARD_STAGES:
                v2_hopper.BACKWARD_STAGES = stages
                times.setdefault(f"gluon_bwd_stages{stages}", []).append(backward_ms(fn, inputs, d_out))
            v2_hopper.BACKWARD_STAGES = 2
        if "window_size" not in options:
            fn = attention_fn("sdpa_cudnn", **options)
            times.setdefault("cudnn_fwd", []).append(time_ms(lambda: fn(*inputs), "cuda"))
            if with_backward:
                times.setdefault("cudnn_bwd", []).append(backward_ms(fn, inputs, d_out))
    row = dict(point=label, rounds=ROUNDS, device=torch.cuda.get_device_name())
    backward_flops = flops["fwd_bwd"] - flops["fwd"]
    for name, t in times.items():
        work = backward_flops if "bwd" in name else flops["fwd"]
        row[name] = round(work / statistics.median(t) / 1e9, 1)
    print(json.dumps(row), flush=True)
