"""Host microseconds per call of the pieces of v2's forward+backward, on a GPU, at a tiny shape
(B 1, H 2, N 64, D 64, causal window 256): the best of 5 rounds of 300 back-to-back calls, one
synchronize a round. Usage: python3 host_split_tiny.py REPO_DIR, REPO_DIR a tree before `ac1c56a`
(it times the side stream's fork_stream, removed there)."""
import sys, time, json
sys.path.insert(0, sys.argv[1])
import torch
import flashtile
from flashtile.triton_kernels import v2 as V, _common as C

def us(fn, calls=300, rounds=5):
    fn(); torch.cuda.synchronize()
    best = 1e9
    for _ in range(rounds):
        torch.cuda.synchronize(); t = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize(); best = min(best, (time.perf_counter() - t) / calls * 1e6)
    return round(best, 1)

q, k, v = (torch.randn(1, 2, 64, 64, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3))
g = torch.randn_like(q)
opts = dict(causal=True, window_size=(255, 0))
out = flashtile.attention(q, k, v, **opts)
res = {}
res["fwd"] = us(lambda: flashtile.attention(q, k, v, **opts))
def fb():
    flashtile.attention(q, k, v, **opts).backward(g); q.grad = k.grad = v.grad = None
res["fwd_bwd"] = us(fb)
out = flashtile.attention(q, k, v, **opts)
res["bwd_retain"] = us(lambda: out.backward(g, retain_graph=True))
fn = V.FlashAttentionV2Function
problem = C.Problem.of(q, k, None, None, 64, 64, 0.125, 255, 0, 0.0)
o, lse = V.v2_forward(q, k, v, problem)
res["Problem.of"] = us(lambda: C.Problem.of(q, k, None, None, 64, 64, 0.125, 255, 0, 0.0))
res["v2_backward_direct"] = us(lambda: V.v2_backward(g, q, k, v, o, lse, problem))
res["row_stats"] = us(lambda: V.v2_row_stats(o, g, lse, problem))
l2, d = V.v2_row_stats(o, g, lse, problem)
res["dkdv"] = us(lambda: V.dkdv(q, k, v, g, l2, d, problem))
def fj():
    s = C.fork_stream(q.device)
    with C.on_stream(s):
        pass
    C.join_stream(s, q.device)
res["fork_on_join"] = us(fj)
res["empty"] = us(lambda: torch.empty(q.shape, dtype=q.dtype, device=q.device))
F = C.fork_stream
C.fork_stream = lambda device: None
V.fork_stream = C.fork_stream
res["v2_backward_one_stream"] = us(lambda: V.v2_backward(g, q, k, v, o, lse, problem))
res["fwd_bwd_one_stream"] = us(fb)
V.fork_stream = C.fork_stream = F
def bare_autograd():
    x = q.detach().requires_grad_()
    class Id(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a): return a.clone()
        @staticmethod
        def backward(ctx, ga): return ga
    Id.apply(x).backward(g)
res["autograd_clone_fwd_bwd"] = us(bare_autograd)
print(json.dumps(res))
