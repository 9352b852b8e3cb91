"""What the three algorithms really share: sequences, windows, loop bounds, launch configs.

Conventions used by every kernel in this package
- A tensor is seen as (batch, head, row, D) through three strides (batch, head, row); D is
  contiguous (the launchers make it so). Dense tensors are (B, H, N, D); packed varlen
  tensors (total, H, D) have batch stride 0 and sequence b starts at row cu_seqlens[b].
  So one kernel serves both: `sequence()` gives a program its sequence's first row and
  length, and `head_start()` turns that into a pointer, once per program, in int64
  (batch and row offsets can pass 2^31); tile offsets inside a sequence stay int32.
- A program handles one (batch, head) pair and one block of rows. The grid is 1-D (CUDA
  allows 2^31 - 1 blocks on x but only 65535 on y and z); consecutive programs take
  consecutive row blocks of one head, so programs running together share K/V in L2. For
  varlen the grid is packed: per head, total_rows // BLOCK + batch programs, as many as the
  sequences' blocks plus at most one spare each, found without reading cu_seqlens on the
  host, heads fastest (`packed_program_block`); a spare program returns at once.
- Grouped-query attention: query head h reads K/V head h // group. Forward and dQ
  programs are per query head; dK/dV programs are per K/V head and loop over the group's
  query heads in a fixed order, so dK/dV are summed without atomics and without a copy.
- Visibility (FlashAttention-2's local attention, bottom-right aligned): query i sits at
  position p = i + Nk - Nq and sees key j iff p - left <= j <= p + right. A side that is
  unbounded (-1) is compiled out (WINDOW_LEFT / WINDOW_RIGHT constexprs); causal is
  right = 0. Each range of blocks is split into a masked head, an unmasked middle and a
  masked tail (`split_blocks`), and blocks outside the window are not visited at all, so a
  window of w keys costs O(N w). v1 runs one loop per part; v2 walks the head and the tail
  in one masked loop that jumps over the middle (`skip_full_blocks`), so a kernel with
  both edges carries two copies of its loop body, not three.
- Softcap (Gemma 2): scores c * tanh(scale * q.k / c), in log2 units like the rest.
"""
import dataclasses
import functools
import itertools
import os

import torch
import triton
import triton.language as tl

from . import _compat, _launch

# log2(e) and ln(2) as compile-time constants (kernels may read only constexpr globals):
# exp(x) = exp2(x * LOG2_E), log(x) = log2(x) * LN_2. Host code reads LOG2_E.value.
LOG2_E = tl.constexpr(1.4426950408889634)
LN_2 = tl.constexpr(0.6931471805599453)

# Shared memory a block may use, by compute capability (CUDA C Programming Guide,
# "Technical Specifications per Compute Capability"): the AOT test holds configs to it.
SHARED_MEMORY_LIMIT = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def head_dim_block(head_dim: int) -> int:
    """Tile width along D: a power of two (tl.arange needs one), at least 16 (tl.dot's minimum)."""
    return max(16, _launch.next_power_of_2(head_dim))


def head_dim_args(head_dim: int) -> dict:
    """Kernel arguments for the head dim: the runtime value, its tile width and whether they
    agree. Kernels are compiled per tile width, so D = 40 and D = 48 share one binary."""
    block_d = head_dim_block(head_dim)
    return dict(head_dim=head_dim, BLOCK_D=block_d, EVEN_D=head_dim == block_d)


def autotune_enabled() -> bool:
    """FLASHTILE_AUTOTUNE=0 launches the first shipped config instead of timing them all."""
    return os.environ.get("FLASHTILE_AUTOTUNE", "1") != "0"


def time_configs(kernel_call, quantiles):
    """The autotuner's timer. Triton times every config left after pruning, a lone one too,
    for each new key; with FLASHTILE_AUTOTUNE=0 the lone first config needs no timing (the
    launch that follows compiles and runs it), so nothing runs here: a GPU test session
    meets hundreds of new keys, each ~0.1 s of timing."""
    if not autotune_enabled():
        return [0.0] * len(quantiles)
    return _compat.benchmark(kernel_call, quantiles)


def seq_bucket(n: int) -> int:
    """Autotune key for a sequence length: its power-of-two bucket, so that every new
    length does not retune while 1k and 16k keep configs of their own."""
    return _launch.next_power_of_2(max(n, 1))


