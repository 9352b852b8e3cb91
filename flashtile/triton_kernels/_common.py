"""What the three algorithms really share: index arithmetic, loop bounds, launch configs.

Conventions used by every kernel in this package
- Tensors are (B, H, N, D) with arbitrary strides; a program handles one (batch, head)
  pair, `bh = batch * H + head`, and one block of rows.
- Offsets that can pass 2^31 (batch and head strides times their index, a block's first
  row times the row stride) are computed in int64 once per program; within a tile the
  offsets are small and stay int32. Pointers then advance by a tile at a time.
- The grid is 1-D (CUDA allows 2^31 - 1 blocks on x but only 65535 on y and z, and B * H
  can exceed that); consecutive programs take consecutive row blocks of one head, so the
  programs running together share that head's K/V in L2.
- Causal masking is bottom-right aligned: query i sees key j iff j <= i + (Nk - Nq).
  Each kernel splits its loop into the blocks that need no mask and the few that do
  (the diagonal and the sequence tail), so only those pay for the mask.
"""
import os

import torch
import triton
import triton.language as tl

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
    return max(16, triton.next_power_of_2(head_dim))


def head_dim_args(head_dim: int) -> dict:
    """Kernel arguments for the head dim: the runtime value, its tile width and whether they
    agree. Kernels are compiled per tile width, so D = 40 and D = 48 share one binary."""
    block_d = head_dim_block(head_dim)
    return dict(head_dim=head_dim, BLOCK_D=block_d, EVEN_D=head_dim == block_d)


def autotune_enabled() -> bool:
    """FLASHTILE_AUTOTUNE=0 launches the first shipped config instead of timing them all."""
    return os.environ.get("FLASHTILE_AUTOTUNE", "1") != "0"


def seq_bucket(n: int) -> int:
    """Autotune key for a sequence length: its power-of-two bucket, so that every new
    length does not retune while 1k and 16k keep configs of their own."""
    return triton.next_power_of_2(max(n, 1))


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
    # sm_75: 64 KB of shared memory; sizes below are the largest that the AOT test found
    # to fit for fp16 and bf16 alike (bf16 has no MMA there and is widened to fp32).
    if block_d <= 128:
        return [(64, 64, 4, 2), (64, 32, 4, 2)]
    return [(32, 32, 4, 1)]


def _backward_configs(capability: int, block_d: int):
    # Backward programs hold two fp32 accumulators (dK and dV) or reload four tiles an
    # iteration (dQ): smaller tiles and fewer stages than the forward.
    if capability >= 90:
        if block_d <= 64:
            return [(128, 64, 8, 3), (64, 64, 4, 3), (64, 128, 8, 3), (128, 128, 8, 2)]
        if block_d <= 128:
            return [(128, 64, 8, 2), (64, 64, 4, 3), (64, 128, 8, 2), (64, 32, 4, 3)]
        return [(64, 32, 4, 2), (64, 64, 8, 1), (32, 32, 4, 2)]
    if capability >= 80:
        if block_d <= 128:
            return [(64, 64, 4, 2), (64, 32, 4, 3), (128, 32, 8, 2)]
        return [(64, 32, 4, 1), (32, 32, 4, 1)]
    if block_d <= 64:
        return [(64, 32, 4, 1), (32, 32, 4, 1)]
    if block_d <= 128:
        return [(32, 32, 4, 1)]
    return [(16, 16, 4, 1)]


