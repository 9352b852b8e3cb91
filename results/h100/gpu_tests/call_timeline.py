"""Where the critical path of one small forward+backward runs: host or GPU. torch.profiler
(CPU and CUDA) over calls made as do_bench makes them (grads cleared, an L2 flush before
each), v2 beside FlexAttention at the paired rounds' points. For the last call, each kernel
launch's host time and each kernel's GPU start and end, in microseconds from the call's
start; a kernel that starts right after its launch waited on the host.

Usage: python3 call_timeline.py REPO_DIR POINTS (comma-separated, paired_feature_rounds.py's names)"""
import json
import sys

sys.path.insert(0, sys.argv[1])
sys.path.insert(0, __file__.rsplit("/", 1)[0])
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from flashtile.bench.measure import gradient_like  # noqa: E402
from paired_feature_rounds import point_setup  # noqa: E402

CALLS = 6


def timeline(fn, inputs, grad):
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(CALLS):
            for t in inputs:
                t.grad = None
            flush.zero_()
            with record_function(f"call{i}"):
                fn(*inputs).backward(grad)
        torch.cuda.synchronize()
    events = prof.events()
    call = [e for e in events if e.name == f"call{CALLS - 1}"][0]
    t0, t1 = call.time_range.start, call.time_range.end
    launches = [e for e in events if e.device_type.name == "CPU" and "LaunchKernel" in e.name
                and t0 <= e.time_range.start <= t1]
    first_launch = min(e.time_range.start for e in launches)
    kernels = sorted([e for e in events if e.device_type.name == "CUDA" and e.time_range.start >= first_launch],
                     key=lambda e: e.time_range.start)
    launch_starts = sorted(e.time_range.start for e in launches)
    return dict(host_call_us=round(t1 - t0, 1),
                launches_us=[round(start - t0, 1) for start in launch_starts],
                kernels=[(e.name[:40], round(e.time_range.start - t0, 1), round(e.time_range.end - t0, 1))
                         for e in kernels])


if __name__ == "__main__":
    for point in sys.argv[2].split(","):
        contenders, _ = point_setup(point)
        for name, (fn, inputs, d_out) in contenders.items():
            fn(*inputs).backward(d_out)
            grad = gradient_like(fn(*inputs), d_out)
            for t in inputs:
                t.grad = None
            for _ in range(20):
                fn(*inputs).backward(grad)
            print(json.dumps(dict(point=point, impl=name, **timeline(fn, inputs, grad))), flush=True)
