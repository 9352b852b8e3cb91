"""The command line: `python -m flashtile.bench` (or `flashtile-bench`).

Parses and checks the options (a bad value is one line on stderr and exit status 2), plans the
points of the chosen parts, measures them one after another (bench.json rewritten after each,
so that an interrupted run keeps what it measured), then prints the markdown report and
writes it with the plots.
"""
import argparse
import dataclasses
import os
import sys
import time
from functools import partial

import torch

from . import features, grid, report, training
from .features import FeatureSizes
from .impls import ALL_IMPLS, default_impls
from .training import TrainingSizes

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
PARTS = ("speed", "memory", "stability", "features", "window_sweep", "training")
# Training a model needs an optional extra (transformers) and measures the model, not the kernels: on request only.
DEFAULT_PARTS = tuple(part for part in PARTS if part != "training")

# The sizes of each mode. Speed runs B = tokens / N, H = model dim / D on the GPU, B 1, H 2 on
# the CPU; memory B 1 and the same H; stability B 1, H 4 (GPU) or 2 (CPU). Training: a Llama
# whose step takes tens of ms on an H100 (GPU), or a few layers the interpreter runs in seconds.
TRAINING_GPU = TrainingSizes(hidden=512, layers=8, heads=8, kv_heads=2, head_dim=64, intermediate=1408, vocab=4096,
                             seq=1024, batch=8, steps=100)
TRAINING_CPU = TrainingSizes(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=128,
                             seq=32, batch=2, steps=3, warmup=2)
GRIDS = {
    "gpu": dict(seqs=(256, 512, 1024, 2048, 4096, 8192, 16384), head_dims=(64, 128),
                stability_seqs=(256, 1024, 4096), features=FeatureSizes(16384, 128, 16, (32, 4), 4096),
                training=TRAINING_GPU),
    "gpu_quick": dict(seqs=(1024, 2048), head_dims=(64,), stability_seqs=(256, 1024),
                      features=FeatureSizes(4096, 128, 16, (32, 4), 1024),
                      training=dataclasses.replace(TRAINING_GPU, steps=30)),
    "cpu": dict(seqs=(32, 64, 128), head_dims=(32,), stability_seqs=(32, 64, 128),
                features=FeatureSizes(128, 16, 2, (8, 1), 32), training=TRAINING_CPU),
    "cpu_quick": dict(seqs=(16, 32), head_dims=(16,), stability_seqs=(16, 32),
                      features=FeatureSizes(32, 16, 2, (8, 1), 8), training=dataclasses.replace(TRAINING_CPU, steps=2)),
}


def describe_grid(mode):
    g = GRIDS[mode]
    join = lambda xs: ",".join(map(str, xs))  # noqa: E731
    return (f"speed/memory N {join(g['seqs'])} D {join(g['head_dims'])}; stability N {join(g['stability_seqs'])}; "
            f"features/window sweep {g['features'].describe()}; training {g['training'].describe()}")


CPU_MODE = ("Triton's interpreter and PyTorch on the host, speed/memory at B 1 H 2, FlexAttention uncompiled "
            "and forward only; figures that say nothing of GPU speed")


class Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line, not the usage block: what was wrong and where to look."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def comma_list(choices=None, item=str):
    """An argparse type: comma-separated values, each an `item` and, if given, one of `choices`."""
    def parse(text):
        values = []
        for word in (w.strip() for w in text.split(",")):
            try:
                value = item(word)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{word!r} is not a {item.__name__}") from None
            if choices is not None and value not in choices:
                raise argparse.ArgumentTypeError(f"invalid choice {word!r} (choose from {', '.join(choices)})")
            if item is int and value <= 0:
                raise argparse.ArgumentTypeError(f"{word!r} is not a positive int")
            values.append(value)
        return values

    return parse


def positive_int(text):
    return comma_list(item=int)(text)[0]


