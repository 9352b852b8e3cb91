"""flashtile as a Hugging Face transformers attention implementation.

    import flashtile.integrations.transformers  # registers "flashtile"
    model = AutoModelForCausalLM.from_config(config, attn_implementation="flashtile")
    model.set_attn_implementation("flashtile")

transformers' attention layers call `attention_forward(module, query, key, value,
attention_mask, dropout=, scaling=, sliding_window=, softcap=, is_causal=, **kwargs)` with query
(B, Hq, Nq, D) and key, value (B, Hkv, Nk, D), and take back (out (B, Nq, Hq, D), None). With
a KV cache the queries are the last Nq of the Nk positions: flashtile's bottom-right causal
alignment. GQA needs nothing: flashtile reads K/V head h // (Hq // Hkv) itself.

The mask: the model builds it with the mask function registered beside the attention
function, FlashAttention-2's (transformers' own): a 2-D (B, Nk) mask of the real tokens, or
None when there is no padding. Causality, the sliding window and the softcap arrive as
arguments and become flashtile's. A padded batch is unpadded, run through
`flashtile.varlen_attention` (so no query ever sees a padding key) and padded back with zeros.
Packed sequences (batch 1, cu_seq_lens_* given or position_ids restarting) run as varlen too.
What flashtile cannot do raises instead of being dropped: dropout > 0, a 4-D or float mask,
attention sinks (s_aux).
"""
import functools

import torch

try:
    import transformers
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
except ImportError as error:
    raise ImportError("flashtile.integrations.transformers needs transformers: pip install flashtile[transformers]"
                      ) from error

import flashtile

NAME = "flashtile"


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                      softcap=None, is_causal=None, s_aux=None, **kwargs):
    """transformers' attention function contract, computed by flashtile (see the module docstring)."""
    if dropout:
        raise ValueError(f"attn_implementation='flashtile' has no attention dropout, got dropout={dropout} "
                         "(set the config's attention_dropout to 0, or call model.eval())")
    if s_aux is not None:
        raise ValueError("attn_implementation='flashtile' does not support attention sinks (s_aux)")
    if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.is_floating_point()):
        raise ValueError(f"attn_implementation='flashtile' takes a 2-D (batch, keys) mask of the real tokens, got an "
                         f"attention_mask of shape {tuple(attention_mask.shape)} and dtype {attention_mask.dtype}; an "
                         "arbitrary (4-D or float) mask needs attn_implementation='sdpa' or 'eager'")
    if query.dtype == torch.float32 and torch.is_autocast_enabled(query.device.type):
        # Under autocast the rotary embedding hands back float32 q and k (its cos and sin follow
        # the float32 hidden states): attend in the autocast dtype, as transformers' flash path does.
        dtype = torch.get_autocast_dtype(query.device.type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    is_causal = module.is_causal if is_causal is None else is_causal
    options = dict(causal=bool(is_causal), scale=scaling, softcap=float(softcap or 0.0),
                   window_size=_window_size(sliding_window, is_causal))
    packed = _packed_sequences(query, key, kwargs) if attention_mask is None else None
    if packed is not None:
        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k = packed
        out = flashtile.varlen_attention(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                                         cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **options)
        return out.unsqueeze(0), None
    if attention_mask is None:
        return flashtile.attention(query, key, value, **options).transpose(1, 2), None
    return _padded_attention(query, key, value, attention_mask.bool(), options), None


def _window_size(sliding_window, is_causal):
    """transformers' sliding window w: a query sees itself and the w - 1 keys before it (and, if
    not causal, the w - 1 after it), as FlashAttention-2's window (w - 1, w - 1)."""
    if sliding_window is None:
        return (-1, -1)
    return (sliding_window - 1, -1 if is_causal else sliding_window - 1)


def _unpad(x, indices):
    """(B, H, N, D) -> (total, H, D): the rows `indices` of the flattened (B * N) positions."""
    return x.transpose(1, 2).flatten(0, 1).index_select(0, indices)


def _cu_seqlens(real):
    lengths = real.sum(dim=1, dtype=torch.int32)
    return torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0)), lengths


def _padded_attention(query, key, value, key_real, options):
    """Attention over the real tokens of a padded batch, zeros at the padded queries.
    key_real (B, Nk) bool; the queries are the last Nq positions, so their mask is its last Nq columns."""
    batch, heads, n_q, head_dim = query.shape
    query_real = key_real[:, -n_q:]
    q_indices, k_indices = query_real.flatten().nonzero().flatten(), key_real.flatten().nonzero().flatten()
    cu_seqlens_q, lengths_q = _cu_seqlens(query_real)
    cu_seqlens_k, lengths_k = _cu_seqlens(key_real)
    max_seqlen_q, max_seqlen_k = torch.stack([lengths_q.max(), lengths_k.max()]).tolist()  # one sync
    out = flashtile.varlen_attention(_unpad(query, q_indices), _unpad(key, k_indices), _unpad(value, k_indices),
                                     cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **options)
    padded = out.new_zeros(batch * n_q, heads, head_dim).index_put((q_indices,), out)
    return padded.view(batch, n_q, heads, head_dim)


def _packed_sequences(query, key, kwargs):
    """(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) when batch row 0 holds several
    sequences back to back (padding-free training), else None. transformers says so with
    cu_seq_lens_* / max_length_* arguments, or only with position_ids that restart at 0."""
    if query.shape[0] != 1:
        return None
    cu_seqlens_q, cu_seqlens_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_seqlens_q is not None and cu_seqlens_k is not None:
        max_seqlen_q, max_seqlen_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
        return (cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32),
                None if max_seqlen_q is None else int(max_seqlen_q), None if max_seqlen_k is None else int(max_seqlen_k))
    position_ids = kwargs.get("position_ids")
    n_q = query.shape[2]
    if position_ids is None or n_q == 1 or n_q != key.shape[2] or position_ids.shape[-1] != n_q:
        return None
    positions = position_ids.reshape(-1)
    starts = (positions == 0).nonzero().flatten()
    if starts.numel() <= 1:  # one sequence (or positions that never restart): plain attention
        return None
    boundaries = torch.cat([starts, starts.new_tensor([n_q])])
    if boundaries[0].item() != 0:
        boundaries = torch.cat([starts.new_tensor([0]), boundaries])
    cu_seqlens = boundaries.to(torch.int32)
    return cu_seqlens, cu_seqlens, None, None


def _without_flash_kernel_loading(lazy_import_flash_attention):
    """transformers takes every attn_implementation whose name contains "flash" for a FlashAttention
    kernel, and when a model is built it loads that kernel (from the flash-attn package or the
    hub) by the name. flashtile is not such a kernel, only an attention function: skip the load
    for it, and leave every other name to transformers."""
    if getattr(lazy_import_flash_attention, "skips_flashtile", False):
        return lazy_import_flash_attention

    @functools.wraps(lazy_import_flash_attention)
    def load(implementation, *args, **kwargs):
        if implementation == NAME:
            return None
        return lazy_import_flash_attention(implementation, *args, **kwargs)

    load.skips_flashtile = True
    return load


def register():
    """Register "flashtile" (done on import; idempotent)."""
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["flash_attention_2"])
    modeling_utils = transformers.modeling_utils
    if hasattr(modeling_utils, "lazy_import_flash_attention"):
        modeling_utils.lazy_import_flash_attention = _without_flash_kernel_loading(
            modeling_utils.lazy_import_flash_attention)


register()
