"""varlen fwd+bwd of v2 timed four ways: plain (total, H, D) leaves, the benchmark's (1, H, total, D) leaves viewed with t[0] (with and without d_out in the output's layout), and viewed with squeeze(0)."""
import json, time, torch
from triton.testing import do_bench
import flashtile
from flashtile.bench.measure import random_inputs, gradient_like, time_ms
lengths = [1024] * 3 + [10240] + [1024] * 3; total = sum(lengths); longest = max(lengths)
cu = torch.tensor([0] + [sum(lengths[:i + 1]) for i in range(len(lengths))], dtype=torch.int32, device="cuda")
q, k, v = (torch.randn(total, 16, 128, device="cuda", dtype=torch.float16).requires_grad_() for _ in range(3))
do = torch.randn_like(q)
plain = lambda: flashtile.varlen_attention(q, k, v, cu, cu, longest, longest, causal=True).backward(do)
inputs, d_out = random_inputs(1, 16, total, 128, torch.float16, "cuda")
inputs = tuple(t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in inputs)
def run(q, k, v):
    q, k, v = (t[0].transpose(0, 1) for t in (q, k, v))
    return flashtile.varlen_attention(q, k, v, cu, cu, longest, longest, causal=True).transpose(0, 1)[None]
d = gradient_like(run(*inputs), d_out)
bench = lambda: run(*inputs).backward(d)
bench_raw = lambda: run(*inputs).backward(d_out)
def run_sq(q, k, v):
    q, k, v = (t.squeeze(0).transpose(0, 1) for t in (q, k, v))
    return flashtile.varlen_attention(q, k, v, cu, cu, longest, longest, causal=True).transpose(0, 1).unsqueeze(0)
bench_sq = lambda: run_sq(*inputs).backward(d)
for name, f, g in (("plain", plain, [q, k, v]), ("bench", bench, list(inputs)), ("bench_raw_dout", bench_raw, list(inputs)), ("bench_squeeze", bench_sq, list(inputs))):
    f(); torch.cuda.synchronize()
    a = do_bench(f, warmup=25, rep=200, return_mode="median", grad_to_none=g)
    b = time_ms(f, "cuda", g)
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(50):
        f()
        for t in g: t.grad = None
    host = (time.perf_counter() - t0) / 50 * 1e3
    torch.cuda.synchronize(); thr = (time.perf_counter() - t0) / 50 * 1e3
    print(json.dumps(dict(name=name, do_bench200=round(a, 3), time_ms=round(b, 3), host_ms=round(host, 3), throughput_ms=round(thr, 3))), flush=True)
