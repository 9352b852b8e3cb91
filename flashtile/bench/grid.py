"""The standard grid: speed, memory and accuracy of every contender, one row per point of
(dtype, head dim D, causal, sequence length N).

- speed: forward and forward+backward latency and TFLOP/s, and the first call's cost, at the
  FlashAttention papers' shapes: 16k tokens a batch (B = 16384 / N), model dim 2048 (H = 2048 / D).
- memory: the peak memory one forward and one forward+backward call allocates beyond q, k, v
  and dO, at B = 1, so that FlashAttention's O(N) shows against the naive O(N^2).
- stability: max |error| of O, dQ, dK, dV against float64 (flashtile.testing's truth), for each
  contender and for PyTorch's own computation in the same precision.
"""
import torch

from ..testing import QUANTITIES, run_attention, torch_float64, torch_lowprec
from .impls import attention_fn
from .measure import failure, free_memory, measure_speed, peak_extra_mib, random_inputs, workload_flops

# The name under which the stability table lists PyTorch's own low-precision computation.
TORCH_SAME_PRECISION = "torch (same precision)"


def point(name, batch, heads, n, head_dim, causal, dtype):
    return dict(impl=name, B=batch, H=heads, N=n, D=head_dim, causal=causal, dtype=str(dtype).replace("torch.", ""))


def speed_row(name, batch, heads, n, head_dim, causal, dtype, device, cpu_reps=3):
    row = point(name, batch, heads, n, head_dim, causal, dtype)
    try:
        inputs, d_out = random_inputs(batch, heads, n, head_dim, dtype, device)
    except RuntimeError as error:  # the inputs alone do not fit
        return dict(row, error=failure(error))
    flops = workload_flops(batch, heads, n, n, head_dim, causal)
    row.update(measure_speed(attention_fn(name, causal), inputs, d_out, device, flops, cpu_reps))
    return row


def memory_row(name, batch, heads, n, head_dim, causal, dtype, device):
    """Peak extra MiB of one forward call (no grad) and of one forward+backward call."""
    row = point(name, batch, heads, n, head_dim, causal, dtype)
    try:
        fn = attention_fn(name, causal)
        (q, k, v), d_out = random_inputs(batch, heads, n, head_dim, dtype, device)
        fn(q, k, v).backward(d_out)  # compile, autotune and let SDPA pick its kernels first
        q.grad = k.grad = v.grad = None
        free_memory(device)

        def forward():
            with torch.no_grad():
                fn(q, k, v)

        row["fwd_mib"] = peak_extra_mib(forward, device)
        # The gradients are part of what a backward allocates: start from none.
        row["fwd_bwd_mib"] = peak_extra_mib(lambda: fn(q, k, v).backward(d_out), device)
    except Exception as error:  # noqa: BLE001 - any failure of the measured code is a result
        row["error"] = failure(error)
    finally:
        q = k = v = d_out = None
        free_memory(device)
    return row


def outputs_and_grads(fn, q, k, v, d_out):
    """{"out", "dq", "dk", "dv"} of fn(q, k, v) -> out, on fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, d_out)
    return dict(zip(QUANTITIES, [out.detach()] + [g.detach() for g in grads]))


def stability_rows(names, batch, heads, n, head_dim, causal, dtype, device):
    """Rows of max |x - x_f64| for x in O, dQ, dK, dV: one per contender, and one for
    PyTorch's own computation in `dtype` (the scale any low-precision kernel is judged on)."""
    everyone = (TORCH_SAME_PRECISION,) + tuple(names)
    (q, k, v), d_out = random_inputs(batch, heads, n, head_dim, dtype, device, seed=1)
    try:
        # float64 leaves, so that the gradients are float64 too.
        truth = run_attention(torch_float64, q.detach().double(), k.detach().double(), v.detach().double(),
                              causal, None, d_out.double())
    except RuntimeError as error:  # the float64 reference itself did not fit
        return [dict(point(name, batch, heads, n, head_dim, causal, dtype), error=failure(error)) for name in everyone]
    lowprec = lambda q, k, v: torch_lowprec(q, k, v, causal, None)[0]  # noqa: E731
    rows = []
    for name in everyone:
        row = point(name, batch, heads, n, head_dim, causal, dtype)
        try:
            got = outputs_and_grads(lowprec if name == TORCH_SAME_PRECISION else attention_fn(name, causal),
                                    q, k, v, d_out)
            row.update({key: (got[key].double() - truth[key]).abs().max().item() for key in QUANTITIES})
        except Exception as error:  # noqa: BLE001
            row["error"] = failure(error)
        rows.append(row)
        got = None
        free_memory(device)
    return rows
