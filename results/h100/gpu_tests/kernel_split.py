"""Per-kernel GPU time of one forward+backward, v2 beside FlexAttention, at the paired rounds'
points (`paired_feature_rounds.py`'s names): torch.profiler over 20 calls made as do_bench
makes them (grads cleared), each kernel's total divided by 20, with the GPU's busy time per
call (the sum of the kernels) against the wall time per call (`time_ms`, do_bench median).
Wall well above busy means the call waits on the host.

Usage: python3 kernel_split.py REPO_DIR POINTS (comma-separated, e.g. window:1024:256,varlen:4096)"""
import json
import sys

sys.path.insert(0, sys.argv[1])
sys.path.insert(0, __file__.rsplit("/", 1)[0])
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from flashtile.bench.measure import gradient_like, time_ms  # noqa: E402

CALLS = 20


def split(fn, inputs, grad):
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(CALLS):
            fn(*inputs).backward(grad)
            for t in inputs:
                t.grad = None
        torch.cuda.synchronize()
    kernels = {}
    for event in prof.key_averages():
        if event.device_type.name == "CUDA" and event.device_time_total > 0:
            kernels[event.key[:70]] = round(event.device_time_total / CALLS, 1)
    return dict(sorted(kernels.items(), key=lambda kv: -kv[1]))


if __name__ == "__main__":
    from paired_feature_rounds import point_setup
    for point in sys.argv[2].split(","):
        contenders, flops = point_setup(point)
        for name, (fn, inputs, d_out) in contenders.items():
            fn(*inputs).backward(d_out)
            grad = gradient_like(fn(*inputs), d_out)
            for t in inputs:
                t.grad = None
            wall_us = 1e3 * time_ms(lambda: fn(*inputs).backward(grad), "cuda", list(inputs))
            kernels = split(fn, inputs, grad)
            print(json.dumps(dict(point=point, impl=name, wall_us=round(wall_us, 1),
                                  busy_us=round(sum(kernels.values()), 1), kernels=kernels)), flush=True)