CONFIG_SETS = {"forward": _forward_configs, "backward": _backward_configs}
# Row-wise passes (delta = rowsum(dO * O)) are memory-bound and need no tuning.
ROWWISE_BLOCK = 64
ROWWISE_WARPS = 4


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
    Keys: the power-of-two buckets of Nq and Nk, the head-dim tile, causal (and, implicitly
    in Triton, the tensors' dtypes)."""
    capability = device_capability()
    union = []
    for block_d in (16, 32, 64, 128, 256):
        union += [t for t in config_tuples(kind, capability, block_d) if t not in union]

    def prune(configs, named_args, **kwargs):
        shipped = config_tuples(kind, capability, kwargs["BLOCK_D"])
        wanted = set(shipped if autotune_enabled() else shipped[:1])
        kept = [c for c in configs
                if (c.kwargs[owned], c.kwargs[looped], c.num_warps, c.num_stages) in wanted]
        return kept or configs[:1]

    return triton.autotune(
        configs=as_triton_configs(union, owned, looped),
        key=["q_bucket", "k_bucket", "BLOCK_D", "EVEN_D", "IS_CAUSAL"],
        prune_configs_by={"early_config_prune": prune},
        **autotune_kwargs,
    )


# ---------------------------------------------------------------------------------------
# JIT helpers
# ---------------------------------------------------------------------------------------

@triton.jit
def head_offset(bh, n_heads, stride_b, stride_h):
    """Element offset of head `bh` (= batch * H + head) in int64: B*H*stride can pass 2^31."""
    batch = bh // n_heads
    head = bh % n_heads
    return batch.to(tl.int64) * stride_b + head.to(tl.int64) * stride_h


@triton.jit
def tile_pointers(base, head_off, first_row, rows, cols, stride_n, stride_d):
    """Pointers to a (len(rows), len(cols)) tile starting at row `first_row` of one head.

    `rows` and `cols` are small aranges; the large part of the offset is int64."""
    start = base + head_off + tl.cast(first_row, tl.int64) * stride_n
    return start + rows[:, None] * stride_n + cols[None, :] * stride_d


@triton.jit
def block_of_program(n_rows, BLOCK: tl.constexpr, LONGEST_FIRST: tl.constexpr):
    """(bh, first row) of this program's block. Programs run over (batch * head, block), blocks
    fastest, in one grid dimension (grid y and z stop at 65535; B * H need not).

    LONGEST_FIRST reverses the block order: under a causal mask later query blocks see more
    keys, and launching them first leaves short programs for the last wave."""
    num_blocks = tl.cdiv(n_rows, BLOCK)
    bh = tl.program_id(0) // num_blocks
    block = tl.program_id(0) % num_blocks
    if LONGEST_FIRST:
        block = num_blocks - 1 - block
    return bh, block * BLOCK


@triton.jit
def load_head_tile(base, bh, n_heads, stride_b, stride_h, stride_n, stride_d,
                   first_row, local_rows, n_rows, cols, head_dim, EVEN_D: tl.constexpr):
    """The tile of rows first_row + local_rows (zero past n_rows and head_dim) of head `bh`."""
    ptrs = tile_pointers(base, head_offset(bh, n_heads, stride_b, stride_h), first_row,
                         local_rows, cols, stride_n, stride_d)
    return load_tile(ptrs, first_row + local_rows, n_rows, cols, head_dim, EVEN_D, True)


@triton.jit
def key_range_for_query_block(q_start, n_q, n_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              IS_CAUSAL: tl.constexpr):
    """Keys a query block [q_start, q_start + BLOCK_M) must visit, split in two.

    Returns (unmasked_end, end): keys [0, unmasked_end) are seen by every query of the
    block and lie inside the sequence, so they need no mask, and unmasked_end is a
    multiple of BLOCK_N; keys [unmasked_end, end) need the bounds and causal mask.
    Keys >= end are seen by no query of the block (FlashAttention-2, section 3.1.1:
    blocks above the diagonal are skipped).
    """
    if IS_CAUSAL:
        causal_offset = n_k - n_q
        end = tl.minimum(n_k, tl.maximum(0, q_start + BLOCK_M + causal_offset))
        # The block's first query sees keys j <= q_start + causal_offset; later ones see more.
        seen_by_all = tl.minimum(end, tl.maximum(0, q_start + causal_offset + 1))
    else:
        end = n_k
        seen_by_all = n_k
    unmasked_end = (seen_by_all // BLOCK_N) * BLOCK_N
    return unmasked_end, end


@triton.jit
def query_range_for_key_block(k_start, n_q, n_k, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                              IS_CAUSAL: tl.constexpr):
    """Queries a key block [k_start, k_start + BLOCK_N) is seen by, split in two.

    Returns (start, masked_end): queries from `start` on see some key of the block;
    blocks of BLOCK_M queries starting at `start` and ending at or before masked_end
    straddle the diagonal and need the causal mask; from masked_end on, every query sees
    every key of the block. Without causal masking everything is [0, n_q), unmasked.
    """
    if IS_CAUSAL:
        causal_offset = n_k - n_q
        # Query i sees key j iff i >= j - causal_offset.
        start = tl.minimum(n_q, tl.maximum(0, k_start - causal_offset))
        sees_all = tl.minimum(n_q, tl.maximum(0, k_start + BLOCK_N - 1 - causal_offset))
        masked_end = start + tl.cdiv(sees_all - start, BLOCK_M) * BLOCK_M
    else:
        start = 0
        masked_end = 0
    return start, masked_end


@triton.jit
def is_visible(query, key, n_q, n_k, IS_CAUSAL: tl.constexpr):
    """Bool tile: key index `key` exists and (if causal) query `query` sees it.

    `query` and `key` are index tensors that broadcast to the tile's shape, so the same
    helper serves query-major tiles (S) and key-major tiles (S^T) alike."""
    visible = key < n_k
    if IS_CAUSAL:
        visible = visible & (key <= query + (n_k - n_q))
    return visible


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
