"""What scripts/sanitize.sh runs under compute-sanitizer: forward and backward at small odd
shapes, for the CUDA reference ("cuda") or the Triton kernels ("triton") or both ("all").

Tiny shapes on purpose (the sanitizers slow kernels down 10-100x): partial tiles, Nq > Nk
with rows that see no key, Nq < Nk, D = 1, odd D and D = 256, strided layouts, each dtype.
Prints one line per case and "sanitize target done" at the end.
"""
import sys

import torch

import flashtile

sys.path.insert(0, "tests")
from conftest import make_grad_out, make_qkv  # noqa: E402

# (B, H, Nq, Nk, D, causal, layout)
CASES = [
    (1, 1, 1, 1, 1, False, "contiguous"),
    (1, 2, 37, 70, 7, True, "bnhd"),
    (2, 1, 70, 37, 40, True, "sliced"),
    (1, 1, 9, 33, 256, False, "mixed"),
    (1, 2, 33, 17, 96, False, "contiguous"),
    (1, 1, 65, 65, 128, True, "bnhd"),
]


def run(impl, dtype, case):
    B, H, n_q, n_k, D, causal, layout = case
    q, k, v = make_qkv(B, H, n_q, n_k, D, dtype, device="cuda", layout=layout, seed=D, requires_grad=True)
    d_out = make_grad_out(B, H, n_q, D, dtype, device="cuda", seed=D + 1)
    out, lse = flashtile.attention(q, k, v, causal=causal, impl=impl, return_lse=True)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), d_out)
    torch.cuda.synchronize()
    bad = [name for name, t in (("out", out), ("lse", lse), ("dq", dq), ("dk", dk), ("dv", dv)) if t.isnan().any()]
    print(f"{impl:9s} {str(dtype)[6:]:8s} {case}: {'NaN in ' + ', '.join(bad) if bad else 'ok'}", flush=True)
    return not bad


def main():
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    impls = {"cuda": ["cuda"], "triton": ["v1", "v2", "v2_atomic"], "all": ["cuda", "v1", "v2", "v2_atomic"]}[which]
    ok = True
    for impl in impls:
        dtypes = [torch.float16, torch.bfloat16] + ([torch.float32] if impl == "cuda" else [])
        for dtype in dtypes:
            for case in CASES:
                ok &= run(impl, dtype, case)
    print("sanitize target done" if ok else "sanitize target: NaN found", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
