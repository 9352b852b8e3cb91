"""The Triton kernels: one algorithm per module (v1, v2, v2_atomic), shared pieces in _common."""
from ._common import interpreting

if interpreting():
    from . import _interpreter_fix

    _interpreter_fix.apply()
