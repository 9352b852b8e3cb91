"""The host side of a launch, made cheap: at small shapes it, not the GPU, sets the pace.

An attention call at a small shape runs a few microseconds of GPU work behind about a
millisecond of Python (scripts/dispatch_overhead.py measures it on a GPU,
scripts/host_overhead_cpu.py the part flashtile controls, on any machine). Three of the
largest pieces were Triton's generic helpers, replaced here by narrower ones that give the
same results:
- Triton's Autotuner rebuilds its cache key from every argument on every launch;
  RememberingAutotuner keys on what flashtile's launchers already know.
- triton.next_power_of_2 and triton.cdiv are constexpr_functions in Triton 3.6, whose
  argument unwrapping costs microseconds a call on the host; next_power_of_2 and cdiv are
  plain integer arithmetic.

Nothing here touches a kernel: the same kernels compile to the same code with the same configs.
"""
import torch
from triton.runtime.autotuner import Autotuner


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n, for n >= 1 (triton.next_power_of_2's value)."""
    return 1 << (n - 1).bit_length()


def cdiv(n: int, block: int) -> int:
    """ceil(n / block) (triton.cdiv's value)."""
    return (n + block - 1) // block


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

    The launchers' contract, checked at the first launch of each key: tensors positional, the
    key's arguments by keyword (a missing one is a KeyError)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.remembered = {}  # cheap key -> (config, config.all_kwargs())

    def run(self, *args, **kwargs):
        key = (tuple([kwargs[name] for name in self.keys]),
               tuple([arg.dtype for arg in args if isinstance(arg, torch.Tensor)]))
        remembered = self.remembered.get(key)
        if remembered is None:
            return self._choose_and_launch(key, *args, **kwargs)
        config, config_kwargs = remembered
        self.best_config = config  # as Triton's run leaves it
        return self.fn.run(*args, **kwargs, **config_kwargs)

    def _choose_and_launch(self, key, *args, **kwargs):
        tensor_keywords = [name for name, value in kwargs.items() if isinstance(value, torch.Tensor)]
        if tensor_keywords:  # its dtype would be missing from the cheap key
            raise TypeError(f"{self.base_fn.__name__}: pass tensors positionally, not by keyword: {tensor_keywords}")
        result = super().run(*args, **kwargs)
        config = self.best_config
        if config.pre_hook is None:  # Triton's run calls a config's pre_hook before each launch: keep it doing so
            self.remembered[key] = (config, config.all_kwargs())
        return result
