"""The model features (issue 11) as benchmark workloads, each beside PyTorch's paths for the
same work, measured in the same run:

- gqa: grouped-query attention, Hq / Hkv = 8, causal: flashtile vs SDPA (enable_gqa) on its
  flash and cuDNN backends and FlexAttention (enable_gqa).
- window: causal sliding window (left = W - 1, right = 0): flashtile vs FlexAttention with a
  sliding-window block mask, and SDPA cuDNN's full causal attention as a reference (the
  fastest way to the same outputs' job without a window).
- softcap: causal with softcap 50: flashtile vs FlexAttention with a tanh score_mod.
- varlen: a packed batch, one sequence 10x longer than the others, causal within each:
  flashtile.varlen_attention vs SDPA (flash, cuDNN) on the right-padded batch with is_causal
  (per-sequence causal; the padding costs SDPA time but not FLOPs) and FlexAttention on the
  packed batch with a document mask.

Each row also has the peak memory of one forward (no grad) beyond the inputs.
TFLOP/s always count the workload's useful work (attention_flops over the visible keys, real
tokens only), whoever computes it, so that the numbers compare the time to do one job.

`window_sweep_rows` times one window width after another at a fixed N: a kernel that skips
the blocks outside the window costs in proportion to the width.
"""
import dataclasses

import torch

from ..registry import IMPLEMENTATIONS
from .impls import attention_fn, flex_fn
from .measure import failure, measure_speed, packed_flops, peak_extra_mib, random_inputs, workload_flops

SOFTCAP = 50.0


@dataclasses.dataclass(frozen=True)
class FeatureSizes:
    """The sizes of the feature workloads on one kind of machine."""
    n: int  # the long sequence length (GQA, window, varlen total)
    head_dim: int
    heads: int
    gqa_heads: tuple  # (Hq, Hkv), Hq / Hkv = 8
    window: int  # keys a query sees under the sliding window, itself included
    softcap_batch: int = 4

    def describe(self):
        return (f"N {self.n} D {self.head_dim} H {self.heads} (GQA {self.gqa_heads[0]}/{self.gqa_heads[1]}) "
                f"window {self.window}, softcap N {self.n // 4} B {self.softcap_batch}")

    def varlen_lengths(self):
        """Seven sequences summing to n: six of n/16 tokens and one 10x longer."""
        short = self.n // 16
        return [short] * 3 + [10 * short] + [short] * 3


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    batch: int
    heads_q: int
    heads_kv: int
    n: int
    head_dim: int
    causal: bool = True
    window_size: tuple = (-1, -1)
    softcap: float = 0.0
    peers: tuple = ()  # PyTorch contenders doing exactly this work
    # (contender, note, option overrides): PyTorch doing a related job, for reference
    stand_ins: tuple = ()

    def shape(self):
        heads = f"H {self.heads_q}" if self.heads_q == self.heads_kv else f"Hq {self.heads_q}, Hkv {self.heads_kv}"
        extra = [f"window {self.window_size}"] if tuple(self.window_size) != (-1, -1) else []
        extra += [f"softcap {self.softcap:g}"] if self.softcap else []
        return ", ".join([f"B {self.batch}", heads, f"N {self.n}", f"D {self.head_dim}"]
                         + (["causal"] if self.causal else []) + extra)


def workloads(sizes: FeatureSizes):
    """The dense feature workloads (varlen is apart: its inputs are packed)."""
    n, d, h = sizes.n, sizes.head_dim, sizes.heads
    return [
        Workload("gqa", 1, sizes.gqa_heads[0], sizes.gqa_heads[1], n, d, peers=("sdpa_flash", "sdpa_cudnn", "flex")),
        Workload("window", 1, h, h, n, d, window_size=(sizes.window - 1, 0), peers=("flex",),
                 stand_ins=(("sdpa_cudnn", "full causal", dict(window_size=(-1, -1))),)),
        Workload("softcap", sizes.softcap_batch, h, h, n // 4, d, softcap=SOFTCAP, peers=("flex",)),
    ]


def _contenders(peers, stand_ins, impls):
    """(contender, note, overrides) for flashtile's selected implementations, then the peers."""
    chosen = [(name, "", {}) for name in impls if name in IMPLEMENTATIONS]
    chosen += [(name, "", {}) for name in peers if name in impls]
    return chosen + [s for s in stand_ins if s[0] in impls]


def workload_rows(workload, impls, dtype, device, cpu_reps=3):
    """One row per contender of a dense workload: forward and forward+backward speed."""
    w = workload
    flops = workload_flops(w.batch, w.heads_q, w.n, w.n, w.head_dim, w.causal, w.window_size)
    rows = []
    for name, note, overrides in _contenders(w.peers, w.stand_ins, impls):
        row = dict(workload=w.name, impl=name, note=note, shape=w.shape(), dtype=str(dtype).replace("torch.", ""))
        options = dict(dict(causal=w.causal, window_size=w.window_size, softcap=w.softcap), **overrides)
        try:
            inputs, d_out = random_inputs(w.batch, w.heads_q, w.n, w.head_dim, dtype, device, heads_kv=w.heads_kv)
            fn = attention_fn(name, **options)
            row.update(measure_speed(fn, inputs, d_out, device, flops, cpu_reps))
            if "fwd_ms" in row:  # e.g. GQA's forward must take no more memory than MHA's: no K/V copy
                row["fwd_mib"] = forward_peak_mib(fn, inputs, device)
        except Exception as error:  # noqa: BLE001 - e.g. the inputs do not fit
            row["error"] = failure(error)
        rows.append(row)
    return rows


def forward_peak_mib(fn, inputs, device):
    """Peak MiB one forward (no grad) allocates beyond its inputs."""
    def forward():
        with torch.no_grad():
            fn(*inputs)

    return peak_extra_mib(forward, device)


def varlen_contenders(sizes, impls, device):
    """(name, note, fn, layout) for the packed causal batch of `sizes.varlen_lengths()`:
    flashtile on the packed batch, SDPA on the padded one, FlexAttention with a document mask
    on the packed one; fn(q, k, v) takes the layout's (1 or B, H, N, D) tensors (`varlen_inputs`)."""
    lengths = sizes.varlen_lengths()
    longest = max(lengths)
    cu_seqlens = torch.tensor([0] + [sum(lengths[:i + 1]) for i in range(len(lengths))], dtype=torch.int32,
                              device=device)
    document = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                       torch.tensor(lengths, device=device))

    def packed_fn(name):
        import flashtile

        def run(q, k, v):  # (1, H, total, D) views as (total, H, D), the varlen layout
            # squeeze, not t[0]: both are views, but the backward of indexing (select) writes the
            # gradient into a new zero tensor and copies that again into the leaves' layout,
            # 0.5 ms on the H100 that a user holding (total, H, D) tensors never pays.
            q, k, v = (t.squeeze(0).transpose(0, 1) for t in (q, k, v))
            out = flashtile.varlen_attention(q, k, v, cu_seqlens, cu_seqlens, longest, longest, causal=True,
                                             impl=name)
            return out.transpose(0, 1).unsqueeze(0)

        return run

    def document_mask(n_q, n_k):
        return lambda b, h, q_idx, kv_idx: (document[q_idx] == document[kv_idx]) & (q_idx >= kv_idx)

    contenders = [(name, "packed", packed_fn(name), "packed") for name in impls if name in IMPLEMENTATIONS]
    contenders += [(name, "padded batch", attention_fn(name, causal=True), "padded")
                   for name in ("sdpa_flash", "sdpa_cudnn") if name in impls]
    if "flex" in impls:
        contenders.append(("flex", "packed, document mask", flex_fn(mask_mod=document_mask), "packed"))
    return contenders


