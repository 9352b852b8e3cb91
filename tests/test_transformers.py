"""attn_implementation="flashtile" in Hugging Face transformers models nobody here wrote.

Tiny random-init models from their configs (no downloads): Llama (GQA), Mistral (sliding
window), Gemma 2 (softcap, sliding window on every other layer, GQA) and Qwen2.
- A padded batch (right-padded rows, and a left-padded one, since with causal attention only
  left padding sits where real queries could see it): the logits on the real tokens and the
  gradients of every attention projection are within 3x of eager attention's error in the
  same dtype, both measured against eager attention in float32 (the model's own truth).
- Greedy generate with left padding and a KV cache (decode steps: Nq = 1 < Nk, bottom-right
  causal) gives the tokens that "sdpa" gives (eager for Gemma 2, which has no sdpa), except
  after a near-tie of the reference's own logits (check_generate says how near).
On the CPU the kernels run in the Triton interpreter: a few layers, 16-token sequences. The
@pytest.mark.gpu versions run a few hundred tokens in fp16 and bf16.
"""
import copy
import importlib
import sys

import pytest
import torch

from conftest import INTERPRETING

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed: pip install flashtile[transformers]")
import flashtile.integrations.transformers as flashtile_transformers  # noqa: E402  registers "flashtile"

ERROR_FACTOR = 3.0
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
SLIDING_WINDOW = 6
# Where greedy generate may pick another token: the reference's two candidates within this many
# ulps (of the dtype, at the largest logit) of each other.
NEAR_TIE_ULPS = 8


def _config(family, vocab=128, hidden=64, layers=2, heads=4, kv_heads=2):
    """A tiny config of one model family. initializer_range 0.1 (not 0.02) spreads the logits
    apart, so that a greedy choice is not a near-tie that rounding could flip."""
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
                  initializer_range=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "llama":
        return transformers.LlamaConfig(**common)
    if family == "mistral":
        return transformers.MistralConfig(sliding_window=SLIDING_WINDOW, **common)
    if family == "gemma2":
        # A small softcap, so that tanh bends the scores of this tiny model (Gemma 2 ships 50).
        return transformers.Gemma2Config(sliding_window=SLIDING_WINDOW, attn_logit_softcapping=2.0,
                                         query_pre_attn_scalar=hidden // heads,
                                         layer_types=["sliding_attention", "full_attention"] * (layers // 2),
                                         **common)
    if family == "qwen2":
        return transformers.Qwen2Config(**common)
    raise ValueError(family)


FAMILIES = ["llama", "mistral", "gemma2", "qwen2"]
# What generate is compared with: "sdpa", except where transformers has no sdpa for the model
# (Gemma 2: its softcap), where eager attention is its reference.
GENERATE_REFERENCE = {"gemma2": "eager"}


def _model(family, attn_implementation, device, dtype=torch.float32, layers=2, seed=0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_config(family, layers=layers),
                                                          attn_implementation=attn_implementation)
    return model.to(device=device, dtype=dtype).eval()


def _padded_batch(lengths, n, vocab, device, sides, seed=0):
    """input_ids (B, n) and attention_mask with lengths[b] real tokens in row b, padded on sides[b]
    ("right" or "left"; one string for every row)."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (len(lengths), n), generator=gen)
    positions = torch.arange(n)
    sides = [sides] * len(lengths) if isinstance(sides, str) else sides
    real = torch.stack([positions < length if side == "right" else positions >= n - length
                        for length, side in zip(lengths, sides)])
    input_ids[~real] = 0
    return input_ids.to(device), real.long().to(device)


def _logits_and_grads(model, input_ids, attention_mask):
    """Logits at the real tokens (float32) and the gradients of the attention projections'
    weights of the mean loss of predicting each real token from the real token before it.
    (Not the model's own `labels` loss: at a left-padded row that would also predict the first
    real token from the last padding position, whose output is no implementation's business.)"""
    model.zero_grad(set_to_none=True)
    real = attention_mask.bool()
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    pairs = real[:, :-1] & real[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1][pairs], input_ids[:, 1:][pairs])
    loss.backward()
    grads = {name: param.grad.float() for name, param in model.named_parameters()
             if name.rsplit(".", 2)[-2] in ATTENTION_PROJECTIONS}
    return logits[real].detach(), grads


def _max_error(x, truth):
    return (x - truth).abs().max().item()


def check_padded_batch(family, dtype, device, lengths, n, sides, autocast=False):
    """autocast: float32 weights run under torch.autocast(dtype) (the usual way to train in
    mixed precision) instead of weights cast to dtype."""
    reference = _model(family, "eager", device)
    model_eager = copy.deepcopy(reference) if autocast else copy.deepcopy(reference).to(dtype)
    model_flashtile = copy.deepcopy(model_eager)
    model_flashtile.set_attn_implementation("flashtile")
    input_ids, attention_mask = _padded_batch(lengths, n, reference.config.vocab_size, device, sides)
    truth = _logits_and_grads(reference, input_ids, attention_mask)
    with torch.autocast(device, dtype=dtype, enabled=autocast):
        eager = _logits_and_grads(model_eager, input_ids, attention_mask)
        flashtile = _logits_and_grads(model_flashtile, input_ids, attention_mask)
    problems = []
    for name, truth_value, eager_value, value in (
            [("logits", truth[0], eager[0], flashtile[0])]
            + [(param, truth[1][param], eager[1][param], flashtile[1][param]) for param in truth[1]]):
        eager_error, error = _max_error(eager_value, truth_value), _max_error(value, truth_value)
        if not error <= ERROR_FACTOR * eager_error:
            problems.append(f"{name}: flashtile error {error:.3g} > {ERROR_FACTOR} x eager's {eager_error:.3g}")
    assert not problems, f"{family} {dtype}:\n" + "\n".join(problems)


def check_generate(family, dtype, device, lengths, n, new_tokens):
    reference = GENERATE_REFERENCE.get(family, "sdpa")
    model = _model(family, reference, device, dtype)
    input_ids, attention_mask = _padded_batch(lengths, n, model.config.vocab_size, device, "left", seed=1)
    options = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens, do_sample=False,
                   min_new_tokens=new_tokens)
    expected = model.generate(**options)
    model.set_attn_implementation("flashtile")
    got = model.generate(**options)
    model.set_attn_implementation(reference)
    assert got.shape == expected.shape
    # Greedy decoding turns a rounding difference into another token only at a near-tie, and
    # every later token then differs. So each row must match up to its first difference, and
    # there the reference's own logits must rate both tokens within a few ulps of its largest.
    for row in (got != expected).any(dim=1).nonzero().flatten().tolist():
        step = (got[row] != expected[row]).nonzero()[0].item()
        prefix_mask = torch.cat([attention_mask[row], attention_mask.new_ones(step - n)])
        with torch.no_grad():
            logits = model(input_ids=expected[row:row + 1, :step], attention_mask=prefix_mask[None]).logits
        logits = logits[0, -1].float()
        margin = (logits[expected[row, step]] - logits[got[row, step]]).item()
        near_tie = NEAR_TIE_ULPS * torch.finfo(dtype).eps * logits.abs().max().item()
        assert margin <= near_tie, (f"{family} {dtype}, row {row}: flashtile chose token {got[row, step].item()} "
                                    f"at position {step}, {reference} chose {expected[row, step].item()}, which its "
                                    f"logits rate {margin:.3g} higher (a near-tie would be <= {near_tie:.3g})")


