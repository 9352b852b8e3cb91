"""Fixes for the CPU interpreter (TRITON_INTERPRET=1) of Triton 3.6 and 3.2, applied only there.

1. bf16 dot. The interpreter stores bfloat16 tensors as raw uint16 and its `create_dot` hands those
integers straight to numpy.matmul, so every bf16 `tl.dot` returns garbage (seen here:
errors of 1e10 on N(0, 1) inputs). On the GPU the same `tl.dot` is an MMA instruction and
correct. We widen bf16 operands to float32 first, which is exact and what the tensor
cores do, so CPU tests of bf16 kernels test the kernels rather than this bug.

2. Scalars as loop bounds. The interpreter holds a scalar as a 1-element array and turns
it into a Python int with int(array), which NumPy 2.4 refuses ("only 0-dimensional arrays
can be converted to Python scalars"): any `range(lo, hi)` whose bound derives from
tl.program_id fails. We convert with .item(), which every NumPy accepts.

3. float32 -> bf16 casts. The interpreter truncates the low 16 bits (round toward zero); the
GPU's cvt.rn.bf16.f32 rounds to nearest, ties to even. Truncation doubles the rounding error
of every bf16 output and gradient the kernels store, so CPU tests of bf16 would judge
a worse kernel than the one that runs. We round to nearest even, as the hardware does.

4. Autotuned kernels, Triton 3.2 only. A 3.2 autotune Config passes its warp-specialisation
fields (num_buffers_warp_spec, num_consumer_groups, reg_dec_producer, reg_inc_consumer) as
launch keywords, and 3.2's interpreter strips only num_warps and its like before binding the
kernel's arguments, so every autotuned kernel fails with "unexpected keyword argument".
We add those fields to the interpreter's list of launch keywords.
"""
import numpy as np


def apply():
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder, "_flashtile_bf16_dot_fixed", False):
        return
    original_dot = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16 or b.dtype.scalar == tl.bfloat16:
            a = _as_float32(a)
            b = _as_float32(b)
        return original_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot
    builder._flashtile_bf16_dot_fixed = True

    original_cast = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(_float32_to_bf16_bits(src.data), tl.bfloat16)
        return original_cast(self, src, dst_type)

    # create_fp_trunc and friends are lambdas that look cast_impl up on the instance.
    builder.cast_impl = cast_impl

    original_patch_tensor = interpreter._patch_lang_tensor

    def index(tensor):
        return int(tensor.handle.data.item())

    # 3.6 patches tl.tensor through a scope that undoes its patches afterwards; 3.2 sets the
    # attributes on the class directly.
    def patch_lang_tensor(tensor, *scope):
        original_patch_tensor(tensor, *scope)
        if scope:
            scope[0].set_attr(tensor, "__index__", index)
        else:
            tensor.__index__ = index

    interpreter._patch_lang_tensor = patch_lang_tensor

    launch_keywords = getattr(interpreter, "RESERVED_KWS", None)
    if launch_keywords is not None:
        for name in ("num_buffers_warp_spec", "num_consumer_groups", "reg_dec_producer", "reg_inc_consumer"):
            if name not in launch_keywords:
                launch_keywords.append(name)


def _as_float32(handle):
    import triton.language as tl
    from triton.runtime import interpreter

    if handle.dtype.scalar != tl.bfloat16:
        return handle
    # bf16 is the top half of a float32: shift the 16 stored bits up.
    widened = (handle.data.astype(np.uint32) << 16).view(np.float32)
    return interpreter.TensorHandle(widened, tl.float32)


def _float32_to_bf16_bits(values):
    """bf16 bit patterns (uint16) of float32 `values`, rounded to nearest, ties to even."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    # Add just under half of the dropped range, plus 1 when the kept part is odd (ties to even),
    # then drop the low 16 bits. uint64 so that the carry out of 0xFFFF.... cannot wrap.
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    result = rounded.astype(np.uint16)
    nan = np.isnan(values)
    if np.any(nan):  # rounding could carry a NaN's payload into infinity: keep it a quiet NaN
        result[nan] = 0x7FC0
    return result