# ---------------------------------------------------------------------------------------
# Launch configurations
# ---------------------------------------------------------------------------------------
# A config is (rows owned, rows looped over, num_warps, num_stages). Names follow the
# papers' Q/K split everywhere: BLOCK_M counts queries and BLOCK_N keys. A forward or dQ
# program owns BLOCK_M queries and loops over keys BLOCK_N at a time; a dK/dV program owns
# BLOCK_N keys and loops over queries BLOCK_M at a time.
# "portable" sets run on any sm_75+ GPU; the sm_90 sets use Hopper's larger shared memory
# (227 KB) and more stages. FLASHTILE_PORTABLE=1 forces the sm_80 sets on any GPU, which is
# how the portable path is tested on the H100.

def _forward_configs(capability: int, block_d: int):
    if capability >= 90:
        if block_d <= 64:
            return [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 8, 4)]
        if block_d <= 128:
            return [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3)]
        return [(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2)]
    if capability >= 80:
        if block_d <= 128:
            return [(128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3)]
        return [(64, 64, 4, 2), (64, 32, 4, 2)]
    # sm_75: 64 KB of shared memory and fp16 only (Turing has no bf16). Under Triton 3.2
    # (tensor cores) these use at most 40 KB (`python -m flashtile.aot --arch sm_75`).
    if block_d <= 128:
        return [(64, 64, 4, 2), (64, 32, 4, 2)]
    return [(32, 32, 4, 1)]


def _backward_configs(capability: int, block_d: int, atomic_dq: bool = False):
    # Backward programs hold two fp32 accumulators (dK and dV) or reload four tiles an
    # iteration (dQ): smaller tiles and fewer stages than the forward. atomic_dq: a dK/dV
    # program that also adds dQ atomically (v1, v2_atomic), which stages a float32 dQ tile in
    # shared memory as well.
    if capability >= 90:
        if block_d <= 64:
            # Timed on the H200 (docs/results.md, "The portable backward's configs at D 64 and
            # 256"): each of these is the fastest dK/dV or dQ somewhere on the grid.
            return [(64, 64, 4, 3), (128, 32, 8, 3), (64, 32, 4, 3), (128, 128, 8, 3)]
        if block_d <= 128:
            # Timed on the H100 (docs/results.md, "backward configurations"): 128-row programs
            # with three stages are the fastest dK/dV and dQ at every point measured.
            return [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3)]
        if atomic_dq:  # (64, 64, 8, 2) would need 263 KB of shared memory with the dQ tile
            return [(64, 32, 4, 3), (128, 64, 8, 1), (32, 32, 4, 2)]
        return [(64, 64, 8, 2), (128, 64, 8, 1), (64, 32, 4, 3), (32, 32, 4, 2)]  # the same sweep
    if capability >= 80:
        if block_d <= 128:
            return [(64, 64, 4, 2), (64, 32, 4, 3), (128, 32, 8, 2)]
        return [(64, 32, 4, 1), (32, 32, 4, 1)]
    if block_d <= 64:
        return [(64, 32, 4, 1), (32, 32, 4, 1)]
    if block_d <= 128:
        return [(32, 32, 4, 1)]
    return [(16, 16, 4, 1)]


CONFIG_SETS = {"forward": _forward_configs, "backward": _backward_configs,
               "atomic_backward": lambda capability, block_d: _backward_configs(capability, block_d, atomic_dq=True)}
# The backward's row statistics (L in log2 units and D, `Problem.padded_stats_shape`) are kept
# with every sequence's rows starting at a multiple of STAT_BLOCK rows and padded to one, so
# that every row block a backward kernel reads (BLOCK_M divides STAT_BLOCK) lies inside them:
# the loads need no mask and are 16-byte vectors. With a mask on the sequence's length (unknown
# to the compiler when not a multiple of 16, and always for varlen) they were 4-byte copies,
# 192 in the sm_90 dK/dV kernel: that kernel ran 12-20% slower at such lengths.
STAT_BLOCK = tl.constexpr(128)
# The pass that writes them (delta = rowsum(dO * O)) is memory-bound and needs no tuning.
ROWWISE_WARPS = 8


def device_capability(device=None) -> int:
    """10 * major + minor of the current GPU; 0 under the interpreter."""
    if interpreting() or not torch.cuda.is_available():
        return 0
    major, minor = torch.cuda.get_device_capability(device)
    capability = 10 * major + minor
    if os.environ.get("FLASHTILE_PORTABLE", "0") == "1":
        capability = min(capability, 80)
    return capability


def config_tuples(kind: str, capability: int, block_d: int):
    """The (BLOCK_M, BLOCK_N, num_warps, num_stages) tuples shipped for one target.

    For a dK/dV kernel ("backward" configs owned by keys) the first entry is BLOCK_N."""
    if capability == 0:  # the interpreter: one small config, nothing to tune
        return [(16, 16, 4, 1)]
    return CONFIG_SETS[kind](capability, block_d)


