"""Ahead-of-time compilation of every shipped kernel variant, no GPU needed.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", capability, 32))` runs the whole
Triton pipeline down to a cubin (ptxas included) on a machine without a GPU. CI uses it to
prove that each kernel, with each launch config shipped for a target, compiles for sm_75,
sm_80 and sm_90, fits that target's shared memory and multiplies on its tensor cores:

    python -m flashtile.aot --arch sm_75 --require-tensor-cores [--sample] [--jobs N]

prints one row per variant (shared memory, tensor-core instructions in the PTX, seconds) and
exits 1 if any variant fails to compile, exceeds the target's shared memory or, with
--require-tensor-cores, has a tl.dot but no tensor-core instruction (`mma` on sm_75/sm_80,
`wgmma` or `mma` on sm_90). Turing's tensor cores need Triton 3.2 (see _compat.py).

A variant is (kernel, target, head-dim bucket, dtype, feature flags, config). The feature
flags are the constexprs VARLEN, WINDOW_LEFT, WINDOW_RIGHT (causal is WINDOW_RIGHT with
right = 0), SOFTCAP and GROUPED (grouped-query attention; dK/dV kernels only).
"""
import argparse
import concurrent.futures
import dataclasses
import functools
import itertools
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget

from ._compat import TRITON_VERSION, TURING_TRITON_PIP, ast_source, turing_tensor_cores
from ._common import ROWWISE_WARPS, SHARED_MEMORY_LIMIT, STAT_BLOCK, config_tuples, interpreting, jit_function
from . import v1, v2

# kernel name -> (autotuned or plain kernel, config kind, owned block, looped block, fixed constexprs)
KERNELS = {
    "v1_forward": (v1._v1_forward_kernel, "forward", "BLOCK_M", "BLOCK_N", {}),
    "v1_backward": (v1._v1_backward_kernel, "atomic_backward", "BLOCK_N", "BLOCK_M", {}),
    "v2_forward": (v2._v2_forward_kernel, "forward", "BLOCK_M", "BLOCK_N", {}),
    "v2_row_stats": (v2._v2_row_stats_kernel, "rowwise", "BLOCK_M", None, {}),
    "v2_dkdv": (v2._v2_dkdv_kernel, "backward", "BLOCK_N", "BLOCK_M", {"ATOMIC_DQ": False}),
    "v2_dq": (v2._v2_dq_kernel, "backward", "BLOCK_M", "BLOCK_N", {}),
    # v2_atomic's backward: v2's dK/dV kernel adding dQ atomically.
    "v2_atomic_dkdv": (v2._v2_dkdv_kernel, "atomic_backward", "BLOCK_N", "BLOCK_M", {"ATOMIC_DQ": True}),
}
FLOAT32_POINTERS = {"LSE", "L2", "DELTA", "ROW_MAX", "ROW_SUM"}
INT32_POINTERS = {"CU_SEQLENS_Q", "CU_SEQLENS_K"}
FLOAT_SCALARS = {"scale", "qk_scale", "softcap_log2", "softcap"}
FLAG_NAMES = ("VARLEN", "WINDOW_LEFT", "WINDOW_RIGHT", "SOFTCAP", "GROUPED")
# plain, causal, sliding window with GQA, causal softcap, varlen causal with GQA
FEATURE_FLAGS = ((False, False, False, False, False), (False, False, True, False, False),
                 (False, True, True, False, True), (False, False, True, True, False),
                 (True, False, True, False, True))
TARGETS = (75, 80, 90)
# Turing has no bf16 arithmetic (flashtile.attention refuses bf16 there), so only fp16 ships.
SHIPPED_DTYPES = {75: ("fp16",), 80: ("fp16", "bf16"), 90: ("fp16", "bf16")}
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


def shipped_variants(targets=TARGETS, dtypes=None, head_dims=HEAD_DIM_BUCKETS,
                     flag_sets=FEATURE_FLAGS, kernels=tuple(KERNELS)):
    """Every variant shipped for `targets`; dtypes=None means each target's SHIPPED_DTYPES."""
    for name, capability, block_d, dtype, flags in itertools.product(kernels, targets, head_dims,
                                                                     ("fp16", "bf16"), flag_sets):
        if dtype not in (SHIPPED_DTYPES[capability] if dtypes is None else dtypes):
            continue
        kind = KERNELS[name][1]
        if kind == "rowwise":
            if any(flags[1:]):  # the row pass has only the VARLEN flag
                continue
            configs = [(STAT_BLOCK.value, 0, ROWWISE_WARPS, 1)]
        else:
            configs = config_tuples(kind, capability, block_d)
        for config in configs:
            # The full-width binary (EVEN_D) is the common one; odd head dims use the masked one.
            for even_d in (True, False):
                yield Variant(name, capability, block_d, dtype, flags, even_d, config)


