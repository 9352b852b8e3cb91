"""One forward+backward under cudaProfilerStart/Stop (for ncu --profile-from-start off)."""
import sys, torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
import flashtile
impl, causal, n, d = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
b, h = 1, 2048 // d
g = torch.Generator(device="cuda").manual_seed(0)
q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.float16, generator=g).requires_grad_() for _ in range(3))
do = torch.randn_like(q)
def step():
    if impl == "cudnn":
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    else:
        o = flashtile.attention(q, k, v, causal=causal, impl=impl)
    o.backward(do)
for _ in range(3):
    step()
torch.cuda.synchronize()
torch.cuda.profiler.start()
step()
torch.cuda.synchronize()
torch.cuda.profiler.stop()
