"""What differs between the two Triton lines flashtile supports: 3.2.x and 3.6.x.

The kernels are the same source under both; only these host-side details differ.
- ASTSource (ahead-of-time compile): 3.6 takes `constexprs=` and a signature that lists
  every argument; 3.2 takes `constants=` and uses the signature only for the arguments that
  are not constants.
- Tensor cores on Turing (sm_75): 3.2 lowers an fp16 `tl.dot` to `mma.sync.m16n8k8`; 3.3
  fails to compile such kernels for sm_75 and 3.4 onwards lower it to FMA only (about
  8 TFLOP/s of fp32 on a T4 instead of 65 of fp16 on its tensor cores).
- triton.autotune: 3.2's asks the GPU driver for a timer when a kernel is decorated (so
  importing the kernels fails without a GPU) and drops its `do_bench` argument; so the
  Autotuner (flashtile's subclass of it) is built here, the same way for both.
- The CPU interpreter: both need the fixes in _interpreter_fix.py, applied a little
  differently, and 3.2's one more (autotune's launch keywords).
"""
import re

import triton
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner


def _version(text: str):
    """(major, minor) of a version string such as "3.2.0" or "3.6.0+git1234"."""
    major, minor = re.match(r"(\d+)\.(\d+)", text).groups()
    return int(major), int(minor)


TRITON_VERSION = _version(triton.__version__)

# Tensor cores on a T4: torch 2.6.0's Linux wheels depend on Triton 3.2.0, so this pair
# installs without conflict (a newer torch pins a newer Triton, which its torch.compile expects).
TURING_TRITON_PIP = 'pip install "torch==2.6.0" "triton==3.2.0"'


def turing_tensor_cores(version=TRITON_VERSION) -> bool:
    """Whether this Triton lowers fp16 tl.dot to tensor-core MMA for sm_75."""
    return version <= (3, 2)


def ast_source(fn, signature: dict, constexprs: dict, multiples_of_16=()):
    """triton.compiler.ASTSource for `fn` with `signature` (every argument by name, the
    constexpr ones typed "constexpr") and the constexpr values by name. multiples_of_16: the
    arguments to declare divisible by 16 (as Triton's run-time specialisation does); only
    under 3.3+, whose attribute format this uses (3.2 compiles without them)."""
    if TRITON_VERSION >= (3, 3):
        attrs = {(fn.arg_names.index(arg),): [["tt.divisibility", 16]] for arg in multiples_of_16}
        return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return ASTSource(fn=fn, signature={name: kind for name, kind in signature.items() if name not in constexprs},
                     constants=constexprs)


def benchmark(kernel_call, quantiles):
    """The GPU driver's benchmarker (what triton.autotune times configs with), asked for on
    first use."""
    from triton.runtime import driver

    return driver.active.get_benchmarker()(kernel_call, quantiles=quantiles)


def autotune(configs, key, prune_configs_by=None, reset_to_zero=None, do_bench=benchmark,
             autotuner_class=Autotuner):
    """triton.autotune, with `autotuner_class` (a subclass of Triton's Autotuner) as the tuner
    and `do_bench(kernel_call, quantiles) -> one time per quantile` as its timer.

    Built directly rather than through triton.autotune, which always makes a plain Autotuner
    (and under 3.2 drops `do_bench`); the constructor's arguments below are those
    triton.autotune passes, in both lines. The default timer asks the GPU driver for its
    benchmarker on first use, so decorating a kernel works without a GPU (AOT compile, the
    interpreter), which 3.2's own default does not."""
    return lambda fn: autotuner_class(fn, fn.arg_names, configs, key, reset_to_zero, None,
                                      prune_configs_by=prune_configs_by, do_bench=do_bench)