def varlen_inputs(sizes, layout, dtype, device):
    """((q, k, v), d_out) for a `varlen_contenders` layout. Packed: the sequences one after
    another in one (1, H, total, D) tensor, stored as (total, H, D) (the varlen layout).
    Padded: (B, H, longest, D), right-padded."""
    lengths = sizes.varlen_lengths()
    if layout == "padded":
        return random_inputs(len(lengths), sizes.heads, max(lengths), sizes.head_dim, dtype, device)
    inputs, d_out = random_inputs(1, sizes.heads, sum(lengths), sizes.head_dim, dtype, device)
    return tuple(t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in inputs), d_out


def varlen_rows(sizes, impls, dtype, device, cpu_reps=3):
    """A packed causal batch of sequences of different lengths, beside SDPA on the padded
    batch and FlexAttention with a document mask on the packed one."""
    lengths, heads, head_dim = sizes.varlen_lengths(), sizes.heads, sizes.head_dim
    flops = packed_flops(lengths, heads, head_dim, causal=True)
    shape = f"{len(lengths)} sequences, lengths {lengths} (total {sum(lengths)}), H {heads}, D {head_dim}, causal"
    rows = []
    for name, note, fn, layout in varlen_contenders(sizes, impls, device):
        row = dict(workload="varlen", impl=name, note=note, shape=shape, dtype=str(dtype).replace("torch.", ""))
        try:
            inputs, d_out = varlen_inputs(sizes, layout, dtype, device)
            row.update(measure_speed(fn, inputs, d_out, device, flops, cpu_reps))
            if "fwd_ms" in row:
                row["fwd_mib"] = forward_peak_mib(fn, inputs, device)
        except Exception as error:  # noqa: BLE001
            row["error"] = failure(error)
        rows.append(row)
    return rows


def feature_rows(sizes, impls, dtype, device, cpu_reps=3):
    rows = []
    for workload in workloads(sizes):
        rows += workload_rows(workload, impls, dtype, device, cpu_reps)
    return rows + varlen_rows(sizes, impls, dtype, device, cpu_reps)


def window_widths(n):
    """Powers of two from n / 64 (at least 8, and at least n / 4 below 256 keys, where the
    interpreter runs them) up to n, n itself (full causal) last."""
    widths, w = [], max(8, n // 64 if n >= 256 else n // 4)
    while w < n:
        widths.append(w)
        w *= 2
    return widths + [n]


def window_sweep_rows(sizes, impls, dtype, device, cpu_reps=3):
    """Causal sliding windows of growing width at N = sizes.n: flashtile and FlexAttention."""
    n, heads, head_dim = sizes.n, sizes.heads, sizes.head_dim
    rows = []
    for width in window_widths(n):
        w = Workload("window_sweep", 1, heads, heads, n, head_dim, window_size=(width - 1, 0))
        shape = Workload("window_sweep", 1, heads, heads, n, head_dim).shape()  # the width is a column
        flops = workload_flops(1, heads, n, n, head_dim, True, w.window_size)
        for name in [name for name in impls if name in IMPLEMENTATIONS] + (["flex"] if "flex" in impls else []):
            row = dict(workload="window_sweep", impl=name, window=width, shape=shape,
                       dtype=str(dtype).replace("torch.", ""))
            try:
                inputs, d_out = random_inputs(1, heads, n, head_dim, dtype, device)
                fn = attention_fn(name, causal=True, window_size=w.window_size)
                row.update(measure_speed(fn, inputs, d_out, device, flops, cpu_reps))
            except Exception as error:  # noqa: BLE001
                row["error"] = failure(error)
            rows.append(row)
    return rows