def _source(variant: Variant):
    """The variant's ASTSource, told what the common launch tells the compiler (Triton
    specialises on it at run time): every pointer 16-byte aligned, every stride and head_dim a
    multiple of 16 (Triton 3.3+; a head dim below its tile, such as 96 or 192, is one too).
    Compiled for arbitrary alignment instead, a kernel has other registers than the one that
    usually runs, and stages fewer loads in shared memory (an asynchronous copy needs 16-byte
    alignment): it can fit where the launch does not (v1's backward at D 256: 164 KB against
    263 KB)."""
    kernel, kind, owned, looped, fixed = KERNELS[variant.kernel]
    fn = jit_function(kernel)
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
    multiples_of_16 = {arg for arg in fn.arg_names
                       if signature[arg].startswith("*") or arg.startswith("stride_") or arg == "head_dim"}
    return ast_source(fn, signature, constexprs, multiples_of_16)


def compile_variant(variant: Variant):
    """Compile one variant to a cubin for its target, as usually launched (see _source);
    returns Triton's CompiledKernel."""
    options = {"num_warps": variant.config[2], "num_stages": variant.config[3]}
    return triton.compile(_source(variant), target=GPUTarget("cuda", variant.capability, 32),
                          options=options)


def sample_variants(variants):
    """One variant per (kernel, target, tile, config), the specialisation (dtype, feature flags,
    EVEN_D) chosen in rotation, so that every kernel meets each dtype and both EVEN_D on every
    target, and several feature-flag sets: about a tenth of the full product."""
    variants = list(variants)
    groups = {}
    for v in variants:
        groups.setdefault((v.kernel, v.capability, v.block_d, v.config), []).append(v)
    chosen = []
    for _, keys in itertools.groupby(sorted(groups), key=lambda g: g[:2]):
        for i, key in enumerate(keys):
            options = groups[key]
            chosen.append(options[i % len(options)])
    return chosen


# ---------------------------------------------------------------------------------------
# Checks: shared memory and tensor cores
# ---------------------------------------------------------------------------------------

def has_matmul(variant: Variant) -> bool:
    """Whether the kernel multiplies tiles (tl.dot); the row-wise pass does not."""
    return KERNELS[variant.kernel][1] != "rowwise"


def tensor_core_instructions(ptx: str, capability: int) -> int:
    """Tensor-core instructions in the PTX: mma.sync (sm_75+) or, on sm_90, also wgmma."""
    pattern = r"^\s*(wgmma\.mma_async|mma\.sync)" if capability >= 90 else r"^\s*mma\.sync"
    return len(re.findall(pattern, ptx, flags=re.MULTILINE))


@dataclasses.dataclass
class Result:
    variant: Variant
    shared: int = 0
    mma: int = 0
    seconds: float = 0.0
    error: str = ""
    registers: str = "-"  # per thread, from the cubin (--resources)
    stack: str = "-"  # bytes of stack frame per thread: registers spilled to local memory (--resources)

    def problems(self, require_tensor_cores: bool):
        if self.error:
            return [f"compile error: {self.error}"]
        found = []
        if self.shared > self.variant.shared_memory_limit:
            found.append(f"shared memory {self.shared} > {self.variant.shared_memory_limit}")
        if require_tensor_cores and has_matmul(self.variant) and self.mma == 0:
            found.append("no tensor-core instruction")
        return found


