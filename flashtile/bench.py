"""`python -m flashtile.bench`: latency and TFLOP/s of every implementation beside PyTorch SDPA.

Shapes follow the FlashAttention papers: 16k tokens a batch (B = 16384 / N) and model
dim 2048 (H = 2048 / D). FLOPs: forward 4 B H Nq Nk D, halved when causal; the backward
counts 2.5x the forward, so forward+backward is 3.5x (flashtile.reference.attention_flops).
Times are medians of triton.testing.do_bench, after warm-up (and so after autotuning).

    python -m flashtile.bench                       # the default grid, markdown table
    python -m flashtile.bench --quick --out results # a tiny grid, JSON under results/
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch

from .reference import attention_flops

FLASHTILE_IMPLS = ("v1", "v2", "v2_atomic")
SDPA_BACKENDS = ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient")


def attention_callable(name, causal):
    """f(q, k, v) -> out for one implementation name."""
    import torch.nn.functional as F

    if name in FLASHTILE_IMPLS:
        import flashtile

        return lambda q, k, v: flashtile.attention(q, k, v, causal=causal, impl=name)
    if name in SDPA_BACKENDS:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
                   "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION}[name]

        def sdpa(q, k, v):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return sdpa
    raise ValueError(f"unknown implementation {name!r}")


def time_ms(fn, grad_tensors=None):
    """Median milliseconds of fn() over do_bench's repetitions (CUDA events)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median", grad_to_none=grad_tensors)


def measure(name, batch, heads, n, head_dim, causal, dtype, device="cuda"):
    """One row: forward and forward+backward latency and TFLOP/s, or the error that stopped it."""
    row = dict(impl=name, B=batch, H=heads, N=n, D=head_dim, causal=causal, dtype=str(dtype).replace("torch.", ""))
    q, k, v = (torch.randn(batch, heads, n, head_dim, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    d_out = torch.randn_like(q)
    fn = attention_callable(name, causal)
    try:
        fn(q, k, v).backward(d_out)  # warm-up: compile and autotune outside the timing
        fwd = time_ms(lambda: fn(q, k, v))
        fwd_bwd = time_ms(lambda: fn(q, k, v).backward(d_out), grad_tensors=[q, k, v])
    except torch.cuda.OutOfMemoryError:
        row["error"] = "OOM"
        return row
    except RuntimeError as error:  # e.g. an SDPA backend that does not take this shape
        row["error"] = str(error).splitlines()[0][:160]
        return row
    finally:
        del q, k, v, d_out
        torch.cuda.empty_cache()
    flops = dict(fwd=attention_flops(batch, heads, n, n, head_dim, causal, "fwd"),
                 fwd_bwd=attention_flops(batch, heads, n, n, head_dim, causal, "fwd_bwd"))
    row.update(fwd_ms=fwd, fwd_bwd_ms=fwd_bwd,
               fwd_tflops=flops["fwd"] / fwd / 1e9, fwd_bwd_tflops=flops["fwd_bwd"] / fwd_bwd / 1e9)
    return row


def environment():
    import triton

    # FLASHTILE_COMMIT names the commit where the tree was copied without .git (the device tool).
    commit = os.environ.get("FLASHTILE_COMMIT", "")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                    cwd=os.path.dirname(__file__)).stdout.strip()
        except OSError:
            pass
    return dict(gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
                torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                python=platform.python_version(), commit=commit or "unknown",
                date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                portable=os.environ.get("FLASHTILE_PORTABLE", "0") == "1")


def markdown_table(rows):
    """One line per (D, causal, N, dtype): forward / forward+backward TFLOP/s per implementation."""
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    cases = list(dict.fromkeys((r["dtype"], r["D"], r["causal"], r["N"]) for r in rows))
    by_key = {(r["impl"], r["dtype"], r["D"], r["causal"], r["N"]): r for r in rows}
    lines = ["| dtype | D | causal | N | " + " | ".join(impls) + " |",
             "|" + "---|" * (4 + len(impls))]
    for case in cases:
        cells = []
        for impl in impls:
            r = by_key.get((impl,) + case)
            if r is None:
                cells.append("-")
            elif "error" in r:
                cells.append("OOM" if r["error"] == "OOM" else "n.a.")
            else:
                cells.append(f"{r['fwd_tflops']:.0f} / {r['fwd_bwd_tflops']:.0f}")
        dtype, d, causal, n = case
        lines.append(f"| {dtype} | {d} | {int(causal)} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impls", default=",".join(FLASHTILE_IMPLS + SDPA_BACKENDS))
    parser.add_argument("--seqs", default="1024,2048,4096,8192,16384")
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--causal", default="0,1", help="0, 1 or 0,1")
    parser.add_argument("--dtypes", default="fp16", help="fp16, bf16 or fp16,bf16")
    parser.add_argument("--tokens", type=int, default=16384, help="B * N")
    parser.add_argument("--model-dim", type=int, default=2048, help="H * D")
    parser.add_argument("--quick", action="store_true", help="a tiny grid: N 1024 and 2048, D 64")
    parser.add_argument("--out", default=None, help="directory for bench.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("flashtile.bench times GPU kernels and needs a CUDA device")
    if args.quick:
        args.seqs, args.head_dims = "1024,2048", "64"
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
    rows = []
    for dtype_name in args.dtypes.split(","):
        for head_dim in (int(x) for x in args.head_dims.split(",")):
            for causal in (bool(int(x)) for x in args.causal.split(",")):
                for n in (int(x) for x in args.seqs.split(",")):
                    batch, heads = max(1, args.tokens // n), args.model_dim // head_dim
                    for impl in args.impls.split(","):
                        row = measure(impl, batch, heads, n, head_dim, causal, dtypes[dtype_name])
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    table = markdown_table(rows)
    print("\nforward / forward+backward TFLOP/s\n")
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench.json"), "w") as f:
            json.dump(dict(environment=environment(), rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
