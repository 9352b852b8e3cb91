"""Every shipped kernel variant compiles for sm_75, sm_80 and sm_90 and fits shared memory.

Runs without a GPU: triton.compile with an explicit GPUTarget goes all the way to a cubin.
Each (kernel, target, head-dim tile, launch config) that the autotuner can pick is compiled.
The specialisations that do not change the tiles (dtype, feature flags, EVEN_D) are
rotated across that list so every kernel sees each of them on every target
(aot.sample_variants); set FLASHTILE_AOT_FULL=1 to compile the full product instead (about
8x longer). `python -m flashtile.aot` runs the same sweep from the command line.

Kernels that multiply must use the tensor cores wherever this Triton can: sm_80 and sm_90
always, sm_75 only with Triton 3.2 (flashtile/triton_kernels/_compat.py).

Marked `aot`: plain `pytest` leaves it out (minutes of compiling); scripts/test.sh and CI run
it with `TRITON_INTERPRET=0 pytest -m aot`.
"""
import itertools
import os

import pytest

from flashtile.triton_kernels._compat import turing_tensor_cores
from flashtile.triton_kernels.aot import (KERNELS, SHIPPED_DTYPES, TARGETS, compile_variant, has_matmul,
                                          sample_variants, shipped_variants, tensor_core_instructions)

pytestmark = pytest.mark.aot

FULL = os.environ.get("FLASHTILE_AOT_FULL", "0") == "1"
VARIANTS = list(shipped_variants()) if FULL else sample_variants(shipped_variants())


def test_every_kernel_and_target_is_covered():
    covered = {(v.kernel, v.capability) for v in VARIANTS}
    assert covered == set(itertools.product(KERNELS, TARGETS))
    # each specialisation appears for every kernel on every target
    for kernel, capability in covered:
        mine = [v for v in VARIANTS if (v.kernel, v.capability) == (kernel, capability)]
        assert {v.dtype for v in mine} == set(SHIPPED_DTYPES[capability])
        assert {v.even_d for v in mine} == {True, False}


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_compiles_within_shared_memory(variant):
    compiled = compile_variant(variant)  # aligned as launches usually are: the most shared memory
    assert "cubin" in compiled.asm and len(compiled.asm["cubin"]) > 0
    assert compiled.metadata.shared <= variant.shared_memory_limit, (
        f"{variant} needs {compiled.metadata.shared} B of shared memory, "
        f"sm_{variant.capability} allows {variant.shared_memory_limit}")
    if has_matmul(variant) and (variant.capability >= 80 or turing_tensor_cores()):
        assert tensor_core_instructions(compiled.asm["ptx"], variant.capability) > 0, (
            f"{variant}: no tensor-core instruction in its PTX")


def _hopper_variants(kernel="forward"):
    try:
        from flashtile.triton_kernels.aot import hopper_backward_variants, hopper_variants

        return hopper_variants() if kernel == "forward" else hopper_backward_variants()
    except ImportError:  # Triton 3.2 has no Gluon, and flashtile no Hopper kernels there
        return []


@pytest.mark.parametrize("dtype,head_dim,flags", _hopper_variants(), ids=str)
def test_hopper_forward_compiles_for_sm90(dtype, head_dim, flags):
    """v2_hopper.py's Gluon forward, every specialisation: a cubin within sm_90's shared memory,
    with wgmma products, TMA copies and no registers spilled."""
    from flashtile.triton_kernels._common import SHARED_MEMORY_LIMIT
    from flashtile.triton_kernels.aot import compile_hopper, cubin_resources

    compiled = compile_hopper(dtype, head_dim, flags)
    assert compiled.metadata.shared <= SHARED_MEMORY_LIMIT[90]
    ptx = compiled.asm["ptx"]
    assert tensor_core_instructions(ptx, 90) > 0 and "cp.async.bulk.tensor" in ptx
    registers, stack = cubin_resources(compiled.asm["cubin"])
    assert stack == "?" or int(stack) == 0, f"{stack} bytes of stack: registers spilled"


# Stack bytes of v2_hopper_backward.py's kernel by head dim as compiled (D 128: 32-128, the
# compute warps have 240 registers under setmaxnreg); a bound, so that a change that spills more
# is noticed.
HOPPER_BACKWARD_STACK = {64: 0, 128: 128, 256: 0}


@pytest.mark.parametrize("dtype,head_dim,flags", _hopper_variants("backward"), ids=str)
def test_hopper_backward_compiles_for_sm90(dtype, head_dim, flags):
    """v2_hopper_backward.py's deterministic one-pass backward, every specialisation: a cubin
    within sm_90's shared memory, with wgmma products, a warp-specialised dQ writer adding by TMA,
    and the turn's acquire and release."""
    from flashtile.triton_kernels._common import SHARED_MEMORY_LIMIT
    from flashtile.triton_kernels.aot import compile_hopper, cubin_resources

    compiled = compile_hopper(dtype, head_dim, flags, "backward")
    assert compiled.metadata.shared <= SHARED_MEMORY_LIMIT[90]
    ptx = compiled.asm["ptx"]
    assert tensor_core_instructions(ptx, 90) > 0 and "setmaxnreg" in ptx
    assert "cp.reduce.async.bulk.tensor" in ptx and ".add" in ptx
    assert "ld.global.gpu.acquire" in ptx and "atom.global.gpu.release.add" in ptx
    registers, stack = cubin_resources(compiled.asm["cubin"])
    assert stack == "?" or int(stack) <= HOPPER_BACKWARD_STACK[head_dim], f"{stack} bytes of stack"