def as_triton_configs(tuples, owned: str, looped: str):
    return [triton.Config({owned: a, looped: b}, num_warps=w, num_stages=s) for a, b, w, s in tuples]


def autotuned(kind: str, owned: str = "BLOCK_M", looped: str = "BLOCK_N", **autotune_kwargs):
    """triton.autotune over the current GPU's shipped configs, keyed on shapes.

    The candidate list is the union over head-dim buckets; the early prune keeps only the
    configs shipped for the launched bucket, so a first call times at most four configs.
    Keys: the power-of-two buckets of Nq and of the keys a query sees (`Problem.keys_seen`),
    the head-dim tile and the feature flags (and, implicitly in Triton, the tensors' dtypes).
    A "backward" kernel launched with ATOMIC_DQ=True gets the "atomic_backward" configs."""
    capability = device_capability()
    kinds = (kind, "atomic_backward") if kind == "backward" else (kind,)
    union = []
    for block_d, each in itertools.product((16, 32, 64, 128, 256), kinds):
        union += [t for t in config_tuples(each, capability, block_d) if t not in union]

    def prune(configs, named_args, **kwargs):
        launched = "atomic_backward" if kind == "backward" and kwargs.get("ATOMIC_DQ") else kind
        shipped = config_tuples(launched, capability, kwargs["BLOCK_D"])
        wanted = set(shipped if autotune_enabled() else shipped[:1])
        kept = [c for c in configs
                if (c.kwargs[owned], c.kwargs[looped], c.num_warps, c.num_stages) in wanted]
        return kept or configs[:1]

    return _compat.autotune(
        configs=as_triton_configs(union, owned, looped),
        key=["q_bucket", "k_bucket", "BLOCK_D", "EVEN_D", "VARLEN", "WINDOW_LEFT", "WINDOW_RIGHT", "SOFTCAP"],
        prune_configs_by={"early_config_prune": prune},
        do_bench=time_configs, autotuner_class=_launch.RememberingAutotuner,
        **autotune_kwargs,
    )


# ---------------------------------------------------------------------------------------
# Host side: how a tensor is addressed, and the launch arguments every kernel shares
# ---------------------------------------------------------------------------------------

def skip_unused_gradients(ctx):
    """An attention Function's forward: autograd passes None, not a tensor of zeros, for an
    output's missing gradient. lse's never reaches the backward, and materialising it was
    an allocation and a fill kernel on every backward's path (`output_gradient` for out's)."""
    ctx.set_materialize_grads(False)


def output_gradient(d_out, out):
    """dO for a backward: zeros when out did not reach the loss (see `skip_unused_gradients`)."""
    return torch.zeros_like(out) if d_out is None else d_out


def d_contiguous(t):
    """`t` itself when its last dim is dense (the kernels assume stride 1 along D), else a copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def row_strides(t):
    """(batch, head, row) strides of a dense (B, H, N, D) or packed (total, H, D) tensor."""
    strides = t.stride()  # one call into torch, not one per stride: launchers call this a dozen times
    return strides[:3] if len(strides) == 4 else (0, strides[1], strides[0])


def stat_strides(stat):
    """(batch, head) strides of a row statistic: (B, H, N) dense or (H, total) packed; rows are
    contiguous in both, and a packed sequence's rows start at its cu_seqlens offset."""
    strides = stat.stride()
    return strides[:2] if len(strides) == 3 else (0, strides[0])


def binding_window(window_left: int, window_right: int, n_q: int, n_k: int):
    """(left, right) with -1 for a side that bounds no query: the kernels then launch without
    that side's edge loops, which cost time even when they mask nothing (a sliding window as
    wide as the sequence; causal with Nq = 1).

    Query i sits at p = i + Nk - Nq, in [Nk - Nq, Nk - 1]: left >= Nk - 1 gives
    p - left <= 0 <= j for every key j, and right >= Nq - 1 gives p + right >= Nk - 1 >= j.
    For varlen, n_q and n_k are the longest sequence's, so this holds for every sequence."""
    return (-1 if window_left >= n_k - 1 else window_left, -1 if window_right >= n_q - 1 else window_right)


