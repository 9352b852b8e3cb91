"""Every shipped kernel variant compiles for sm_75, sm_80 and sm_90 and fits shared memory.

Runs without a GPU: triton.compile with an explicit GPUTarget goes all the way to a cubin.
Each (kernel, target, head-dim tile, launch config) that the autotuner can pick is compiled.
The specialisations that do not change the tiles (dtype fp16/bf16, causal, EVEN_D) are
rotated across that list so every kernel sees each of them on every target; set
FLASHTILE_AOT_FULL=1 to compile the full product instead (about 8x longer).

Marked `aot`: plain `pytest` leaves it out (minutes of compiling); scripts/test.sh and CI run
it with `TRITON_INTERPRET=0 pytest -m aot`.
"""
import itertools
import os

import pytest

from flashtile.triton_kernels.aot import KERNELS, TARGETS, compile_variant, shipped_variants

pytestmark = pytest.mark.aot

FULL = os.environ.get("FLASHTILE_AOT_FULL", "0") == "1"


def _variants():
    every = list(shipped_variants())
    if FULL:
        return every
    # One variant per (kernel, target, tile, config), the specialisation chosen in rotation.
    groups = {}
    for v in every:
        groups.setdefault((v.kernel, v.capability, v.block_d, v.config), []).append(v)
    chosen = []
    for (kernel, capability), keys in itertools.groupby(sorted(groups), key=lambda g: g[:2]):
        for i, key in enumerate(keys):
            options = groups[key]
            chosen.append(options[i % len(options)])
    return chosen


VARIANTS = _variants()


def test_every_kernel_and_target_is_covered():
    covered = {(v.kernel, v.capability) for v in VARIANTS}
    assert covered == set(itertools.product(KERNELS, TARGETS))
    # each specialisation appears for every kernel on every target
    for kernel, capability in covered:
        mine = [v for v in VARIANTS if (v.kernel, v.capability) == (kernel, capability)]
        assert {v.dtype for v in mine} == {"fp16", "bf16"}
        assert {v.even_d for v in mine} == {True, False}


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_compiles_within_shared_memory(variant):
    compiled = compile_variant(variant)
    assert "cubin" in compiled.asm and len(compiled.asm["cubin"]) > 0
    assert compiled.metadata.shared <= variant.shared_memory_limit, (
        f"{variant} needs {compiled.metadata.shared} B of shared memory, "
        f"sm_{variant.capability} allows {variant.shared_memory_limit}")