def parse_args(argv):
    parser = Parser(prog="flashtile-bench", description=sys.modules["flashtile.bench"].__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter,
                    epilog=f"grids without --quick: on a GPU, {describe_grid('gpu')}; without a GPU ({CPU_MODE}), "
                    f"{describe_grid('cpu')}. Speed runs B = tokens / N, H = model dim / D on a GPU.")
    parser.add_argument("--parts", type=comma_list(PARTS), default=list(DEFAULT_PARTS),
                        help=f"which measurements, from {','.join(PARTS)} (default: all but training, which "
                        "needs pip install flashtile[transformers])")
    parser.add_argument("--impls", type=comma_list(ALL_IMPLS), default=None,
                        help=f"contenders, from {','.join(ALL_IMPLS)} (default: all that can run here)")
    parser.add_argument("--dtypes", type=comma_list(tuple(DTYPES)), default=["fp16"], help="fp16, bf16 or fp16,bf16")
    parser.add_argument("--seqs", type=comma_list(item=int), default=None,
                        help="sequence lengths of speed and memory (default: the grid's)")
    parser.add_argument("--head-dims", type=comma_list(item=int), default=None, help="head dims (default: the grid's)")
    parser.add_argument("--causal", type=comma_list(("0", "1")), default=["0", "1"], help="0, 1 or 0,1")
    parser.add_argument("--tokens", type=positive_int, default=16384, help="B * N of the speed grid on the GPU")
    parser.add_argument("--model-dim", type=positive_int, default=2048,
                        help="H * D of the speed and memory grids on the GPU")
    parser.add_argument("--stability-seqs", type=comma_list(item=int), default=None,
                        help="sequence lengths of the stability table (default: the grid's; float64 needs "
                        "B H N^2 * 8 bytes a matrix)")
    parser.add_argument("--train-steps", type=positive_int, default=None,
                        help="optimizer steps of the training part (default: the grid's; 100 on a GPU). Training "
                        "always trains float32 weights under bf16 autocast, whatever --dtypes says")
    parser.add_argument("--quick", action="store_true",
                        help=f"a small grid. On a GPU: {describe_grid('gpu_quick')}. Without a GPU ({CPU_MODE}): "
                        f"{describe_grid('cpu_quick')}")
    parser.add_argument("--out", default=None,
                        help="directory for bench.json, report.md and the plots "
                        "(default results_tmp/bench-<date-time>, git-ignored)")
    parser.add_argument("--no-plots", action="store_true", help="JSON and markdown only")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--from-json", default=None, metavar="BENCH_JSON",
                        help="measure nothing: print the report of a bench.json "
                        "(and with --out, write it and its plots)")
    args = parser.parse_args(argv)
    if args.from_json and not os.path.isfile(args.from_json):
        parser.error(f"argument --from-json: no such file {args.from_json!r}")
    if "training" in args.parts and not args.from_json and not training.transformers_available():
        parser.error(training.EXTRA_HINT)
    return args


