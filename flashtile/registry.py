"""The one registry of flashtile's implementations.

Everything that lists implementations reads it: `flashtile.attention` (dispatch), the
benchmark, asv, the ahead-of-time compiler and the tests. Adding an implementation means
adding one entry here and its module.

Every implementation's autograd Function has the same signature (checked inputs only;
`flashtile.interface` does the checking):

    Function.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                   scale, window_left, window_right, softcap) -> (out, lse)

- dense: q (B, Hq, Nq, D), k and v (B, Hkv, Nk, D), cu_seqlens_* None; lse (B, Hq, Nq).
- varlen: q (total_q, Hq, D), k and v (total_k, Hkv, D), cu_seqlens_* int32 (B + 1,) on q's
  device, max_seqlen_* ints; lse (Hq, total_q).
- window_left / window_right: -1 unbounded, causal already folded in as right = 0.
- softcap: 0.0 is off. lse is float32 natural-log and not differentiable.
"""
import dataclasses
import importlib


@dataclasses.dataclass(frozen=True)
class Implementation:
    name: str
    module: str  # relative to the flashtile package
    function: str  # the autograd Function's class name in that module
    triton: bool  # Triton kernels: run by the interpreter, compiled ahead of time by aot
    atomic_dq: bool  # dQ summed with atomic adds: its last bits may change from run to run
    summary: str

    def load(self):
        """The autograd Function (imports its module, and so its kernels, on first use; then
        remembered, since every eager call asks for it)."""
        function = _LOADED.get(self.name)
        if function is None:
            function = _LOADED[self.name] = getattr(importlib.import_module(self.module, "flashtile"), self.function)
        return function


_LOADED = {}  # implementation name -> its autograd Function


_ENTRIES = (
    Implementation("v1", ".triton_kernels.v1", "FlashAttentionV1Function", True, True,
                   "FlashAttention-1: row max and row sum kept apart, natural exp, atomic dQ"),
    Implementation("v2", ".triton_kernels.v2", "FlashAttentionV2Function", True, False,
                   "FlashAttention-2: unnormalised accumulator, lse only, exp2, deterministic backward"),
    Implementation("v2_atomic", ".triton_kernels.v2_atomic", "FlashAttentionV2AtomicFunction", True, True,
                   "FlashAttention-2 forward, one backward kernel with atomic dQ"),
    Implementation("cuda", ".cuda_reference", "CudaReferenceAttentionFunction", False, False,
                   "the hand-written tiled CUDA reference, float32 arithmetic"),
)

REGISTRY = {entry.name: entry for entry in _ENTRIES}
IMPLEMENTATIONS = tuple(REGISTRY)
TRITON_IMPLEMENTATIONS = tuple(name for name, entry in REGISTRY.items() if entry.triton)
DEFAULT_IMPLEMENTATION = "v2"
