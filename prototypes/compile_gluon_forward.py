"""Compile prototypes/gluon_forward.py for sm_90 without a GPU; print its resources and the
instructions that matter (wgmma, TMA, mbarrier waits). Usage: python prototypes/compile_gluon_forward.py [D [plain|ws|pipe [BLOCK_N [STAGES [causal]]]]]"""
import os
import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource

sys.path.insert(0, "prototypes")
from gluon_forward import (gluon_forward_kernel, gluon_forward_pipelined_kernel, gluon_forward_two_consumers_kernel,  # noqa: E402
                           gluon_forward_ws_kernel)

d = int(sys.argv[1]) if len(sys.argv) > 1 else 128
mode = sys.argv[2] if len(sys.argv) > 2 else "plain"
ws = mode == "ws"
block_m = int(os.environ.get("BLOCK_M", 128))
warps = int(os.environ.get("WARPS", 8))
block_n = int(sys.argv[3]) if len(sys.argv) > 3 else 128
stages = int(sys.argv[4]) if len(sys.argv) > 4 else 2
causal = len(sys.argv) > 5 and sys.argv[5] == "causal"
q_layout = gl.NVMMASharedLayout.get_default_for([block_m, d], gl.float16)
kv_layout = gl.NVMMASharedLayout.get_default_for([block_n, d], gl.float16)
desc = lambda rows, layout: f"tensordesc<fp16[{rows}, {d}],{layout!r}>"  # noqa: E731
signature = {"q_desc": desc(block_m, q_layout), "k_desc": desc(block_n, kv_layout), "v_desc": desc(block_n, kv_layout),
             "o_desc": desc(block_m, q_layout), "LSE": "*fp32", "n_q": "i32", "n_k": "i32", "qk_scale": "fp32",
             "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "HEAD_D": "constexpr", "NUM_STAGES": "constexpr",
             "num_warps": "constexpr"}
constexprs = {"BLOCK_M": block_m, "BLOCK_N": block_n, "HEAD_D": d, "NUM_STAGES": stages, "num_warps": warps}
kernel_fn = {"plain": gluon_forward_kernel, "ws": gluon_forward_ws_kernel, "pipe": gluon_forward_pipelined_kernel,
             "two": gluon_forward_two_consumers_kernel}[mode]
if mode == "two":  # two 64-row consumer partitions of 4 warps, a 1-warp loader
    q_rows = block_m // 2
    q_layout = gl.NVMMASharedLayout.get_default_for([q_rows, d], gl.float16)
    signature["q_desc"] = signature["o_desc"] = desc(q_rows, q_layout)
    signature["CAUSAL"] = signature["CONSUMER_REGS"] = "constexpr"
    constexprs.update(CAUSAL=causal, CONSUMER_REGS=int(os.environ.get("CONSUMER_REGS", 232)), num_warps=4)
    signature["num_warps"] = signature.pop("num_warps")  # the kernel's parameter order
    warps = 4
if mode in ("pipe", "plain"):  # noqa: SIM102
    signature["CAUSAL"] = "constexpr"
    constexprs["CAUSAL"] = causal
src = GluonASTSource(kernel_fn, signature, constexprs)
options = dict(num_warps=8, maxnreg=168) if ws else dict(num_warps=warps)
if mode == "two":
    options["maxnreg"] = 224
if os.environ.get("MAXNREG"):
    options["maxnreg"] = int(os.environ["MAXNREG"])
kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
ptx = kernel.asm["ptx"]
print("shared bytes", kernel.metadata.shared, "| registers", getattr(kernel, "n_regs", "?"))
for name in ("wgmma.mma_async", "cp.async.bulk.tensor", "mbarrier.try_wait", "bar.sync", "setmaxnreg", "ld.local", "st.local"):
    print(f"{name:24} {len(re.findall(re.escape(name), ptx))}")

# Registers and spills from the cubin (cuobjdump ships with Triton's NVIDIA backend).
import os, subprocess, tempfile  # noqa: E401,E402
bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
    f.write(kernel.asm["cubin"])
    f.flush()
    usage = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "--dump-resource-usage", f.name],
                           capture_output=True, text=True).stdout
print(" ".join(line.strip() for line in usage.splitlines() if "REG" in line))
if os.environ.get("PTX_OUT"):
    open(os.environ["PTX_OUT"], "w").write(ptx)
