"""The training part: a small Llama (transformers, random init, no downloads) trained for a few
steps with each attention implementation, on the same data from the same initial weights.

- Model: transformers.LlamaConfig at TrainingSizes (GQA), built by
  AutoModelForCausalLM.from_config(config, attn_implementation=...) for "flashtile" (this
  package's transformers integration, its default implementation), "sdpa" and "eager"; the
  global seed is set before each build, and every row records a checksum of its initial weights.
- Data: sequences of a fixed random sparse Markov chain (each token has FANOUT possible
  successors with random probabilities), sampled on the device from a seeded generator, the
  same batches for every implementation. The best possible loss is the chain's conditional
  entropy on those tokens, recorded as loss_floor: the curves fall towards it.
- Training: mixed precision as it is usually done, float32 weights, gradients and AdamW
  moments with the forward and backward under torch.autocast(bfloat16) (on the CPU too);
  AdamW (betas 0.9, 0.95, weight decay 0.1) with a linear warm-up to a constant learning
  rate, gradient norm clipped at 1.
- Time: each step synchronised, by perf_counter; the median over the steps after the first
  few (compilation and autotuning happen there). Peak memory: the most the run allocated on
  the GPU beyond what was allocated before its model was built.

Whether flashtile's loss curve is sdpa's within noise: the noise yardstick is eager attention,
a second correct bf16 attention, run on the same data. loss_gaps() gives max and mean
|loss - loss_sdpa| over the steps for flashtile and for eager.
"""
import dataclasses
import statistics
import time

import torch

from .measure import failure, free_memory, synchronize

# The attn_implementation names of the three runs; flashtile's is its integration's NAME.
REFERENCE, YARDSTICK = "sdpa", "eager"
EXTRA_HINT = "the training part needs transformers: pip install flashtile[transformers]"
FANOUT = 4  # successors of each token in the Markov chain
UNTIMED_STEPS = 5  # first steps left out of the median step time (at most half the steps)


@dataclasses.dataclass(frozen=True)
class TrainingSizes:
    """The model, data and schedule of the training part on one kind of machine."""
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    seq: int
    batch: int
    steps: int
    warmup: int = 10
    lr: float = 1e-3
    seed: int = 0

    def describe(self):
        return (f"Llama hidden {self.hidden}, {self.layers} layers, {self.heads}/{self.kv_heads} heads of "
                f"{self.head_dim}, MLP {self.intermediate}, vocab {self.vocab}; batch {self.batch} x {self.seq} "
                f"tokens, {self.steps} steps")


def transformers_available():
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def implementations():
    """The attn_implementation names trained, flashtile first."""
    from ..integrations.transformers import NAME

    return [NAME, REFERENCE, YARDSTICK]


def markov_batches(sizes, device):
    """(tokens (steps, batch, seq), loss_floor): every step's batch, sampled from the chain.
    loss_floor is the mean -log p(next | current) over the predicted tokens: the loss of a
    model that knows the chain."""
    gen = torch.Generator(device=device).manual_seed(sizes.seed)
    successors = torch.randint(sizes.vocab, (sizes.vocab, FANOUT), generator=gen, device=device)
    probs = torch.softmax(2.0 * torch.randn(sizes.vocab, FANOUT, generator=gen, device=device), dim=-1)
    cumulative = probs.cumsum(-1)
    rows = sizes.steps * sizes.batch
    tokens = torch.empty(rows, sizes.seq, dtype=torch.long, device=device)
    tokens[:, 0] = torch.randint(sizes.vocab, (rows,), generator=gen, device=device)
    log_likelihood = torch.zeros((), device=device)
    for i in range(1, sizes.seq):
        # Inverse-CDF sampling: the first successor whose cumulative probability exceeds u.
        u = torch.rand(rows, 1, generator=gen, device=device)
        choice = (u > cumulative[tokens[:, i - 1]]).sum(-1).clamp_max(FANOUT - 1)
        tokens[:, i] = successors[tokens[:, i - 1], choice]
        log_likelihood += probs[tokens[:, i - 1], choice].log().sum()
    loss_floor = -log_likelihood.item() / (rows * (sizes.seq - 1))
    return tokens.view(sizes.steps, sizes.batch, sizes.seq), loss_floor


def build_model(sizes, attn_implementation, device):
    import transformers

    from ..integrations import transformers as _registers_flashtile  # noqa: F401

    config = transformers.LlamaConfig(
        vocab_size=sizes.vocab, hidden_size=sizes.hidden, intermediate_size=sizes.intermediate,
        num_hidden_layers=sizes.layers, num_attention_heads=sizes.heads, num_key_value_heads=sizes.kv_heads,
        head_dim=sizes.head_dim, max_position_embeddings=sizes.seq, attention_dropout=0.0, tie_word_embeddings=False)
    torch.manual_seed(sizes.seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.to(device=device).train()


def training_row(sizes, attn_implementation, device):
    """Train one model; a row with its per-step losses and times, or its error."""
    row = dict(impl=attn_implementation, model=sizes.describe(), tokens_per_step=sizes.batch * sizes.seq,
               precision="float32 weights, bf16 autocast")
    model = optimizer = None
    try:
        data, row["loss_floor"] = markov_batches(sizes, device)
        row["data_checksum"] = int(data.sum().item())
        free_memory(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        allocated_before = torch.cuda.memory_allocated() if device == "cuda" else 0
        model = build_model(sizes, attn_implementation, device)
        row["init_checksum"] = sum(p.detach().double().abs().sum().item() for p in model.parameters())
        optimizer = torch.optim.AdamW(model.parameters(), lr=sizes.lr, betas=(0.9, 0.95), weight_decay=0.1)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / sizes.warmup))
        losses, step_ms = [], []
        for batch in data:
            synchronize(device)
            start = time.perf_counter()
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = model(input_ids=batch, labels=batch).loss  # labels are shifted inside the model
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            synchronize(device)
            step_ms.append((time.perf_counter() - start) * 1e3)
        untimed = min(UNTIMED_STEPS, len(step_ms) // 2)
        row.update(losses=losses, step_ms=step_ms, untimed_steps=untimed,
                   median_step_ms=statistics.median(step_ms[untimed:]))
        row["tokens_per_s"] = row["tokens_per_step"] / row["median_step_ms"] * 1e3
        if device == "cuda":
            row["peak_mib"] = (torch.cuda.max_memory_allocated() - allocated_before) / 2**20
    except Exception as error:  # noqa: BLE001 - e.g. OOM: recorded, the run goes on
        row["error"] = failure(error)
    finally:
        model = optimizer = None
        free_memory(device)
    return row


def loss_gaps(rows):
    """{impl: (max, mean) |loss - loss_sdpa| over the steps} for every other trained row."""
    reference = next((r for r in rows if r["impl"] == REFERENCE and "losses" in r), None)
    if reference is None:
        return {}
    gaps = {}
    for r in rows:
        if r is not reference and "losses" in r:
            diffs = [abs(a - b) for a, b in zip(r["losses"], reference["losses"])]
            gaps[r["impl"]] = (max(diffs), statistics.fmean(diffs))
    return gaps
