"""The benchmark's report: the environment it ran in, markdown tables, and bench.json.

bench.json holds {"environment", "settings", "rows" (speed), "memory", "stability",
"features", "window_sweep", "training"}: every measurement (training rows with their per-step
losses and times), so that the tables and plots can be made
again from it (`--from-json`).
"""
import json
import os
import platform
import subprocess
import time

import torch

from ..testing import QUANTITIES
from .grid import TORCH_SAME_PRECISION
from .impls import cuda_reference_built
from .training import REFERENCE, YARDSTICK, loss_gaps

CPU_NOTE = ("NOTE: no CUDA device. These are CPU figures (Triton's interpreter, PyTorch on the host) "
            "at tiny sizes: they check that the benchmark runs and say nothing about GPU speed.")
PARTS_IN_JSON = {"speed": "rows", "memory": "memory", "stability": "stability", "features": "features",
                 "window_sweep": "window_sweep", "training": "training"}


def source_commit(where=os.path.dirname(os.path.abspath(__file__))):
    """The commit of the measured code: FLASHTILE_COMMIT when set, else git's HEAD at `where`,
    with "+changes" appended when tracked files differ from it (a working tree copied beside
    an older .git then cannot pass for that commit)."""
    commit = os.environ.get("FLASHTILE_COMMIT", "")
    if commit:
        return commit
    git = lambda *args: subprocess.run(["git", *args], capture_output=True, text=True, cwd=where)  # noqa: E731
    try:
        head = git("rev-parse", "HEAD").stdout.strip()
        changed = head and git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except OSError:
        return "unknown"
    return (head + "+changes" if changed else head) or "unknown"


def environment(device):
    import triton

    on_gpu = device == "cuda"
    return dict(device=device,
                gpu=torch.cuda.get_device_name() if on_gpu else "none",
                cpu=platform.processor() or platform.machine(),
                torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version() if on_gpu else None,
                python=platform.python_version(), commit=source_commit(),
                date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                portable=os.environ.get("FLASHTILE_PORTABLE", "0") == "1",
                autotune=os.environ.get("FLASHTILE_AUTOTUNE", "1") != "0",
                interpreter=os.environ.get("TRITON_INTERPRET", "0") == "1",
                cuda_reference_built=cuda_reference_built(),
                note=None if on_gpu else CPU_NOTE)


# ---------------------------------------------------------------------------------------
# Cells and tables
# ---------------------------------------------------------------------------------------

def number(x):
    """3 significant digits, no exponent above 1: 364, 12.5, 0.0123."""
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def value(row, key, error_key=None, scale=1.0):
    """A measured value formatted, or what stopped it: OOM or n.a. (the notes say why)."""
    if key in row:
        return number(row[key] * scale)
    error = row.get("error") or row.get(error_key or "")
    return "OOM" if error == "OOM" else "n.a."


def pair(row, key_fwd, key_fwd_bwd, scale=1.0):
    """"forward / forward+backward" of one row."""
    return f"{value(row, key_fwd, 'fwd_error', scale)} / {value(row, key_fwd_bwd, 'fwd_bwd_error', scale)}"


