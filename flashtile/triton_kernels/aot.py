"""Ahead-of-time compilation of every shipped kernel variant, no GPU needed.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", capability, 32))` runs the whole
Triton pipeline down to a cubin (ptxas included) on a machine without a GPU. CI uses it to
prove that each kernel, with each launch config shipped for a target, compiles for sm_75,
sm_80 and sm_90 and fits that target's shared memory.

A variant is (kernel, target, head-dim bucket, dtype, feature flags, config). The feature
flags are the constexprs VARLEN, WINDOW_LEFT, WINDOW_RIGHT (causal is WINDOW_RIGHT with
right = 0), SOFTCAP and GROUPED (grouped-query attention; dK/dV kernels only).
"""
import dataclasses
import itertools

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner

from ._common import ROWWISE_BLOCK, ROWWISE_WARPS, SHARED_MEMORY_LIMIT, config_tuples
from . import v1, v2

# kernel name -> (autotuned or plain kernel, config kind, owned block, looped block, fixed constexprs)
KERNELS = {
    "v1_forward": (v1._v1_forward_kernel, "forward", "BLOCK_M", "BLOCK_N", {}),
    "v1_backward": (v1._v1_backward_kernel, "backward", "BLOCK_N", "BLOCK_M", {}),
    "v2_forward": (v2._v2_forward_kernel, "forward", "BLOCK_M", "BLOCK_N", {}),
    "v2_delta": (v2._v2_delta_kernel, "rowwise", "BLOCK_M", None, {}),
    "v2_dkdv": (v2._v2_dkdv_kernel, "backward", "BLOCK_N", "BLOCK_M", {"ATOMIC_DQ": False}),
    "v2_dq": (v2._v2_dq_kernel, "backward", "BLOCK_M", "BLOCK_N", {}),
    # v2_atomic's backward: v2's dK/dV kernel adding dQ atomically.
    "v2_atomic_dkdv": (v2._v2_dkdv_kernel, "backward", "BLOCK_N", "BLOCK_M", {"ATOMIC_DQ": True}),
}
FLOAT32_POINTERS = {"LSE", "DELTA", "ROW_MAX", "ROW_SUM"}
INT32_POINTERS = {"CU_SEQLENS_Q", "CU_SEQLENS_K"}
FLOAT_SCALARS = {"scale", "qk_scale", "softcap_log2", "softcap"}
FLAG_NAMES = ("VARLEN", "WINDOW_LEFT", "WINDOW_RIGHT", "SOFTCAP", "GROUPED")
# plain, causal, sliding window with GQA, causal softcap, varlen causal with GQA
FEATURE_FLAGS = ((False, False, False, False, False), (False, False, True, False, False),
                 (False, True, True, False, True), (False, False, True, True, False),
                 (True, False, True, False, True))
TARGETS = (75, 80, 90)
HEAD_DIM_BUCKETS = (16, 32, 64, 128, 256)


@dataclasses.dataclass(frozen=True)
class Variant:
    kernel: str
    capability: int
    block_d: int
    dtype: str  # "fp16" or "bf16"
    flags: tuple  # the values of FLAG_NAMES
    even_d: bool  # head_dim == block_d: the D masks compiled out
    config: tuple  # (owned block, looped block, num_warps, num_stages)

    @property
    def shared_memory_limit(self):
        return SHARED_MEMORY_LIMIT[self.capability]

    def __str__(self):
        flags = "".join(letter for letter, on in zip("VLRSG", self.flags) if on) or "plain"
        return (f"{self.kernel}-sm{self.capability}-d{self.block_d}-{self.dtype}-{flags}-"
                f"{'even' if self.even_d else 'odd'}-{'x'.join(map(str, self.config))}")


def shipped_variants(targets=TARGETS, dtypes=("fp16", "bf16"), head_dims=HEAD_DIM_BUCKETS,
                     flag_sets=FEATURE_FLAGS, kernels=tuple(KERNELS)):
    for name, capability, block_d, dtype, flags in itertools.product(kernels, targets, head_dims,
                                                                     dtypes, flag_sets):
        kind = KERNELS[name][1]
        if kind == "rowwise":
            if any(flags[1:]):  # the row pass has only the VARLEN flag
                continue
            configs = [(ROWWISE_BLOCK, 0, ROWWISE_WARPS, 1)]
        else:
            configs = config_tuples(kind, capability, block_d)
        for config in configs:
            # The full-width binary (EVEN_D) is the common one; odd head dims use the masked one.
            for even_d in (True, False):
                yield Variant(name, capability, block_d, dtype, flags, even_d, config)


def _source(variant: Variant):
    kernel, kind, owned, looped, fixed = KERNELS[variant.kernel]
    fn = kernel.fn if isinstance(kernel, Autotuner) else kernel  # the JITFunction under autotune
    constexpr_names = {fn.arg_names[i] for i in fn.constexprs}
    values = dict(zip(FLAG_NAMES, variant.flags))
    values.update(fixed, BLOCK_D=variant.block_d, EVEN_D=variant.even_d)
    values[owned] = variant.config[0]
    if looped is not None:
        values[looped] = variant.config[1]
    signature, constexprs = {}, {}
    for arg in fn.arg_names:
        if arg in constexpr_names:
            signature[arg] = "constexpr"
            constexprs[arg] = values[arg]
        elif arg in INT32_POINTERS:
            signature[arg] = "*i32"
        elif arg == "DQ" and fixed.get("ATOMIC_DQ", variant.kernel == "v1_backward"):
            signature[arg] = "*fp32"  # the atomic dQ buffer
        elif arg.isupper():
            signature[arg] = "*fp32" if arg in FLOAT32_POINTERS else f"*{variant.dtype}"
        elif arg in FLOAT_SCALARS:
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32"
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs)


def compile_variant(variant: Variant):
    """Compile one variant to a cubin for its target; returns Triton's CompiledKernel."""
    options = {"num_warps": variant.config[2], "num_stages": variant.config[3]}
    return triton.compile(_source(variant), target=GPUTarget("cuda", variant.capability, 32), options=options)


if __name__ == "__main__":
    import sys
    import time

    targets = tuple(int(t) for t in sys.argv[1].split(",")) if len(sys.argv) > 1 else TARGETS
    start = time.time()
    for variant in shipped_variants(targets=targets, dtypes=("fp16",), flag_sets=FEATURE_FLAGS[1:2]):
        t0 = time.time()
        compiled = compile_variant(variant)
        print(f"{str(variant):60s} shared {compiled.metadata.shared:7d} / {variant.shared_memory_limit} "
              f"regs {compiled.n_regs if hasattr(compiled, 'n_regs') else '?'} {time.time() - t0:.1f}s", flush=True)
    print(f"total {time.time() - start:.0f}s")
