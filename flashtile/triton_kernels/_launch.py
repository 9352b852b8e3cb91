"""The host side of a launch, made cheap: at small shapes it, not the GPU, sets the pace.

An attention call at a small shape runs a few microseconds of GPU work behind about a
millisecond of Python (scripts/dispatch_overhead.py measures it on a GPU,
scripts/host_overhead_cpu.py the part flashtile controls, on any machine). The largest
pieces were Triton's generic helpers, replaced here by narrower ones that give the same
results:
- Triton's Autotuner rebuilds its cache key from every argument on every launch;
  RememberingAutotuner keys on what flashtile's launchers already know.
- Triton's JITFunction.run specialises every argument, builds a cache key and looks up the
  compiled kernel on every launch (49 us for v2's dK/dV launch on the H100's host, of which
  the launch itself is 11: results/h100/gpu_tests/launch_pieces.py); DirectLaunches
  launches a compiled kernel again directly when every argument but the tensors' addresses
  is the same as before.
- triton.next_power_of_2 and triton.cdiv are constexpr_functions in Triton 3.6, whose
  argument unwrapping costs microseconds a call on the host; next_power_of_2 and cdiv are
  plain integer arithmetic.

Nothing here touches a kernel: the same kernels compile to the same code with the same configs.
"""
import os

import torch
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, KernelInterface

from . import _compat

