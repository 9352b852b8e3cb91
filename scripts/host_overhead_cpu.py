"""flashtile's own host time per call, measured on a CPU: everything a GPU call runs in Python
except Triton's JIT launch (binding, specialisation, the driver) and the kernels themselves.

    TRITON_INTERPRET=1 python scripts/host_overhead_cpu.py [--profile]

The kernels are swapped for stubs that return at once, wrapped by `autotuned` as the real ones
are, with the sm_90 config lists (so Triton's Autotuner has several configs and builds its key
on every launch as it does on a GPU). What is left is what flashtile can change: the checks in
flashtile.attention, the autograd Function, the launchers (Problem, strides, kernel arguments)
and the Autotuner layer. Then the Autotuner layer of one launch alone, Triton's against
flashtile's RememberingAutotuner. The GPU number is scripts/dispatch_overhead.py's.
"""
import argparse
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import dispatch_overhead  # noqa: E402 (this folder; after TRITON_INTERPRET, as it imports flashtile)

SHAPE = (1, 2, 16, 64)
CALLS = 2000


class StubKernel:
    """Stands in for a JITFunction under the Autotuner: the same argument names, a run that
    launches nothing."""

    def __init__(self, jit_function):
        self.fn = jit_function.fn  # the Python function (the Autotuner looks for it)
        self.arg_names = jit_function.arg_names

    def run(self, *args, grid, warmup, **kwargs):
        grid(kwargs)  # as JITFunction.run sizes the launch (kwargs hold the config's blocks)
        self.last_call = (args, grid, kwargs)


def stub_kernels():
    """v2's kernels replaced by stubs, the autotuned ones under `autotuned` with the sm_90 configs
    and a timer that runs each config once and calls them all equal (so the first one wins)."""
    from flashtile.triton_kernels import _common, v2

    _common.device_capability = lambda device=None: 90
    specs = {"_v2_forward_kernel": ("forward", {}),
             "_v2_dkdv_kernel": ("backward", dict(owned="BLOCK_N", looped="BLOCK_M", reset_to_zero=["DQ"])),
             "_v2_dq_kernel": ("backward", {})}
    for name, (kind, options) in specs.items():
        stub = _common.autotuned(kind, **options)(StubKernel(getattr(v2, name).fn))
        # An instance attribute: Triton 3.6's do_bench is a cached_property, 3.2's an attribute.
        stub.do_bench = lambda kernel_call, quantiles: (kernel_call(), [1.0, 1.0, 1.0])[1]
        setattr(v2, name, stub)
    # The row pass is a plain JIT function: a stub with its launch syntax.
    v2._v2_row_stats_kernel = type("Launch", (), {"__getitem__": lambda self, grid: lambda *a, **k: None})()


def microseconds_per_call(fn):
    """dispatch_overhead.py's timer (best of its rounds), on the CPU, CALLS calls a round."""
    return dispatch_overhead.microseconds_per_call(fn, "cpu", calls=CALLS)


def autotuner_layer():
    """The Autotuner layer alone, per launch on a cache hit: Triton's Autotuner and flashtile's
    RememberingAutotuner over the same stub, with the arguments of the last dK/dV launch."""
    try:
        from flashtile.triton_kernels import _launch
    except ImportError:  # a flashtile from before RememberingAutotuner
        return
    from triton.runtime.autotuner import Autotuner
    from flashtile.triton_kernels import _compat, v2

    tuned = v2._v2_dkdv_kernel
    args, grid, kwargs = tuned.fn.last_call
    config_names = set(tuned.configs[0].all_kwargs())
    kwargs = {name: value for name, value in kwargs.items() if name not in config_names}
    print("  the Autotuner layer of one dK/dV launch, cache hit (the stub's run included):")
    for cls in (Autotuner, _launch.RememberingAutotuner):
        kernel = _compat.autotune(tuned.configs, tuned.keys, reset_to_zero=["DQ"], autotuner_class=cls)(tuned.fn)
        kernel.do_bench = tuned.do_bench
        print(f"    {cls.__name__:24} {microseconds_per_call(lambda: kernel[grid](*args, **kwargs)):7.1f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", action="store_true", help="then cProfile of the forward+backward call")
    args = parser.parse_args()
    stub_kernels()
    import flashtile
    from flashtile.registry import REGISTRY

    q, k, v = (torch.randn(SHAPE, dtype=torch.float16, requires_grad=True) for _ in range(3))
    d_out = torch.randn_like(q)
    function = REGISTRY["v2"].load()
    n, scale = SHAPE[2], SHAPE[3] ** -0.5

    def forward_backward_function():
        function.apply(q, k, v, None, None, n, n, scale, -1, 0, 0.0)[0].backward(d_out)

    def forward_backward():
        flashtile.attention(q, k, v, causal=True).backward(d_out)

    print(f"v2 {SHAPE}, stub kernels, us per call (best of {dispatch_overhead.ROUNDS} x {CALLS}):")
    with torch.no_grad():
        forward = microseconds_per_call(lambda: flashtile.attention(q, k, v, causal=True))
    print(f"  attention forward          {forward:7.1f}")
    print(f"  Function fwd+bwd           {microseconds_per_call(forward_backward_function):7.1f}")
    print(f"  attention fwd+bwd          {microseconds_per_call(forward_backward):7.1f}")
    autotuner_layer()
    if args.profile:
        dispatch_overhead.profile_host_time("v2", "cpu", torch.float16, SHAPE, CALLS)


if __name__ == "__main__":
    main()
