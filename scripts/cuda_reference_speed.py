"""The CUDA reference's speed at N = 4096 (it is written for clarity, not speed; recorded
so that its cost is known). Prints a markdown table: forward and forward + backward
milliseconds and TFLOP/s (FLOPs as flashtile.attention_flops counts them), B = 2, H = 8,
fp16, D = 64 and 128, causal and not. Median of CUDA-event timings after a warm-up.
"""
import statistics

import torch

import flashtile

B, H, N = 2, 8, 4096


def median_ms(fn, reps=5):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main():
    print(f"CUDA reference (impl='cuda') on {torch.cuda.get_device_name()}, B={B} H={H} N={N}, fp16")
    print("| D | causal | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |")
    print("|---|---|---|---|---|---|")
    for D in (64, 128):
        for causal in (False, True):
            gen = torch.Generator(device="cuda").manual_seed(0)
            q, k, v, d_out = (torch.randn(B, H, N, D, generator=gen, device="cuda").half() for _ in range(4))
            leaves = [t.requires_grad_() for t in (q, k, v)]
            fwd = median_ms(lambda: flashtile.attention(*leaves, causal=causal, impl="cuda"))

            def fwd_bwd():
                out = flashtile.attention(*leaves, causal=causal, impl="cuda")
                torch.autograd.grad(out, leaves, d_out)

            both = median_ms(fwd_bwd)
            f = flashtile.attention_flops(B, H, N, N, D, causal, "fwd")
            fb = flashtile.attention_flops(B, H, N, N, D, causal, "fwd_bwd")
            print(f"| {D} | {causal} | {fwd:.2f} | {f / fwd / 1e9:.2f} | {both:.2f} | {fb / both / 1e9:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