if _compat.TRITON_VERSION == (3, 6):
    from triton import knobs
    from triton.runtime import driver


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n, for n >= 1 (triton.next_power_of_2's value)."""
    return 1 << (n - 1).bit_length()


def cdiv(n: int, block: int) -> int:
    """ceil(n / block) (triton.cdiv's value)."""
    return (n + block - 1) // block


def _hooked(hooks) -> bool:
    """Whether a Triton launch hook (a profiler's) is set: Triton 3.6 keeps an empty HookChain."""
    return hooks is not None and not (isinstance(hooks, knobs.HookChain) and not hooks.calls)


class DirectLaunches:
    """Launches of one JITFunction, remembered so that a repeat skips JITFunction.run.

    JITFunction.run (Triton 3.6) binds the arguments, specialises each (a tensor by dtype and
    16-byte alignment, an integer by being 1 or a multiple of 16), builds a key from the
    specialisation and the options, finds the compiled kernel, sizes the grid and calls
    `kernel.run(grid, stream, function, metadata, hooks, *bound arguments)`. Here the key is
    stricter: every non-tensor argument's value, positional and by keyword, and each tensor's
    dtype and 16-byte alignment, on the current device (`key`). Equal keys mean equal
    specialisations, so the kernel, and every bound argument after the positional ones, are
    those of the launch that recorded the key; the grid is sized again from them (a grid
    function may read what the arguments do not hold, such as the batch size); the positional
    arguments, tensors included, are this launch's. So a replay launches exactly what
    JITFunction.run would.

    The launchers' contract: tensors positional (RememberingAutotuner checks it), and one
    Python type per argument (True and 1 are equal keys but not equal specialisations).
    Off under the interpreter, with a Triton launch hook (a profiler's) or debug mode set, under another
    Triton than 3.6, and with FLASHTILE_DIRECT_LAUNCH=0."""

    LIMIT = 4096  # recorded launches per kernel; past it the record starts again (shapes that never repeat)

    def __init__(self, fn):
        self.fn = fn
        self.recorded = {}
        self.tensors = None  # how many leading positional arguments are tensors (the first record's)
        self.enabled = (_compat.TRITON_VERSION == (3, 6) and isinstance(fn, JITFunction)
                        and os.environ.get("FLASHTILE_DIRECT_LAUNCH", "1") != "0")

    def key(self, args, kwargs):
        """The launch's key (kwargs without grid and warmup), or None when replays are off:
        (device, keyword arguments, the leading tensors' dtypes and alignments, the other
        positional arguments). A launcher passes its tensors first, so the key is built
        without a type check per argument; one whose layout differs gets no key (a non-tensor
        among the leading ones) or is not recorded (a tensor after them, or by keyword)."""
        if not self.enabled or knobs.runtime.debug or _hooked(knobs.runtime.launch_enter_hook) \
                or _hooked(knobs.runtime.launch_exit_hook):
            return None
        n = self.tensors
        if n is None:
            n = next((i for i, arg in enumerate(args) if not isinstance(arg, torch.Tensor)), len(args))
        try:
            tensors = tuple([(t.dtype, t.data_ptr() % 16 == 0) for t in args[:n]])
        except AttributeError:
            return None
        return driver.active.get_current_device(), tuple(kwargs.items()), tensors, args[n:]

    def replay(self, args, kwargs, grid, warmup):
        """(key, kernel): launch the kernel recorded under this launch's key with its positional
        arguments and grid and return it; kernel None (nothing launched) when none was
        recorded, and then `record` takes the key (None: replays are off)."""
        key = None if warmup else self.key(args, kwargs)
        recorded = None if key is None else self.recorded.get(key)
        if recorded is None:
            return key, None
        kernel, scalars, rest = recorded
        grid = grid(scalars) if callable(grid) else grid
        grid_y = grid[1] if len(grid) > 1 else 1
        grid_z = grid[2] if len(grid) > 2 else 1
        kernel.run(grid[0], grid_y, grid_z, driver.active.get_current_stream(key[0]), kernel.function,
                   kernel.packed_metadata, None, None, None, *args, *rest)  # no hooks: no launch metadata
        return key, kernel

    def record(self, key, args, kwargs, kernel):
        """Remember the launch JITFunction.run just made of `kernel` (its result) with `args`
        and `kwargs` (the config's included)."""
        if key is None or kernel is None or not hasattr(kernel, "packed_metadata"):
            return
        if any(isinstance(value, torch.Tensor) for value in key[3]):
            return  # a tensor after the leading ones: it would be keyed by identity
        binder = self.fn.device_caches[key[0]][4]
        bound, _, _ = binder(*args, **kwargs, debug=kwargs.get("debug", self.fn.debug) or knobs.runtime.debug,
                             instrumentation_mode=knobs.compilation.instrumentation_mode)
        values = list(bound.values())
        rest = values[len(args):]
        if any(value is not arg for value, arg in zip(values, args)) or any(isinstance(v, torch.Tensor) for v in rest):
            return  # not bound in order, or a tensor by keyword: leave this launch to JITFunction.run
        self.tensors = len(key[2])
        if len(self.recorded) >= self.LIMIT:
            self.recorded.clear()
        # What the grid function reads, without the tensors: the record must not keep them alive.
        scalars = {name: value for name, value in bound.items() if not isinstance(value, torch.Tensor)}
        self.recorded[key] = (kernel, scalars, rest)


class DirectKernel(KernelInterface):
    """A JIT kernel without an autotuner, launched through DirectLaunches:
    `DirectKernel(triton.jit(fn))[grid](*args, **kwargs)`."""

    def __init__(self, fn):
        self.fn = fn
        self.arg_names = fn.arg_names
        self.direct = DirectLaunches(fn)

    def run(self, *args, grid, warmup, **kwargs):
        key, kernel = self.direct.replay(args, kwargs, grid, warmup)
        if kernel is not None:
            return kernel
        kernel = self.fn.run(*args, grid=grid, warmup=warmup, **kwargs)
        self.direct.record(key, args, kwargs, kernel)
        return kernel


class RememberingAutotuner(Autotuner):
    """Triton's Autotuner, plus a dict from a cheap key to the config it chose.

    Triton's Autotuner.run builds its cache key on every launch from every argument (a dict of
    all ~40, a membership test in the list of names, hasattr(arg, "dtype") and str(dtype) for
    each): tens of microseconds per launch, three launches per forward and backward. Here the
    key is the autotune key's arguments (the launchers pass them by keyword) and the dtypes of
    the tensors (passed positionally): all that Triton's key holds, so two launches with one
    cheap key have one Triton key. The first launch of a cheap key goes through Triton's run,
    which chooses the config (by timing, or from its memory or disk cache) and launches; the
    config is remembered. Later launches of that key call the kernel as Triton's run would
    with that config, `fn.run(*args, **kwargs, **config.all_kwargs())`, skipping only the key.
    So the config that runs for a key is Triton's choice, and FLASHTILE_AUTOTUNE=0 (which
    prunes the choice to the first shipped config) is kept too.

    Launches with a remembered config are recorded by DirectLaunches, and a launch whose
    arguments repeat a recorded one's is replayed before any key is built here.

    The launchers' contract, checked at the first launch of each key: tensors positional, the
    key's arguments by keyword (a missing one is a KeyError)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.remembered = {}  # cheap key -> (config, config.all_kwargs())
        self.direct = DirectLaunches(self.fn)

    def run(self, *args, grid, warmup, **kwargs):
        direct_key, kernel = self.direct.replay(args, kwargs, grid, warmup)
        if kernel is not None:
            return kernel
        key = (tuple([kwargs[name] for name in self.keys]),
               tuple([arg.dtype for arg in args if isinstance(arg, torch.Tensor)]))
        remembered = self.remembered.get(key)
        if remembered is None:
            return self._choose_and_launch(key, *args, grid=grid, warmup=warmup, **kwargs)
        config, config_kwargs = remembered
        self.best_config = config  # as Triton's run leaves it
        kernel = self.fn.run(*args, grid=grid, warmup=warmup, **kwargs, **config_kwargs)
        self.direct.record(direct_key, args, {**kwargs, **config_kwargs}, kernel)
        return kernel

    def _choose_and_launch(self, key, *args, **kwargs):
        tensor_keywords = [name for name, value in kwargs.items() if isinstance(value, torch.Tensor)]
        if tensor_keywords:  # its dtype would be missing from the cheap key
            raise TypeError(f"{self.base_fn.__name__}: pass tensors positionally, not by keyword: {tensor_keywords}")
        result = super().run(*args, **kwargs)
        config = self.best_config
        if config.pre_hook is None:  # Triton's run calls a config's pre_hook before each launch: keep it doing so
            self.remembered[key] = (config, config.all_kwargs())
        return result
