"""The launch configuration machinery of flashtile/triton_kernels/_common.py (no attention here).

With FLASHTILE_AUTOTUNE=0 (the tests' setting, conftest.py) the autotuner keeps the first
shipped config of a GPU's list and must launch it once per call, with no timing runs: Triton
times even a lone config for every new key, which a GPU test session would pay hundreds of
times. A counting kernel decorated as the attention kernels are, with a GPU's config lists,
runs on the interpreter here.
"""
import pytest
import torch
import triton
import triton.language as tl

from conftest import INTERPRETING
from flashtile.triton_kernels import _common

pytestmark = pytest.mark.skipif(not INTERPRETING, reason="runs a kernel on CPU tensors: needs TRITON_INTERPRET=1")


@pytest.fixture
def counting_kernel(monkeypatch):
    """A kernel autotuned over sm_90's forward configs that adds 1 to COUNT[0] per launch."""
    monkeypatch.setattr(_common, "device_capability", lambda device=None: 90)

    @_common.autotuned("forward")
    @triton.jit
    def count(COUNT, q_bucket, k_bucket, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, VARLEN: tl.constexpr,
              WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        tl.atomic_add(COUNT, 1)

    assert len(count.configs) > 1  # the union of sm_90's lists: Triton's timing path
    return count


def launch(kernel, counter, q_bucket):
    kernel[(1,)](counter, q_bucket=q_bucket, k_bucket=16, BLOCK_D=64, EVEN_D=True, VARLEN=False, WINDOW_LEFT=False,
                 WINDOW_RIGHT=False, SOFTCAP=False)


def test_without_autotuning_the_first_config_runs_once_untimed(counting_kernel, monkeypatch):
    monkeypatch.setenv("FLASHTILE_AUTOTUNE", "0")
    counter = torch.zeros(1, dtype=torch.int32)
    launch(counting_kernel, counter, q_bucket=16)  # a new key: pruned to one config, not timed
    assert counter.item() == 1
    launch(counting_kernel, counter, q_bucket=16)
    launch(counting_kernel, counter, q_bucket=32)  # another new key
    assert counter.item() == 3
    first = _common.config_tuples("forward", 90, 64)[0]
    best = counting_kernel.best_config
    assert (best.kwargs["BLOCK_M"], best.kwargs["BLOCK_N"], best.num_warps, best.num_stages) == first