interpreter = pytest.mark.skipif(not INTERPRETING, reason="runs kernels on CPU tensors: needs TRITON_INTERPRET=1")


@interpreter
@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_cpu(family):
    check_padded_batch(family, torch.bfloat16, "cpu", lengths=[16, 11, 9], n=16, sides=["right", "right", "left"])


@interpreter
def test_autocast_cpu():
    """float32 weights under bf16 autocast: the rotary embedding hands flashtile float32 q and k."""
    check_padded_batch("llama", torch.bfloat16, "cpu", lengths=[16, 11], n=16, sides="right", autocast=True)


@interpreter
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_left_padded_cpu(family):
    check_generate(family, torch.float16, "cpu", lengths=[10, 4], n=10, new_tokens=6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_gpu(family, dtype):
    check_padded_batch(family, dtype, "cuda", lengths=[300, 173, 257], n=300, sides=["right", "right", "left"])


@pytest.mark.gpu
def test_autocast_gpu():
    check_padded_batch("gemma2", torch.bfloat16, "cuda", lengths=[300, 173], n=300, sides="right", autocast=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_left_padded_gpu(family, dtype):
    check_generate(family, dtype, "cuda", lengths=[200, 131, 77], n=200, new_tokens=16)


@interpreter
def test_packed_sequences_match_separate_runs():
    """Batch 1 holding two sequences back to back (position_ids restart at 0): each attends to
    itself only, as if run alone."""
    model = _model("llama", "flashtile", "cpu", torch.float16)
    input_ids, _ = _padded_batch([12], 12, model.config.vocab_size, "cpu", "right")
    first, second = input_ids[:, :5], input_ids[:, 5:]
    position_ids = torch.cat([torch.arange(5), torch.arange(7)]).unsqueeze(0)
    with torch.no_grad():
        packed = model(input_ids=input_ids, position_ids=position_ids).logits
        alone = torch.cat([model(input_ids=first).logits, model(input_ids=second).logits], dim=1)
    torch.testing.assert_close(packed, alone, rtol=0, atol=0)


def _attention_inputs(batch=1, n=4):
    query = torch.zeros(batch, 4, n, 16, dtype=torch.float16)
    key = torch.zeros(batch, 2, n, 16, dtype=torch.float16)
    return query, key, key.clone()


class _Layer(torch.nn.Module):
    is_causal = True


def test_dropout_raises():
    with pytest.raises(ValueError, match="dropout"):
        flashtile_transformers.attention_forward(_Layer(), *_attention_inputs(), None, dropout=0.1)


@pytest.mark.parametrize("mask", [torch.zeros(1, 1, 4, 4), torch.ones(1, 4, dtype=torch.float32)],
                         ids=["4d", "float"])
def test_arbitrary_mask_raises(mask):
    with pytest.raises(ValueError, match="attention_mask"):
        flashtile_transformers.attention_forward(_Layer(), *_attention_inputs(), mask)


def test_model_with_dropout_raises_in_training():
    model = _model("llama", "flashtile", "cpu", torch.float16)
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    model.train()
    with pytest.raises(ValueError, match="dropout"):
        model(input_ids=torch.ones(1, 4, dtype=torch.long))


def test_registered_by_import():
    assert "flashtile" in transformers.AttentionInterface._global_mapping
    assert "flashtile" in transformers.masking_utils.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping


def test_import_without_transformers_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    monkeypatch.delitem(sys.modules, "flashtile.integrations.transformers")
    with pytest.raises(ImportError, match=r"pip install flashtile\[transformers\]"):
        importlib.import_module("flashtile.integrations.transformers")