def cubin_resources(cubin: bytes):
    """(registers, stack bytes) of the cubin's kernel, read by cuobjdump (Triton ships one
    beside its ptxas); ("?", "?") without it."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    tool = tool if os.path.exists(tool) else shutil.which("cuobjdump")
    if tool is None:
        return "?", "?"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        report = subprocess.run([tool, "--dump-resource-usage", file.name], capture_output=True, text=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+)", report)
    return match.groups() if match else ("?", "?")


def check_variant(variant: Variant, resources: bool = False) -> Result:
    """Compile one variant and measure what the checks need (never raises). resources: also read
    its registers and stack."""
    start = time.time()
    try:
        compiled = compile_variant(variant)
    except Exception as error:  # reported in the table, not raised: the sweep goes on
        message = " ".join(str(error).split())
        return Result(variant, seconds=time.time() - start, error=f"{type(error).__name__}: {message[:200]}")
    result = Result(variant, compiled.metadata.shared,
                    tensor_core_instructions(compiled.asm["ptx"], variant.capability), time.time() - start)
    if resources:
        result.registers, result.stack = cubin_resources(compiled.asm["cubin"])
    return result


# ---------------------------------------------------------------------------------------
# The Hopper forward (v2_hopper.py, Gluon; sm_90 only, Triton 3.6)
# ---------------------------------------------------------------------------------------

HOPPER_FLAGS = tuple(itertools.product((False, True), repeat=3))  # (WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP)


def hopper_variants():
    """(dtype, head_dim, (WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP)) of every specialisation of
    v2_hopper.py's forward."""
    from . import v2_hopper

    return [(dtype, head_dim, flags) for dtype in SHIPPED_DTYPES[90] for head_dim in sorted(v2_hopper.FORWARD_BLOCKS)
            for flags in HOPPER_FLAGS]


def hopper_backward_variants():
    """(dtype, head_dim, (WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP)) of every specialisation of
    v2_hopper_backward.py's deterministic backward."""
    from . import v2_hopper_backward

    return [(dtype, head_dim, flags) for dtype in SHIPPED_DTYPES[90]
            for head_dim in sorted(v2_hopper_backward.BACKWARD_BLOCKS) for flags in HOPPER_FLAGS]