class Progress:
    """tqdm when installed and wanted, else one line per point on stderr (or nothing)."""

    def __init__(self, total, on):
        self.total, self.on, self.done, self.bar = total, on, 0, None
        if on:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, file=sys.stderr, mininterval=1.0, dynamic_ncols=True, unit="pt")
            except ImportError:
                pass

    def step(self, text):
        self.done += 1
        if self.bar is not None:
            self.bar.set_description(text)
            self.bar.update(1)
        elif self.on:
            print(f"[{self.done}/{self.total}] {text}", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def plan(args, on_gpu):
    """([(part, description, measure)], settings): measure() gives a row or a list of rows."""
    device = "cuda" if on_gpu else "cpu"
    mode = ("gpu" if on_gpu else "cpu") + ("_quick" if args.quick else "")
    sizes = GRIDS[mode]
    seqs, head_dims = args.seqs or sizes["seqs"], args.head_dims or sizes["head_dims"]
    stability_seqs = args.stability_seqs or sizes["stability_seqs"]
    feature_sizes = sizes["features"]
    training_sizes = sizes["training"]
    if args.train_steps:
        training_sizes = dataclasses.replace(training_sizes, steps=args.train_steps,
                                             warmup=min(training_sizes.warmup, args.train_steps))
    causals = [c == "1" for c in args.causal]
    dtypes = [DTYPES[name] for name in args.dtypes]
    impls = args.impls or default_impls(on_gpu)
    cpu_reps = 1 if args.quick else 3

    def heads(head_dim):
        return max(1, args.model_dim // head_dim) if on_gpu else 2

    def speed_batch(n):
        return max(1, args.tokens // n) if on_gpu else 1

    cases = [(dt, d, c) for dt in dtypes for d in head_dims for c in causals]
    steps = []
    for part in args.parts:
        if part == "speed":
            steps += [(part, f"{dt} D={d} causal={int(c)} N={n} {name}",
                       partial(grid.speed_row, name, speed_batch(n), heads(d), n, d, c, dt, device, cpu_reps))
                      for dt, d, c in cases for n in seqs for name in impls]
        elif part == "memory":
            steps += [(part, f"{dt} D={d} causal={int(c)} N={n} {name}",
                       partial(grid.memory_row, name, 1, heads(d), n, d, c, dt, device))
                      for dt, d, c in cases for n in seqs for name in impls]
        elif part == "stability":
            steps += [(part, f"{dt} D={d} causal={int(c)} N={n}",
                       partial(grid.stability_rows, impls, 1, 4 if on_gpu else 2, n, d, c, dt, device))
                      for dt, d, c in cases for n in stability_seqs]
        elif part == "features":
            for dt in dtypes:
                steps += [(part, f"{dt} {w.name}", partial(features.workload_rows, w, impls, dt, device, cpu_reps))
                          for w in features.workloads(feature_sizes)]
                steps.append((part, f"{dt} varlen",
                              partial(features.varlen_rows, feature_sizes, impls, dt, device, cpu_reps)))
        elif part == "window_sweep":
            steps += [(part, f"{dt}", partial(features.window_sweep_rows, feature_sizes, impls, dt, device, cpu_reps))
                      for dt in dtypes]
        elif part == "training":
            steps += [(part, name, partial(training.training_row, training_sizes, name, device))
                      for name in training.implementations()]
    settings = dict(mode=mode, parts=args.parts, impls=impls, dtypes=args.dtypes, seqs=list(seqs),
                    head_dims=list(head_dims), causal=causals, stability_seqs=list(stability_seqs),
                    features=dataclasses.asdict(feature_sizes), training=dataclasses.asdict(training_sizes),
                    tokens=args.tokens, model_dim=args.model_dim, quick=args.quick)
    return steps, settings


def main(argv=None):
    args = parse_args(argv)
    if args.from_json:
        results, env = report.load_json(args.from_json)
        finish(results, env, args.out, plots=not args.no_plots)
        return results
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        # The kernels must be decorated by the interpreter: before any kernel module is imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        print(report.CPU_NOTE, file=sys.stderr, flush=True)
    out_dir = args.out or os.path.join("results_tmp", time.strftime("bench-%Y%m%d-%H%M%S"))
    os.makedirs(out_dir, exist_ok=True)
    steps, settings = plan(args, on_gpu)
    settings["command"] = " ".join(["python -m flashtile.bench"] + list(sys.argv[1:] if argv is None else argv))
    env = report.environment("cuda" if on_gpu else "cpu")
    results = {part: [] for part in PARTS}
    progress = Progress(len(steps), not args.no_progress)
    for part, description, measure in steps:
        rows = measure()
        results[part] += rows if isinstance(rows, list) else [rows]
        progress.step(f"{part} {description}")
        report.save_json(out_dir, env, settings, results)
    progress.close()
    finish(results, env, out_dir, plots=not args.no_plots)
    return results


def finish(results, env, out_dir, plots=True):
    """Print the markdown report; with out_dir, write it and the plots beside bench.json."""
    text = report.markdown(results, env)
    print(text)
    if not out_dir:
        return
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(text + "\n")
    written = [name for name in ("bench.json", "report.md") if os.path.exists(os.path.join(out_dir, name))]
    if plots:
        try:
            from .plots import write_plots

            written += write_plots(results, env, out_dir)
        except ImportError as error:  # matplotlib is the bench extra, not a dependency
            print(f"flashtile-bench: no plots ({error}; pip install flashtile[bench])", file=sys.stderr)
    print(f"\nwrote {', '.join(written)} under {out_dir}")