@dataclasses.dataclass(frozen=True)
class Problem:
    """The shape and features of one attention call, as every launcher needs them.

    Dense: q (B, Hq, Nq, D), k and v (B, Hkv, Nk, D), cu_seqlens None, n_q / n_k the lengths.
    Varlen: q (total_q, Hq, D), k and v (total_k, Hkv, D), n_q / n_k the longest sequence
    (the window and the autotune key use them), total_q / total_k the packed rows (they size
    the grid), cu_seqlens_q / cu_seqlens_k int32 (B + 1,).
    window_left / window_right: -1 unbounded; causal already folded in as right = 0.
    """
    batch: int
    q_heads: int
    kv_heads: int
    n_q: int
    n_k: int
    head_dim: int
    scale: float
    window_left: int
    window_right: int
    softcap: float
    cu_seqlens_q: object = None
    cu_seqlens_k: object = None
    total_q: int = 0
    total_k: int = 0

    @staticmethod
    def of(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left, window_right,
           softcap):
        if cu_seqlens_q is None:
            batch, q_heads, n_q, head_dim = q.shape
            kv_heads, n_k = k.shape[1], k.shape[2]
        else:
            batch, q_heads, head_dim = cu_seqlens_q.numel() - 1, q.shape[1], q.shape[2]
            kv_heads, n_q, n_k = k.shape[1], max_seqlen_q, max_seqlen_k
        window_left, window_right = binding_window(window_left, window_right, n_q, n_k)
        return Problem(batch, q_heads, kv_heads, n_q, n_k, head_dim, scale, window_left, window_right, softcap,
                       cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0])

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens_q is not None

    @property
    def group(self) -> int:
        return self.q_heads // self.kv_heads

    def stat_shape(self, q):
        """Shape of lse-like row statistics: (B, Hq, Nq) dense, (Hq, total_q) varlen."""
        return (self.q_heads, q.shape[0]) if self.varlen else (self.batch, self.q_heads, self.n_q)

    def padded_stats_shape(self):
        """Shape of one plane of the backward's row statistics (`STAT_BLOCK`): dense
        (B, Hq, Nq rounded up to STAT_BLOCK); varlen (Hq, (total_q // STAT_BLOCK + B) * STAT_BLOCK),
        where sequence b starts at row (cu_seqlens_q[b] // STAT_BLOCK + b) * STAT_BLOCK
        (`padded_stats_row0`; as in `packed_program_block`, these starts leave each sequence
        cdiv(length, STAT_BLOCK) blocks before the next)."""
        block = STAT_BLOCK.value
        if self.varlen:
            return (self.q_heads, (self.total_q // block + self.batch) * block)
        return (self.batch, self.q_heads, _launch.cdiv(self.n_q, block) * block)

    def sequences(self, q):
        """The cu_seqlens pointers a kernel takes; dense calls pass q itself as an unused stand-in."""
        return (self.cu_seqlens_q, self.cu_seqlens_k) if self.varlen else (q, q)

    def scores_args(self):
        """(qk_scale, softcap_log2): S in log2 units is q.k * qk_scale, or with a softcap c,
        tanh(q.k * qk_scale) * softcap_log2 with qk_scale = scale / c and softcap_log2 = c log2(e)."""
        if self.softcap > 0:
            return self.scale / self.softcap, self.softcap * LOG2_E.value
        return self.scale * LOG2_E.value, 1.0

    @functools.cached_property  # once per Problem, which a forward and its backward share (frozen allows it)
    def kernel_args(self):
        """The scalar arguments every attention kernel takes, by keyword. Shared: copy before editing."""
        qk_scale, softcap_log2 = self.scores_args()
        return dict(group=self.group, n_q=self.kernel_rows("q"), n_k=self.kernel_rows("k"), scale=self.scale,
                    qk_scale=qk_scale, softcap_log2=softcap_log2, window_left=max(self.window_left, 0),
                    window_right=max(self.window_right, 0), q_bucket=seq_bucket(self.n_q),
                    k_bucket=seq_bucket(self.keys_seen()), VARLEN=self.varlen, WINDOW_LEFT=self.window_left >= 0,
                    WINDOW_RIGHT=self.window_right >= 0, SOFTCAP=self.softcap > 0, **head_dim_args(self.head_dim))

    def keys_seen(self) -> int:
        """The most keys one query sees: Nk, or the window's width when both sides are bounded
        and it is narrower. The autotune key buckets this rather than Nk, so that a 256-key
        window at N 16384 is tuned for itself and not given the configs of whichever width
        ran first at that length (the H100 kept 64-row tiles up to 1024 keys, 128 from 2048)."""
        if self.window_left >= 0 and self.window_right >= 0:
            return min(self.n_k, self.window_left + self.window_right + 1)
        return self.n_k

    def kernel_rows(self, rows: str) -> int:
        """The kernels' n_q or n_k argument: the length of every sequence when dense; the packed
        tensor's rows when varlen, which `packed_program_block` decodes the grid with (each
        program then reads its own sequence's length from cu_seqlens)."""
        if self.varlen:
            return self.total_q if rows == "q" else self.total_k
        return self.n_q if rows == "q" else self.n_k

    def grid(self, rows: str, owned: str, heads: int):
        """1-D grid of blocks of meta[owned] rows: dense, cdiv(N, BLOCK) per (batch, head)
        (`program_block`); varlen, total // BLOCK + batch per head (`packed_program_block`),
        which the host sizes without reading cu_seqlens."""
        n = self.kernel_rows(rows)
        if self.varlen:
            return lambda meta: ((n // meta[owned] + self.batch) * heads,)
        return lambda meta: (_launch.cdiv(n, meta[owned]) * self.batch * heads,)


# ---------------------------------------------------------------------------------------
# JIT helpers
# ---------------------------------------------------------------------------------------

def settle_cache_keys(namespace: dict):
    """Compute the Triton cache key of every JIT function and kernel in `namespace` (a module's
    globals), in definition order, when the module is imported.

    Triton 3.6 hashes a kernel's source with the global constexprs its helpers use, but takes a
    helper's globals only if that helper's own key was computed before (JITFunction.cache_key
    merges `used_global_vals` before it asks the helper for its key). A kernel's key then
    depends on which kernel of the process was hashed first: a process that ran v1 first and one
    that ran v2 first compile the same v2 kernel under two keys and miss each other's on-disk
    cache. Hashed here, helpers first, every process gets the same keys."""
    if interpreting():
        return
    from triton.runtime.jit import JITFunction

    for value in list(namespace.values()):
        value = jit_function(value)
        if isinstance(value, JITFunction):
            value.cache_key  # noqa: B018 (computed and kept by Triton)


def jit_function(kernel):
    """The JITFunction under a kernel's wrappers (an Autotuner, Heuristics, a DirectKernel);
    anything that is not a kernel comes back as it is."""
    from triton.runtime.jit import JITFunction, KernelInterface

    while isinstance(kernel, KernelInterface) and not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


@triton.jit
def program_block(n_heads, n_rows, BLOCK: tl.constexpr, LONGEST_FIRST: tl.constexpr):
    """(batch, head, first row) of this program's block. Programs run over (batch, head, block),
    blocks fastest, in one grid dimension.

    LONGEST_FIRST reverses the block order: under a causal mask later query blocks see more
    keys, and launching them first leaves short programs for the last wave."""
    num_blocks = tl.cdiv(n_rows, BLOCK)
    bh = tl.program_id(0) // num_blocks
    block = tl.program_id(0) % num_blocks
    if LONGEST_FIRST:
        block = num_blocks - 1 - block
    return bh // n_heads, bh % n_heads, block * BLOCK


@triton.jit
def packed_program_block(CU_SEQLENS, n_heads, total_rows, BLOCK: tl.constexpr, LONGEST_FIRST: tl.constexpr):
    """(batch, head, first row, sequence's first packed row, its length) of this program in the
    packed varlen grid: per head, S = total_rows // BLOCK + n_seqs slots, heads fastest. So
    the grid runs sequence after sequence, each one's blocks for every head together, and
    its end holds the last sequence's blocks, not the last head's long sequence (heads
    slowest left a long sequence's heaviest blocks of the last heads for the last wave:
    2-3% slower on the H100 at the benchmark's varlen batch).

    With c = cu_seqlens, sequence b owns the slots [c[b] // BLOCK + b, c[b+1] // BLOCK + b + 1).
    These ranges tile [0, S) (consecutive, c[0] = 0, c[n_seqs] <= total_rows), and one holds
    c[b+1] // BLOCK - c[b] // BLOCK + 1 slots: cdiv(len_b, BLOCK) blocks and at most one spare
    (with L = c1 - c0, floor(c1 / B) - floor(c0 / B) is L / B when B divides L, else
    floor(L / B) or floor(L / B) + 1; cdiv(L, B) is L / B, else floor(L / B) + 1). The host
    knows total_rows (the packed tensor's rows) and n_seqs without a copy from the GPU; the
    kernel reads n_seqs back from the grid's size, which `Problem.grid` makes S * n_heads, so
    no argument is added. A program finds its b by a binary search for the last
    sequence whose first slot is at or before its own (the first slots grow strictly with b),
    log2(n_seqs) scalar loads. A spare slot, and the slots past c[n_seqs] when the tensor has
    more rows, give a first row >= len_b: the caller returns.

    LONGEST_FIRST reverses the blocks within each sequence, as `program_block` does."""
    slots = tl.num_programs(0) // n_heads
    n_seqs = slots - total_rows // BLOCK
    head = tl.program_id(0) % n_heads
    slot = tl.program_id(0) // n_heads
    # Invariant: first_slot(lo) <= slot < first_slot(hi + 1), with first_slot(0) = 0.
    lo = slot * 0
    hi = n_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        at_or_before = tl.load(CU_SEQLENS + mid) // BLOCK + mid <= slot
        lo = tl.where(at_or_before, mid, lo)
        hi = tl.where(at_or_before, hi, mid - 1)
    first = tl.load(CU_SEQLENS + lo)
    end = tl.load(CU_SEQLENS + lo + 1)
    block = slot - (first // BLOCK + lo)
    if LONGEST_FIRST:
        # The sequence's slots are blocks 0..last; the slots past c[n_seqs] stay past its end.
        last = end // BLOCK - first // BLOCK
        block = tl.where(block <= last, last - block, block)
    return lo, head, block * BLOCK, first, end - first


@triton.jit
def sequence(CU_SEQLENS, batch, n_rows, VARLEN: tl.constexpr):
    """(first row, length) of sequence `batch`: row 0 and n_rows for dense tensors, and
    cu_seqlens[b], cu_seqlens[b + 1] - cu_seqlens[b] for packed ones."""
    if VARLEN:
        first = tl.load(CU_SEQLENS + batch)
        n_rows = tl.load(CU_SEQLENS + batch + 1) - first
    else:
        first = 0
    return first, n_rows


@triton.jit
def program_rows(CU_SEQLENS, n_heads, n_rows, BLOCK: tl.constexpr, LONGEST_FIRST: tl.constexpr,
                 VARLEN: tl.constexpr):
    """(batch, head, first row, sequence's first row, sequence's length) of this program's block
    of the rows n_rows counts: `program_block` and `sequence` on dense tensors (n_rows the
    length), `packed_program_block` on packed ones (n_rows the packed total)."""
    if VARLEN:
        batch, head, first_row, row0, length = packed_program_block(CU_SEQLENS, n_heads, n_rows, BLOCK,
                                                                    LONGEST_FIRST)
    else:
        batch, head, first_row = program_block(n_heads, n_rows, BLOCK, LONGEST_FIRST)
        row0, length = sequence(CU_SEQLENS, batch, n_rows, VARLEN)
    return batch, head, first_row, row0, length


@triton.jit
def padded_stats_row0(row0, batch, VARLEN: tl.constexpr):
    """First row of sequence `batch` in the padded row statistics (`Problem.padded_stats_shape`),
    from its first packed row row0: a multiple of STAT_BLOCK the compiler can see."""
    if VARLEN:
        return (row0 // STAT_BLOCK + batch) * STAT_BLOCK
    return 0


@triton.jit
def head_start(base, batch, head, first_row, stride_b, stride_h, stride_n):
    """Pointer to row `first_row` of (batch, head), with the large offsets in int64."""
    return (base + tl.cast(batch, tl.int64) * stride_b + tl.cast(head, tl.int64) * stride_h
            + tl.cast(first_row, tl.int64) * stride_n)


@triton.jit
def tile_pointers(start, first_row, local_rows, cols, stride_n):
    """Pointers to rows first_row + local_rows, columns cols, below `start` (a head_start
    pointer); D is contiguous. first_row * stride_n is int64, the tile's own offsets int32."""
    return start + tl.cast(first_row, tl.int64) * stride_n + local_rows[:, None] * stride_n + cols[None, :]


@triton.jit
def split_blocks(lo, all_lo, all_hi, hi, BLOCK: tl.constexpr):
    """Split the rows [lo, hi) that a block of the other side sees into runs of BLOCK rows.

    [all_lo, all_hi) are the rows seen by every member of that block (and inside the
    sequence). Returns (start, first_full, end_full): the runs of
    range(start, first_full, BLOCK) and range(end_full, hi, BLOCK) need the mask, those of
    range(first_full, end_full, BLOCK) need none. `start` rounds lo down to a multiple of
    BLOCK so that blocks stay aligned to the tensor's tiles, and first_full and end_full are
    multiples of BLOCK too, in a form the compiler can see (first_full is capped at hi rounded
    up, not at hi): a loop from them reads the padded row statistics (`STAT_BLOCK`) with
    16-byte loads."""
    start = (lo // BLOCK) * BLOCK
    first_full = tl.minimum(tl.cdiv(hi, BLOCK) * BLOCK, start + tl.cdiv(tl.maximum(all_lo - start, 0), BLOCK) * BLOCK)
    end_full = first_full + (tl.maximum(all_hi - first_full, 0) // BLOCK) * BLOCK
    return start, first_full, end_full


@triton.jit
def skip_full_blocks(position, full_lo, full_hi):
    """How far past `position` the block starts that one masked loop visits there.

    The masked blocks of a range are two runs, [start, full_lo) and [full_hi, hi), around
    the unmasked run [full_lo, full_hi) (`split_blocks`). One loop walks the positions
    range(start, hi - (full_hi - full_lo), BLOCK), and a position at or past full_lo stands
    for the block full_hi - full_lo further on: the head's blocks first, then the tail's,
    in a fixed order (v2's backward stays deterministic). One loop rather than two is one
    copy of the loop body, and of its software pipeline, in the compiled kernel. When
    full_lo is at or past hi (`split_blocks`), the tail is empty."""
    return tl.where(position >= full_lo, full_hi - full_lo, 0)


@triton.jit
def masked_loop_bounds(lo, hi, full_lo, full_hi, SKIP_FULL: tl.constexpr):
    """(first row read, end of the counter) of a loop over the blocks [lo, hi); with SKIP_FULL
    the counter covers only the masked blocks and stands for them (`skip_full_blocks`)."""
    first = lo
    end = hi
    if SKIP_FULL:
        first += skip_full_blocks(lo, full_lo, full_hi)
        end = hi - (full_hi - full_lo)
    return first, end


@triton.jit
def block_read_at(position, full_lo, full_hi, SKIP_FULL: tl.constexpr):
    """The first row of the block that the loop counter `position` reads."""
    first = position
    if SKIP_FULL:
        first += skip_full_blocks(position, full_lo, full_hi)
    return first


@triton.jit
def rows_to_next_block(position, BLOCK: tl.constexpr, full_lo, full_hi, SKIP_FULL: tl.constexpr):
    """How far a loop's pointers move after the block read at `position`: BLOCK, or with
    SKIP_FULL from the head's last block to the tail's first, over the unmasked run (int64:
    the run can be long)."""
    rows = BLOCK
    if SKIP_FULL:
        rows = tl.cast(BLOCK + skip_full_blocks(position + BLOCK, full_lo, full_hi)
                       - skip_full_blocks(position, full_lo, full_hi), tl.int64)
    return rows


@triton.jit
def key_range(q_start, n_q, n_k, window_left, window_right, BLOCK_M: tl.constexpr,
              WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr):
    """Keys that the queries [q_start, q_start + BLOCK_M) see: (lo, all_lo, all_hi, hi).

    Query i at p = i + Nk - Nq sees keys [p - left, p + right]: the block's first query
    bounds the right edge of what all see, its last the left edge (FlashAttention-2,
    section 3.1.1: blocks outside are skipped)."""
    first_pos = q_start + n_k - n_q
    last_pos = first_pos + BLOCK_M - 1
    lo = 0
    all_lo = 0
    hi = n_k
    all_hi = n_k
    if WINDOW_LEFT:
        lo = tl.maximum(first_pos - window_left, 0)
        all_lo = last_pos - window_left
    if WINDOW_RIGHT:
        hi = tl.minimum(tl.maximum(last_pos + window_right + 1, 0), n_k)
        all_hi = tl.minimum(tl.maximum(first_pos + window_right + 1, 0), n_k)
    return lo, all_lo, all_hi, hi


@triton.jit
def query_range(k_start, n_q, n_k, window_left, window_right, BLOCK_N: tl.constexpr,
                WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr):
    """Queries that see some key of [k_start, k_start + BLOCK_N): (lo, all_lo, all_hi, hi).

    Key j is seen by the queries at positions [j - right, j + left], i.e. rows
    i = position - (Nk - Nq). [all_lo, all_hi) see every key of the block."""
    offset = n_k - n_q
    lo = 0
    all_lo = 0
    hi = n_q
    all_hi = n_q
    if WINDOW_RIGHT:
        lo = tl.minimum(tl.maximum(k_start - window_right - offset, 0), n_q)
        all_lo = k_start + BLOCK_N - 1 - window_right - offset
    if WINDOW_LEFT:
        hi = tl.minimum(tl.maximum(k_start + BLOCK_N - 1 + window_left - offset + 1, 0), n_q)
        all_hi = tl.minimum(tl.maximum(k_start + window_left - offset + 1, 0), n_q)
    return lo, all_lo, all_hi, hi


@triton.jit
def key_blocks(q_first, n_q, n_k, window_left, window_right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr):
    """The key blocks a query block visits, as (start, first_full, end_full, hi): masked
    [start, first_full) (the window's left edge), unmasked [first_full, end_full), masked
    [end_full, hi) (the diagonal, or the sequence's last partial block). This is
    FlashAttention-2's inner loop over key blocks (Algorithm 1, line 6; for dQ, Algorithm 2
    with its loops swapped) cut to the blocks the window touches (section 3.1.1). Without a
    left window start = first_full: the head is empty."""
    lo, all_lo, all_hi, hi = key_range(q_first, n_q, n_k, window_left, window_right, BLOCK_M,
                                       WINDOW_LEFT, WINDOW_RIGHT)
    start, first_full, end_full = split_blocks(lo, all_lo, all_hi, hi, BLOCK_N)
    return start, first_full, end_full, hi


@triton.jit
def query_blocks(k_first, n_q, n_k, window_left, window_right, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                 WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr):
    """The query blocks a key block visits, as (start, first_full, end_full, hi): masked
    [start, first_full) (the diagonal), unmasked [first_full, end_full), masked [end_full, hi)
    (the window's left edge): FlashAttention-2's loop over query blocks (Algorithm 2,
    line 8) cut to the blocks the window touches. Without a right edge start = first_full
    (the head is empty). Without a left edge the last, partial query block needs no mask:
    its missing rows load as zeros with L = +inf, so their P is 0; the tail is then empty
    (end_full = hi)."""
    lo, all_lo, all_hi, hi = query_range(k_first, n_q, n_k, window_left, window_right, BLOCK_N,
                                         WINDOW_LEFT, WINDOW_RIGHT)
    start, first_full, end_full = split_blocks(lo, all_lo, all_hi, hi, BLOCK_M)
    if not WINDOW_LEFT:
        end_full = hi
    return start, first_full, end_full, hi


@triton.jit
def is_visible(query, key, n_q, n_k, window_left, window_right,
               WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr):
    """Bool tile: key index `key` exists and query `query` sees it under the window.

    `query` and `key` are index tensors that broadcast to the tile's shape, so the same
    helper serves query-major tiles (S) and key-major tiles (S^T) alike."""
    visible = key < n_k
    position = query + (n_k - n_q)
    if WINDOW_LEFT:
        visible = visible & (key >= position - window_left)
    if WINDOW_RIGHT:
        visible = visible & (key <= position + window_right)
    return visible


@triton.jit
def tanh(x):
    """tanh as 1 - 2 / (1 + e^{2x}): exact limits +-1 (e^{2x} overflowing to inf gives 1 - 0),
    no NaN, one exp2 (the interpreter has no tanh of its own)."""
    return 1.0 - 2.0 / (1.0 + tl.exp2(x * (2.0 * LOG2_E)))


@triton.jit
def scores_in_log2(qk, qk_scale, softcap_log2, SOFTCAP: tl.constexpr):
    """S in log2 units from q.k, and tanh(scale q.k / c) (what the softcap's derivative needs;
    q.k itself without a softcap)."""
    if SOFTCAP:
        capped = tanh(qk * qk_scale)
        return capped * softcap_log2, capped
    return qk * qk_scale, qk


@triton.jit
def softcap_chain(ds, capped, SOFTCAP: tl.constexpr):
    """dL/d(scale q.k) from dL/dS: times d(c tanh(x / c))/dx = 1 - tanh^2 under a softcap."""
    if SOFTCAP:
        ds = ds * (1.0 - capped * capped)
    return ds


@triton.jit
def load_tile(ptrs, rows, n_rows, cols, head_dim, EVEN_D: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """Load a (rows x BLOCK_D) tile; zeros past the sequence end and past head_dim.

    Zero padding is what makes the masks elsewhere simple: a zero column of Q and K adds
    nothing to Q K^T, and a zero row of V or dO adds nothing to any product. The masks
    that are known true at compile time (EVEN_D: head_dim == BLOCK_D) are left out so the
    loads stay vectorised."""
    if EVEN_D:
        if CHECK_ROWS:
            tile = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            tile = tl.load(ptrs)
    else:
        if CHECK_ROWS:
            tile = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < head_dim), other=0.0)
        else:
            tile = tl.load(ptrs, mask=cols[None, :] < head_dim, other=0.0)
    return tile


@triton.jit
def store_tile(ptrs, tile, rows, n_rows, cols, head_dim, EVEN_D: tl.constexpr):
    """Store the rows that exist and the head_dim columns that exist."""
    if EVEN_D:
        tl.store(ptrs, tile, mask=rows[:, None] < n_rows)
    else:
        tl.store(ptrs, tile, mask=(rows[:, None] < n_rows) & (cols[None, :] < head_dim))


settle_cache_keys(globals())
