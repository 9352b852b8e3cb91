"""Where a small call's host time goes, on a GPU: microseconds per call of v2's forward+backward
and of its pieces, beside FlexAttention and two floors (an autograd Function that clones, a
Triton launch with v2's dK/dV argument count), each the best of 5 rounds of 200 back-to-back
calls with one synchronize a round (so a piece's time is its host time when its GPU work is
shorter). Then a cProfile of 300 forward+backward calls, by own time.

Usage: python3 host_breakdown.py REPO_DIR [POINT], POINT window:N:W (causal window of W keys,
H 16, B 16384/N, D 128) or tiny (B 1, H 2, N 64, D 64, causal window 256); default window:1024:256."""
import cProfile
import io
import json
import pstats
import sys
import time

sys.path.insert(0, sys.argv[1])
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import flashtile  # noqa: E402
from flashtile.bench.impls import attention_fn  # noqa: E402
from flashtile.triton_kernels import _common as C  # noqa: E402
from flashtile.triton_kernels import v2 as V  # noqa: E402

POINT = sys.argv[2] if len(sys.argv) > 2 else "window:1024:256"


def us(fn, calls=200, rounds=5):
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(rounds):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return round(best, 1)


if POINT == "tiny":
    b, h, n, d, window = 1, 2, 64, 64, 256
else:
    _, n, window = POINT.split(":")
    n, window, h, d = int(n), int(window), 16, 128
    b = max(1, 16384 // n)
q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3))
g = torch.randn_like(q)
options = dict(causal=True, window_size=(window - 1, 0))
res = {"point": POINT, "device": torch.cuda.get_device_name()}


def fwd_bwd(fn):
    def step():
        fn(q, k, v).backward(g)
        q.grad = k.grad = v.grad = None
    return step


v2_fn, flex_fn = attention_fn("v2", **options), attention_fn("flex", **options)
res["v2_fwd_bwd"] = us(fwd_bwd(v2_fn))
res["flex_fwd_bwd"] = us(fwd_bwd(flex_fn))
res["v2_fwd"] = us(lambda: v2_fn(q, k, v))
res["flex_fwd"] = us(lambda: flex_fn(q, k, v))
with torch.no_grad():
    res["v2_fwd_no_grad"] = us(lambda: v2_fn(q, k, v))
out = v2_fn(q, k, v)
res["v2_bwd_retain_graph"] = us(lambda: out.backward(g, retain_graph=True))
args = (None, None, n, n, d ** -0.5, window - 1, 0, 0.0)
res["function_fwd_bwd"] = us(fwd_bwd(lambda q, k, v: V.FlashAttentionV2Function.apply(q, k, v, *args)[0]))
problem = C.Problem.of(q, k, *args)
res["Problem.of"] = us(lambda: C.Problem.of(q, k, *args))
o, lse = V.v2_forward(q, k, v, problem)
res["v2_forward_direct"] = us(lambda: V.v2_forward(q, k, v, problem))
res["v2_backward_direct"] = us(lambda: V.v2_backward(g, q, k, v, o, lse, problem))
res["row_stats"] = us(lambda: V.v2_row_stats(o, g, lse, problem))
l2, delta = V.v2_row_stats(o, g, lse, problem)
res["dkdv"] = us(lambda: V.dkdv(q, k, v, g, l2, delta, problem))
res["empty"] = us(lambda: torch.empty(q.shape, dtype=q.dtype, device=q.device))
res["torch_add"] = us(lambda: torch.add(o, o))


class Clone(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a):
        return a.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad


res["clone_function_fwd_bwd"] = us(fwd_bwd(lambda q, k, v: Clone.apply(q)))


@triton.jit
def _touch(X, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16, a17, a18, a19,
           a20, a21, a22, a23, a24, a25, a26, a27, a28, a29, BLOCK: tl.constexpr):
    tl.store(X + tl.arange(0, BLOCK), tl.zeros([BLOCK], tl.float32))


scratch = torch.empty(128, device="cuda")
res["triton_launch_31_args"] = us(lambda: _touch[(1,)](scratch, *range(1, 31), BLOCK=128))
res["triton_launch_1_arg"] = us(lambda: _touch[(1,)](scratch, *([1] * 30), BLOCK=128))
print(json.dumps(res), flush=True)


def backward_split(function, make_out, calls=200):
    """Mean microseconds from `.backward()` to the Function's backward starting (before), inside
    it (body) and from its return to `.backward()` returning (after), and the forward's."""
    inner = function.backward
    marks = {}

    def timed(ctx, *grads):
        marks["enter"] = time.perf_counter()
        result = inner(ctx, *grads)
        marks["exit"] = time.perf_counter()
        return result

    function.backward = staticmethod(timed)
    sums = dict(forward=0.0, before=0.0, body=0.0, after=0.0)
    try:
        for i in range(calls + 20):
            start = time.perf_counter()
            out = make_out()
            called = time.perf_counter()
            out.backward(g)
            end = time.perf_counter()
            q.grad = k.grad = v.grad = None
            if i >= 20:
                for key, value in (("forward", called - start), ("before", marks["enter"] - called),
                                   ("body", marks["exit"] - marks["enter"]), ("after", end - marks["exit"])):
                    sums[key] += value
        torch.cuda.synchronize()
    finally:
        function.backward = staticmethod(inner)
    return {key: round(value / calls * 1e6, 1) for key, value in sums.items()}


split = {"point": POINT}
split["v2"] = backward_split(V.FlashAttentionV2Function, lambda: v2_fn(q, k, v))
split["clone"] = backward_split(Clone, lambda: Clone.apply(q))
print(json.dumps(split), flush=True)

profile = cProfile.Profile()
step = fwd_bwd(v2_fn)
profile.enable()
for _ in range(300):
    step()
profile.disable()
torch.cuda.synchronize()
text = io.StringIO()
pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(30)
print(text.getvalue())
