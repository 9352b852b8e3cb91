"""Paired rounds, flashtile v2 against FlexAttention on the same work: each round times both
back to back with the benchmark's own timer (`flashtile.bench.measure.time_ms`, do_bench
medians, grads cleared), the order alternating from round to round, so that a drift of the
clock or of the machine hits both sides of a round alike. Prints one JSON line per round and
a summary per point: the median and range of the per-round ratios and the rounds v2 won.

Usage: python3 paired_feature_rounds.py REPO_DIR [ROUNDS] [POINTS]
POINTS, comma-separated: window4096 (issue 11's point), window2048, window8192,
window4096_bf16, gqa, softcap, varlen (the benchmark's features at N 16384, D 128), or
KIND:N[:W] at another length, 16384 tokens a batch (B = 16384 / N), fp16, D 128:
window:N:W (causal window of W keys, H 16), gqa:N (Hq 32, Hkv 4, causal), softcap:N (H 16,
causal, softcap 50), varlen:N (the benchmark's packed batch of N tokens, H 16)."""
import json
import statistics
import sys

sys.path.insert(0, sys.argv[1])
import torch  # noqa: E402

from flashtile.bench.cli import GRIDS  # noqa: E402
from flashtile.bench.features import SOFTCAP, FeatureSizes, varlen_contenders, varlen_inputs  # noqa: E402
from flashtile.bench.impls import attention_fn  # noqa: E402
from flashtile.bench.measure import (gradient_like, packed_flops, random_inputs, time_ms,  # noqa: E402
                                     workload_flops)

# name -> (batch, heads_q, heads_kv, n, d, dtype, options)
DENSE = {
    "window4096": (1, 16, 16, 16384, 128, torch.float16, dict(causal=True, window_size=(4095, 0))),
    "window2048": (1, 16, 16, 16384, 128, torch.float16, dict(causal=True, window_size=(2047, 0))),
    "window8192": (1, 16, 16, 16384, 128, torch.float16, dict(causal=True, window_size=(8191, 0))),
    "window4096_bf16": (1, 16, 16, 16384, 128, torch.bfloat16, dict(causal=True, window_size=(4095, 0))),
    "gqa": (1, 32, 4, 16384, 128, torch.float16, dict(causal=True)),
    "softcap": (4, 16, 16, 4096, 128, torch.float16, dict(causal=True, softcap=SOFTCAP)),
}


def dense_point(spec):
    """DENSE's entry for KIND:N[:W]."""
    kind, n, *width = spec.split(":")
    n = int(n)
    b = max(1, 16384 // n)
    if kind == "window":
        return b, 16, 16, n, 128, torch.float16, dict(causal=True, window_size=(int(width[0]) - 1, 0))
    if kind == "gqa":
        return b, 32, 4, n, 128, torch.float16, dict(causal=True)
    if kind == "softcap":
        return b, 16, 16, n, 128, torch.float16, dict(causal=True, softcap=SOFTCAP)
    raise ValueError(f"unknown point {spec!r}: see the usage above")


def point_setup(point):
    """({name: (fn, inputs, d_out)} for v2 and flex, flops) of one point."""
    if point.split(":")[0] == "varlen":
        sizes = GRIDS["gpu"]["features"]
        if ":" in point:
            sizes = FeatureSizes(int(point.split(":")[1]), sizes.head_dim, sizes.heads, sizes.gqa_heads, sizes.window)
        inputs, d_out = varlen_inputs(sizes, "packed", torch.float16, "cuda")  # both run the packed batch
        return ({name: (fn, inputs, d_out) for name, _, fn, _ in varlen_contenders(sizes, ("v2", "flex"), "cuda")},
                packed_flops(sizes.varlen_lengths(), sizes.heads, sizes.head_dim, causal=True))
    b, hq, hkv, n, d, dtype, options = DENSE[point] if point in DENSE else dense_point(point)
    inputs, d_out = random_inputs(b, hq, n, d, dtype, "cuda", heads_kv=hkv)
    flops = workload_flops(b, hq, n, n, d, options.get("causal", False), options.get("window_size", (-1, -1)))
    return {name: (attention_fn(name, **options), inputs, d_out) for name in ("v2", "flex")}, flops


if __name__ == "__main__":
    ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 12
    for point in (sys.argv[3].split(",") if len(sys.argv) > 3 else ["window4096"]):
        contenders, flops = point_setup(point)
        grads = {}
        for name, (fn, inputs, d_out) in contenders.items():  # compile, autotune; d_out in the output's layout
            fn(*inputs).backward(d_out)
            grads[name] = gradient_like(fn(*inputs), d_out)
            for t in inputs:
                t.grad = None
        ratios, times = {"fwd": [], "fwd_bwd": []}, {}
        for rnd in range(ROUNDS):
            order = ("v2", "flex") if rnd % 2 == 0 else ("flex", "v2")
            ms = {}
            for name in order:
                fn, inputs, _ = contenders[name]
                ms[name, "fwd"] = time_ms(lambda: fn(*inputs), "cuda")
                ms[name, "fwd_bwd"] = time_ms(lambda: fn(*inputs).backward(grads[name]), "cuda", list(inputs))
            for key, t in ms.items():
                times.setdefault(key, []).append(t)
            for mode in ratios:
                ratios[mode].append(ms["flex", mode] / ms["v2", mode])  # > 1: v2 faster
            print(json.dumps(dict(point=point, round=rnd, order=order,
                                  **{f"{name}_{mode}_ms": round(t, 4) for (name, mode), t in ms.items()})), flush=True)
        summary = dict(point=point, rounds=ROUNDS, device=torch.cuda.get_device_name())
        for mode, r in ratios.items():
            summary[f"{mode}_v2_over_flex_median"] = round(statistics.median(r), 4)
            summary[f"{mode}_v2_over_flex_range"] = [round(min(r), 4), round(max(r), 4)]
            summary[f"{mode}_rounds_v2_faster"] = sum(x > 1 for x in r)
            for name in contenders:
                summary[f"{name}_{mode}_tflops_median"] = round(flops[mode] / statistics.median(times[name, mode]) / 1e9, 1)
        print(json.dumps(summary), flush=True)
