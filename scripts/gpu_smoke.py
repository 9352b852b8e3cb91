"""Quick GPU parity of every implementation against float64 (FlashAttention-2's rule).

Prints one line per case and exits non-zero on any failure. The full GPU suite is
tests/test_attention_gpu.py; this is the first thing a device run checks.
"""
import sys

import torch

import flashtile
from flashtile.reference import attention_reference


def max_errors(impl, B, H, n_q, n_k, D, causal, dtype):
    q, k, v = (torch.randn(B, H, n, D, device="cuda", dtype=dtype) for n in (n_q, n_k, n_k))
    d_out = torch.randn(B, H, n_q, D, device="cuda", dtype=dtype)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = flashtile.attention(*leaves, causal=causal, impl=impl, return_lse=True)
    grads = torch.autograd.grad(out, leaves, d_out)
    truth_leaves = [x.double().requires_grad_() for x in (q, k, v)]
    truth, truth_lse = attention_reference(*truth_leaves, causal=causal)
    truth_grads = torch.autograd.grad(truth, truth_leaves, d_out.double())
    low_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    low, _ = attention_reference(*low_leaves, causal=causal, upcast=False)
    low_grads = torch.autograd.grad(low, low_leaves, d_out)
    names = ("out", "dq", "dk", "dv")
    ours = dict(zip(names, (out,) + grads))
    theirs = dict(zip(names, (low,) + low_grads))
    exact = dict(zip(names, (truth,) + truth_grads))
    report = {}
    for name in names:
        e_ours = (ours[name].double() - exact[name]).abs().max().item()
        e_torch = (theirs[name].double() - exact[name]).abs().max().item()
        report[name] = (e_ours, e_torch)
    finite = torch.isfinite(truth_lse)
    lse_err = (lse.double()[finite] - truth_lse[finite]).abs().max().item() if finite.any() else 0.0
    lse_ok = torch.equal(torch.isinf(lse), ~finite)
    nan = any(torch.isnan(t).any().item() for t in (out, lse) + grads)
    return report, lse_err, lse_ok, nan


def main():
    torch.manual_seed(0)
    cases = [(2, 3, 1023, 1024, 64, True), (2, 3, 1024, 1023, 128, True), (1, 2, 777, 333, 40, False),
             (1, 2, 333, 777, 256, True), (2, 2, 4097, 4097, 128, False), (1, 1, 17, 1, 16, False),
             (1, 2, 1000, 200, 96, True)]
    failures = 0
    for dtype in (torch.float16, torch.bfloat16):
        for impl in flashtile.IMPLEMENTATIONS:
            for B, H, n_q, n_k, D, causal in cases:
                report, lse_err, lse_ok, nan = max_errors(impl, B, H, n_q, n_k, D, causal, dtype)
                atol = 1e-3 if dtype == torch.float16 else 8e-3
                ok = (not nan and lse_ok and lse_err < 1e-3
                      and all(e <= 2 * t + atol for e, t in report.values()))
                failures += not ok
                detail = " ".join(f"{k} {e:.2e}/{t:.2e}" for k, (e, t) in report.items())
                print(f"{'ok  ' if ok else 'FAIL'} {impl:9s} {str(dtype)[6:]:8s} B{B} H{H} Nq{n_q} Nk{n_k} "
                      f"D{D} causal={int(causal)} | ours/torch-lowprec vs f64: {detail} | lse {lse_err:.1e}",
                      flush=True)
    print(f"{failures} failures")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