def compile_hopper(dtype: str, head_dim: int, flags, kernel: str = "forward", deterministic: bool = True,
                   blocks=None):
    """Compile one of the Gluon kernels for sm_90 (v2_hopper.py's forward, or
    v2_hopper_backward.py's backward with `deterministic`, at `blocks` = (keys, queries, warps)
    or its head dim's own), with the (1, 1, rows, D) TMA boxes its launcher passes; returns
    Triton's CompiledKernel."""
    import inspect

    import torch
    from triton.experimental.gluon._runtime import GluonASTSource

    from . import v2_hopper, v2_hopper_backward

    element = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    constexprs = {"HEAD_D": head_dim, "WINDOW_LEFT": flags[0], "WINDOW_RIGHT": flags[1], "SOFTCAP": flags[2]}
    if kernel == "forward":
        fn, warps, query_rows = v2_hopper.forward_kernel(head_dim)
        block_m, block_n = v2_hopper.FORWARD_BLOCKS[head_dim]
        query_boxes, floats = ("q_desc", "o_desc"), ("LSE", )
        constexprs.update(NUM_STAGES=v2_hopper.NUM_STAGES)
    else:
        fn = v2_hopper_backward._v2_hopper_backward_kernel
        block_n, block_m, warps = blocks or v2_hopper_backward.BACKWARD_BLOCKS[head_dim]
        query_boxes, floats = ("q_desc", "do_desc"), ("L2", "DELTA")
        query_rows = block_m
        constexprs.update(NUM_STAGES=v2_hopper_backward.NUM_STAGES, DQ_SLICE=v2_hopper_backward.DQ_SLICES[head_dim],
                          DQ_STAGES=v2_hopper_backward.DQ_STAGES, DETERMINISTIC=deterministic)
    constexprs.update(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)

    def box(rows, name=dtype, element=element, columns=head_dim):  # the launchers' own box layout (`_box_layout`)
        return f"tensordesc<{name}[1, 1, {rows}, {columns}],{v2_hopper._box_layout(rows, columns, element)!r}>"

    signature = {}
    for name in inspect.signature(fn.fn).parameters:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name == "dq_desc":  # the backward's float32 dQ buffer, boxed by the query rows
            signature[name] = box(block_m, "fp32", torch.float32, v2_hopper_backward.dq_box_columns(head_dim))
        elif name.endswith("_desc"):  # Q, O and dO boxed by the query rows, K, V, dK and dV by the key rows
            signature[name] = box(query_rows if name in query_boxes else block_n)
        elif name in floats:
            signature[name] = "*fp32"
        elif name == "TURNS":
            signature[name] = "*i32"
        elif name in ("qk_scale", "softcap_log2", "scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    source = GluonASTSource(fn, signature, constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})


# ---------------------------------------------------------------------------------------
# Command line: python -m flashtile.aot
# ---------------------------------------------------------------------------------------

def _capability(arch: str) -> int:
    match = re.fullmatch(r"(?:sm_?)?(\d\d)", arch)
    if match is None or int(match.group(1)) not in TARGETS:
        raise argparse.ArgumentTypeError(f"--arch must be one of {', '.join(f'sm_{t}' for t in TARGETS)}, got {arch!r}")
    return int(match.group(1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flashtile.aot",
        description="Compile every kernel variant shipped for a GPU target, without a GPU, and check that "
                    "each fits the target's shared memory (and, optionally, uses its tensor cores).")
    parser.add_argument("--arch", type=_capability, action="append",
                        help="sm_75, sm_80 or sm_90; repeat for several (default: all three)")
    parser.add_argument("--require-tensor-cores", action="store_true",
                        help="fail if a kernel with a matmul has no mma (wgmma or mma on sm_90) in its PTX")
    parser.add_argument("--sample", action="store_true",
                        help="one variant per (kernel, tile, config), specialisations rotated (about a tenth of "
                             "the full product; what CI runs)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: all cores)")
    parser.add_argument("--quiet", action="store_true", help="print only the variants that fail, and the summary")
    parser.add_argument("--resources", action="store_true",
                        help="also each kernel's registers per thread and stack bytes (spilled registers), as "
                             "usually launched (16-byte pointers; strides and head dims multiples of 16); needs "
                             "cuobjdump (Triton ships one)")
    parser.add_argument("--kernel", action="append", choices=tuple(KERNELS),
                        help="only these kernels (repeat for several; default: all)")
    parser.add_argument("--head-dim", type=int, action="append", choices=HEAD_DIM_BUCKETS,
                        help="only these head-dim tiles (repeat for several; default: all)")
    parser.add_argument("--dtype", action="append", choices=("fp16", "bf16"),
                        help="only these dtypes (default: those shipped for each target)")
    args = parser.parse_args(argv)
    if interpreting():
        parser.error("TRITON_INTERPRET=1 is set: the interpreter has no compiler; run with TRITON_INTERPRET=0")
    targets = tuple(dict.fromkeys(args.arch or TARGETS))
    variants = list(shipped_variants(targets=targets, dtypes=args.dtype, head_dims=args.head_dim or HEAD_DIM_BUCKETS,
                                     kernels=tuple(args.kernel or KERNELS)))
    if args.sample:
        variants = sample_variants(variants)
    triton_version = ".".join(map(str, TRITON_VERSION))
    print(f"flashtile aot: {len(variants)} variants for {', '.join(f'sm_{t}' for t in targets)} "
          f"({'sample' if args.sample else 'full'}), triton {triton_version}, {args.jobs} jobs", flush=True)

    start = time.time()
    failures = []
    resource_header = f" {'regs':>5s} {'stack':>6s}" if args.resources else ""
    print(f"{'variant':64s} {'shared':>14s} {'mma':>5s}{resource_header} {'s':>5s}  status")
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for result in pool.map(functools.partial(check_variant, resources=args.resources), variants):
            problems = result.problems(args.require_tensor_cores)
            if problems:
                failures.append((result, problems))
            if problems or not args.quiet:
                shared = f"{result.shared}/{result.variant.shared_memory_limit}"
                mma = str(result.mma) if has_matmul(result.variant) else "-"
                columns = f" {result.registers:>5s} {result.stack:>6s}" if args.resources else ""
                print(f"{str(result.variant):64s} {shared:>14s} {mma:>5s}{columns} {result.seconds:5.1f}  "
                      f"{'; '.join(problems) or 'ok'}", flush=True)
    print(f"{len(variants) - len(failures)} of {len(variants)} variants ok in {time.time() - start:.0f} s")
    if failures:
        print(f"FAILED: {len(failures)} variants", file=sys.stderr)
        if 75 in targets and args.require_tensor_cores and not turing_tensor_cores():
            print(f"Triton {triton_version} emits no tensor-core instructions for sm_75; "
                  f"for a T4: {TURING_TRITON_PIP}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
