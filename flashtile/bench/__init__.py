"""`python -m flashtile.bench` (or `flashtile-bench`): speed, memory and accuracy of flashtile's
implementations beside PyTorch's, and the model features (GQA, sliding window, softcap,
varlen) beside PyTorch's paths for the same work.

Parts (--parts), each over the grid of its mode:
- speed: forward and forward+backward latency (ms), TFLOP/s and first-call cost (compilation
  and autotuning on a new shape) over (dtype, D, causal, N), at B = 16384 / N, H = 2048 / D.
- memory: peak memory beyond q, k, v and dO of one forward and one forward+backward, B = 1.
- stability: max |error| of O, dQ, dK, dV against float64, and PyTorch's own same-precision error.
- features: GQA 32/4, a causal sliding window of 4096 at N = 16384, softcap 50, a packed
  varlen batch, each beside SDPA / FlexAttention doing the same work, in the same run.
- window_sweep: causal sliding windows of growing width at a fixed N (cost should follow width).
- training (on request, needs transformers): a small Llama trained for 100 steps with
  attn_implementation "flashtile", "sdpa" and "eager" from the same weights on the same data:
  median step time, tokens/s, peak memory, and the loss curves, flashtile's gap to sdpa's judged
  beside eager's gap to it (the noise between two correct bf16-autocast attentions).

Time is the lower of two medians of triton.testing.do_bench (CUDA events) on the GPU; FLOPs are
flashtile.reference.attention_flops, over the visible keys. A point that cannot run (OOM, an
unsupported backend, an implementation without the feature yet) is recorded with its reason
and the run goes on. Without a GPU the command runs tiny sizes on Triton's CPU interpreter:
its figures check that the benchmark runs and say nothing of GPU speed.

Writes bench.json, report.md and PNG plots to --out (default results_tmp/bench-<date-time>).

    python -m flashtile.bench                                   # every part but training, fp16
    python -m flashtile.bench --parts speed --impls v2,sdpa_flash,sdpa_cudnn --dtypes fp16,bf16
    python -m flashtile.bench --parts features,window_sweep --out results_tmp/features
    python -m flashtile.bench --parts training --out results_tmp/training
    python -m flashtile.bench --quick                           # a small grid (see --help)

Modules: measure (timer, memory, inputs, FLOPs of a workload), impls (the contenders), grid
(speed / memory / stability rows), features (the feature workloads), training (the model
runs), report (tables, JSON),
plots (PNG), cli (the command).
"""
from .cli import main
from .impls import cuda_reference_built

__all__ = ["main", "cuda_reference_built"]
