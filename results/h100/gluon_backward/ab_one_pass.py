"""On an H100: v2_hopper_backward.py's one-pass Gluon backward against v2's two passes (v2.py) and
cuDNN, in one process, interleaved rounds. First a check of its gradients against the two passes
at odd shapes and with every feature, and that the deterministic variant repeats its bits; then
TFLOP/s (backward 2.5x the forward's FLOPs; forward+backward with v2's forward) over the issue's
grid (fp16, B = 16384/N, H = 2048/D). With BEFORE=FILE in the environment (an earlier copy of
v2_hopper_backward.py, e.g. from `git show`), its deterministic kernel is timed too, as "before_det".
Usage:
python results/h100/gluon_backward/ab_one_pass.py [ROUNDS [LABEL_PART [DTYPE [N1024,N4096,... [64,128,...]]]]] > FILE.jsonl
(head dims: 64,128 unless given; the checks are those of the head dims given)."""
import importlib.util
import json
import os
import statistics
import sys

import torch

from flashtile.bench.impls import attention_fn
from flashtile.bench.measure import random_inputs, time_ms, workload_flops
from flashtile.triton_kernels import v2, v2_hopper_backward as one_pass
from flashtile.triton_kernels._common import Problem

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 2
ONLY = sys.argv[2] if len(sys.argv) > 2 else ""
POINT_SEQS = sys.argv[4].split(",") if len(sys.argv) > 4 else ["N1024", "N4096", "N16384"]
DTYPE = getattr(torch, sys.argv[3]) if len(sys.argv) > 3 else torch.float16
HEAD_DIMS = [int(d) for d in sys.argv[5].split(",")] if len(sys.argv) > 5 else [64, 128]
CONFIGS = {64: [(128, 64, 8), (64, 64, 4), (128, 128, 8)], 128: [(128, 64, 8), (64, 64, 4)], 256: [(64, 64, 8)]}
# (blocks, deterministic)
VARIANTS = {d: [(CONFIGS[d][0], det) for det in (False, True)] for d in CONFIGS}
BEFORE = None
if os.environ.get("BEFORE"):
    spec = importlib.util.spec_from_file_location("flashtile.triton_kernels.v2_hopper_backward_before",
                                                  os.environ["BEFORE"])
    BEFORE = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(BEFORE)


def problem_of(q, k, window=(-1, -1), softcap=0.0):
    return Problem.of(q, k, None, None, None, None, q.shape[-1] ** -0.5, window[0], window[1], softcap)


def one_pass_backward(d_out, q, k, v, out, lse, problem, deterministic, blocks):
    lse2, delta = v2.v2_row_stats(out, d_out, lse, problem)
    return one_pass.v2_hopper_backward(q, k, v, d_out, lse2, delta, problem, deterministic, blocks)


def check(b, hq, hkv, nq, nk, d, window, softcap, blocks):
    (q, k, v), d_out = random_inputs(b, hq, nq, d, DTYPE, "cuda", heads_kv=hkv, n_k=nk)
    q, k, v = q.detach(), k.detach(), v.detach()
    problem = problem_of(q, k, window, softcap)
    out, lse = v2.v2_forward(q, k, v, problem)
    two = v2.v2_backward(d_out, q, k, v, out, lse, problem)
    row = dict(check=f"B{b} H{hq}/{hkv} {nq}x{nk} D{d} window{window} softcap{softcap}", blocks=blocks)
    for det in (False, True):
        grads = one_pass_backward(d_out, q, k, v, out, lse, problem, det, blocks)
        scale = max(t.abs().max().item() for t in two)
        row["det" if det else "atomic"] = max((g.float() - t.float()).abs().max().item() for g, t in zip(grads, two)) / scale
        if det:
            again = one_pass_backward(d_out, q, k, v, out, lse, problem, det, blocks)
            row["repeats_bits"] = all(torch.equal(a, g) for a, g in zip(again, grads))
            row["finite"] = all(bool(torch.isfinite(g).all()) for g in grads)
    print(json.dumps(row), flush=True)


CHECKS = [(1, 2, 2, 113, 113, 64, (-1, 0), 0.0), (2, 4, 2, 1023, 517, 128, (100, 0), 30.0),
          (1, 3, 1, 300, 1000, 64, (-1, -1), 0.0), (2, 2, 2, 1000, 300, 128, (-1, 0), 0.0),
          (1, 2, 2, 2048, 2048, 128, (256, 64), 0.0), (1, 8, 2, 1, 17, 64, (-1, -1), 50.0),
          (1, 2, 2, 113, 113, 256, (-1, 0), 0.0), (2, 4, 2, 1023, 517, 256, (100, 0), 30.0),
          (1, 3, 1, 300, 1000, 256, (-1, -1), 0.0), (2, 2, 2, 1000, 300, 256, (-1, 0), 0.0),
          (1, 8, 2, 1, 17, 256, (-1, -1), 50.0)]
if not ONLY:
    for shape in [c for c in CHECKS if c[5] in HEAD_DIMS]:
        for blocks in CONFIGS[shape[5]][:1]:
            check(*shape, blocks)

POINTS = [(f"D{d} N{n}{' causal' if c else ''}", 16384 // n, 2048 // d, n, d, c)
          for d in HEAD_DIMS for n in (1024, 4096, 16384) if f'N{n}' in POINT_SEQS for c in (False, True)]
for label, b, h, n, d, causal in POINTS:
    if ONLY not in label:
        continue
    (q, k, v), d_out = random_inputs(b, h, n, d, DTYPE, "cuda")
    problem = problem_of(q, k, (-1, 0) if causal else (-1, -1))
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    out, lse = v2.v2_forward(qd, kd, vd, problem)
    flops = workload_flops(b, h, n, n, d, causal)
    contenders = {"v2_two_pass": lambda: v2.v2_backward(d_out, qd, kd, vd, out, lse, problem)}
    for blocks, det in VARIANTS[d]:
        contenders[f"one_pass{'_det' if det else ''}_{blocks[0]}x{blocks[1]}w{blocks[2]}"] = (
            lambda det=det, blocks=blocks: one_pass_backward(d_out, qd, kd, vd, out, lse, problem, det, blocks))
    if BEFORE is not None:
        contenders["before_det"] = lambda: BEFORE.v2_hopper_backward(
            qd, kd, vd, d_out, *v2.v2_row_stats(out, d_out, lse, problem), problem, True)
    cudnn = attention_fn("sdpa_cudnn", causal)
    cudnn_out = cudnn(q, k, v)
    contenders["cudnn"] = lambda: torch.autograd.grad(cudnn_out, (q, k, v), d_out, retain_graph=True)
    times = {}
    forward = {"v2": lambda: v2.v2_forward(qd, kd, vd, problem), "cudnn": lambda: cudnn(qd, kd, vd)}
    for _ in range(ROUNDS):
        for name, fn in list(contenders.items()) + [(f"fwd_{n}", f) for n, f in forward.items()]:
            times.setdefault(name, []).append(time_ms(fn, "cuda"))
    med = {name: statistics.median(t) for name, t in times.items()}
    bwd_flops = flops["fwd_bwd"] - flops["fwd"]
    row = dict(point=label, dtype=str(DTYPE), rounds=ROUNDS, device=torch.cuda.get_device_name())
    for name in contenders:
        row[f"{name}_bwd"] = round(bwd_flops / med[name] / 1e9, 1)
        fwd = med["fwd_cudnn" if name == "cudnn" else "fwd_v2"]
        row[f"{name}_fwdbwd"] = round(flops["fwd_bwd"] / (fwd + med[name]) / 1e9, 1)
    print(json.dumps(row), flush=True)