def grid_table(rows, cell, key_names=("dtype", "D", "causal", "N")):
    """A markdown table: one line per case (key_names), one column per contender."""
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    cases = list(dict.fromkeys(tuple(r[k] for k in key_names) for r in rows))
    by_key = {(r["impl"],) + tuple(r[k] for k in key_names): r for r in rows}
    lines = ["| " + " | ".join(key_names) + " | " + " | ".join(impls) + " |",
             "|" + "---|" * (len(key_names) + len(impls))]
    for case in cases:
        cells = [cell(by_key[(impl,) + case]) if (impl,) + case in by_key else "-" for impl in impls]
        lines.append("| " + " | ".join(str(int(c) if isinstance(c, bool) else c) for c in case) + " | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def speed_table(rows):
    """Forward / forward+backward TFLOP/s, one line per (dtype, D, causal, N)."""
    return grid_table(rows, lambda r: pair(r, "fwd_tflops", "fwd_bwd_tflops"))


def latency_table(rows):
    return grid_table(rows, lambda r: pair(r, "fwd_ms", "fwd_bwd_ms"))


def first_call_table(rows):
    """The first forward+backward on a new shape (compilation and autotuning) in seconds,
    beside the steady-state forward+backward in ms."""
    def cell(r):
        if "first_call_ms" not in r and "fwd_bwd_ms" not in r:
            return value(r, "fwd_bwd_ms", "fwd_bwd_error")
        return f"{value(r, 'first_call_ms', 'fwd_bwd_error', 1e-3)} s / {value(r, 'fwd_bwd_ms', 'fwd_bwd_error')} ms"

    return grid_table(rows, cell)


def memory_table(rows):
    return grid_table(rows, lambda r: f"{value(r, 'fwd_mib')} / {value(r, 'fwd_bwd_mib')}")


def stability_table(rows):
    """max |error| vs float64 of O, dQ, dK, dV: one line per case and contender."""
    lines = ["| dtype | D | causal | N | impl | O | dQ | dK | dV |", "|" + "---|" * 9]
    for r in rows:
        cells = ([("OOM" if r["error"] == "OOM" else "n.a.")] * 4 if "error" in r
                 else [f"{r[key]:.1e}" for key in QUANTITIES])
        name = f"*{r['impl']}*" if r["impl"] == TORCH_SAME_PRECISION else r["impl"]
        case = f"| {r['dtype']} | {r['D']} | {int(r['causal'])} | {r['N']} | {name} | "
        lines.append(case + " | ".join(cells) + " |")
    return "\n".join(lines)


def contender(row):
    return row["impl"] + (f" ({row['note']})" if row.get("note") else "")


def feature_tables(rows):
    """One table per workload and dtype: a line per contender, TFLOP/s, ms, first-call cost and
    the forward's peak memory beyond the inputs."""
    lines = []
    for workload, dtype in dict.fromkeys((r["workload"], r["dtype"]) for r in rows):
        mine = [r for r in rows if r["workload"] == workload and r["dtype"] == dtype]
        lines += [f"**{workload}** ({mine[0]['dtype']}; {mine[0]['shape']})", "",
                  "| contender | TFLOP/s fwd / fwd+bwd | ms fwd / fwd+bwd | first call, s | fwd peak MiB |",
                  "|---|---|---|---|---|"]
        lines += [f"| {contender(r)} | {pair(r, 'fwd_tflops', 'fwd_bwd_tflops')} | {pair(r, 'fwd_ms', 'fwd_bwd_ms')} "
                  f"| {value(r, 'first_call_ms', 'fwd_bwd_error', 1e-3)} | {value(r, 'fwd_mib', 'fwd_error')} |"
                  for r in mine]
        lines.append("")
    return "\n".join(lines).rstrip()


def window_sweep_table(rows):
    """ms forward / forward+backward per window width, one column per contender."""
    return grid_table(rows, lambda r: pair(r, "fwd_ms", "fwd_bwd_ms"), key_names=("dtype", "window"))


def training_table(rows):
    """One line per attention implementation: step time, throughput, memory, the loss curve's
    ends and its gap to sdpa's."""
    gaps = loss_gaps(rows)
    lines = ["| attn_implementation | median step, ms | tokens/s | peak MiB | loss first -> last | "
             f"max / mean abs(loss - {REFERENCE} loss) |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['impl']} | " + " | ".join(["OOM" if r["error"] == "OOM" else "n.a."] * 5) + " |")
            continue
        gap = f"{gaps[r['impl']][0]:.3g} / {gaps[r['impl']][1]:.3g}" if r["impl"] in gaps else "-"
        lines.append(f"| {r['impl']} | {value(r, 'median_step_ms')} | {r['tokens_per_s']:.0f} | {value(r, 'peak_mib')} "
                     f"| {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f} | {gap} |")
    return "\n".join(lines)


def training_notes(rows):
    """What the training table's figures mean, and whether the runs started from the same place."""
    done = [r for r in rows if "losses" in r]
    if not done:
        return ""
    same = len({r["init_checksum"] for r in done}) == 1 and len({r["data_checksum"] for r in done}) == 1
    first = done[0]
    return (f"{first['model']}; {first['precision']}; AdamW, linear warm-up. Every run starts from the "
            f"{'same' if same else 'DIFFERENT (check!)'} initial weights on the same batches of a random sparse "
            f"Markov chain (best possible loss {first['loss_floor']:.3f}). Step time: the median over the steps "
            f"after the first {first['untimed_steps']}. The noise yardstick for flashtile's gap to {REFERENCE}'s "
            f"curve is {YARDSTICK}'s gap to it: {YARDSTICK} attention is another correct bf16 computation of the "
            "same model on the same data."
            + ("" if "peak_mib" in first else " Peak memory is measured on the GPU only."))


def errors_in(rows):
    """The distinct non-OOM errors, so that an n.a. in a table can be looked up."""
    who = {}  # error -> the contenders it stopped
    for r in rows:
        for key in ("error", "fwd_error", "fwd_bwd_error"):
            if r.get(key) and r[key] != "OOM":
                who.setdefault(r[key], {}).setdefault(contender(r), None)
    return [f"- {', '.join(names)}: {error}" for error, names in who.items()]


def grid_shape(rows):
    """"B = 16384 / N, H = 2048 / D" where the grid keeps tokens or model dim fixed, else the values."""
    def one(name, per, product):
        values = {r[name] for r in rows}
        if len(values) == 1:
            return f"{name} = {values.pop()}"
        return f"{name} = {rows[0][name] * rows[0][per]} / {per}" if product else f"{name} = {sorted(values)}"

    same_tokens = len({r["B"] * r["N"] for r in rows}) == 1
    same_model_dim = len({r["H"] * r["D"] for r in rows}) == 1
    return f"{one('B', 'N', same_tokens)}, {one('H', 'D', same_model_dim)}"


def markdown(results, env):
    """The whole report as markdown."""
    on_gpu = env["device"] == "cuda"
    where = env["gpu"] if on_gpu else f"CPU ({env['cpu']}), Triton interpreter"
    head, plus, changes = env["commit"].partition("+")
    lines = [f"## flashtile.bench on {where}",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, commit {head[:10] + plus + changes}, "
             f"{env['date']}"]
    if env.get("note"):
        lines.append(env["note"])
    speed, memory, stability = results.get("speed", []), results.get("memory", []), results.get("stability", [])
    features, sweep = results.get("features", []), results.get("window_sweep", [])
    trained = results.get("training", [])
    if speed:
        lines += ["", f"### Forward / forward+backward TFLOP/s ({grid_shape(speed)})", "", speed_table(speed),
                  "", "### Forward / forward+backward latency, ms", "", latency_table(speed),
                  "", "### First forward+backward on a new shape (compilation and autotuning; a kernel already in "
                  "Triton's on-disk cache is only loaded) / steady-state forward+backward", "",
                  first_call_table(speed)]
    if memory:
        lines += ["", "### Peak memory beyond q, k, v, dO: forward (no grad) / forward+backward, MiB "
                  f"({grid_shape(memory)})", "", memory_table(memory)]
    if stability:
        lines += ["", "### max |error| vs float64 of O, dQ, dK, dV "
                  f"(B = 1, H = {stability[0]['H']}; *{TORCH_SAME_PRECISION}* is PyTorch's own computation "
                  "in that dtype)", "", stability_table(stability)]
    if features:
        lines += ["", "### Features: each workload beside PyTorch's paths for the same work (TFLOP/s count the "
                  "workload's visible keys and real tokens, for every contender)", "", feature_tables(features)]
    if sweep:
        lines += ["", f"### Causal sliding window: ms forward / forward+backward by window width ({sweep[0]['shape']}"
                  "; a kernel that skips the blocks outside the window costs in proportion to the width)", "",
                  window_sweep_table(sweep)]
    if trained:
        lines += ["", "### Training a small Llama: step time and loss curve beside sdpa's", "", training_notes(trained),
                  "", training_table(trained)]
    notes = errors_in(speed + memory + stability + features + sweep + trained)
    if notes:
        lines += ["", "n.a. means:"] + notes
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# bench.json
# ---------------------------------------------------------------------------------------

def save_json(out_dir, env, settings, results):
    """Write out_dir/bench.json atomically (called after every point: an interrupted run keeps
    what it measured)."""
    path = os.path.join(out_dir, "bench.json")
    data = dict(environment=env, settings=settings)
    data.update({key: results.get(part, []) for part, key in PARTS_IN_JSON.items()})
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".tmp", path)


def load_json(path):
    """(results, environment) of a bench.json."""
    with open(path) as f:
        data = json.load(f)
    return {part: data.get(key, []) for part, key in PARTS_IN_JSON.items()}, data["environment"]
