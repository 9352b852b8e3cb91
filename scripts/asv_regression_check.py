"""Compare two commits' asv results; exit 1 if a benchmark got slower by more than a factor.

    python scripts/asv_regression_check.py BASE NEW [--results asv_bench/results]
                                           [--machine h100] [--factor 1.1] [--bench REGEX]

BASE and NEW are commit hashes (at least the 8 characters asv names its files by). Reads
RESULTS/MACHINE/<hash8>-<env>.json as asv writes them (the JSON directly, so that neither
asv nor a GPU is needed) and compares every benchmark and parameter set that both have:

- time_*: slower when NEW / BASE > factor;
- track_*tflops*: slower when BASE / NEW > factor (fewer TFLOP/s is slower);
- other track_* (memory, error): printed, never a failure.

Points skipped or failed in either result are listed as n/a. Exit status: 0 when nothing
slowed down by more than the factor, 1 when something did, 2 on a usage error (no result
file for a commit, or nothing in common to compare). `asv compare`'s own exit status is 1
for any comparison, so it cannot serve as the check.
"""
import argparse
import glob
import itertools
import json
import math
import os
import re
import sys


def load_results(results_dir, machine, commit):
    """{(benchmark, params): value} of one commit's result file; value None where skipped/failed."""
    pattern = os.path.join(results_dir, machine, f"{commit[:8]}-*.json")
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise FileNotFoundError(f"no asv result for commit {commit} under {os.path.join(results_dir, machine)}")
    values = {}
    for path in paths:  # one file per environment; normally one
        with open(path) as f:
            data = json.load(f)
        columns = data.get("result_columns", ["result", "params"])
        for name, entry in data.get("results", {}).items():
            row = dict(zip(columns, entry))
            result, params = row.get("result"), row.get("params") or []
            combos = list(itertools.product(*params)) if params else [()]
            if not isinstance(result, list):
                result = [result]
            for combo, value in zip(combos, result):
                if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
                    values[(name, combo)] = float(value)
                else:
                    values[(name, combo)] = None
    return values


def kind(name):
    short = name.rsplit(".", 1)[-1]
    if short.startswith("time_"):
        return "time"
    if short.startswith("track_") and "tflops" in short:
        return "rate"
    return "info"


def compare(base, new, factor):
    """Rows (benchmark, params, base, new, slowdown, verdict) and the number of slowdowns.

    slowdown > 1 means NEW is slower (time ratio, or inverse rate ratio)."""
    rows, slower = [], 0
    for key in sorted(set(base) & set(new), key=lambda k: (k[0], [str(p) for p in k[1]])):
        name, combo = key
        a, b = base[key], new[key]
        if a is None or b is None:
            rows.append((name, combo, a, b, None, "n/a"))
            continue
        how = kind(name)
        if how == "info":
            ratio = b / a if a else math.inf if b else 1.0
            rows.append((name, combo, a, b, ratio, "info"))
            continue
        if a <= 0 or b <= 0:
            rows.append((name, combo, a, b, None, "n/a"))
            continue
        slowdown = b / a if how == "time" else a / b
        if slowdown > factor:
            verdict, slower = "SLOWER", slower + 1
        elif slowdown < 1 / factor:
            verdict = "faster"
        else:
            verdict = "same"
        rows.append((name, combo, a, b, slowdown, verdict))
    return rows, slower


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base")
    parser.add_argument("new")
    parser.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "..", "asv_bench", "results"))
    parser.add_argument("--machine", default="h100")
    parser.add_argument("--factor", type=float, default=1.1, help="allowed slowdown (1.1 = 10%%)")
    parser.add_argument("--all", action="store_true", help="print every comparison, not only changes")
    parser.add_argument("--bench", default=None, metavar="REGEX",
                        help="only benchmarks whose 'name [params]' matches, e.g. \"'v2'\" or time_")
    args = parser.parse_args(argv)
    try:
        base = load_results(args.results, args.machine, args.base)
        new = load_results(args.results, args.machine, args.new)
    except FileNotFoundError as error:
        print(f"asv_regression_check: {error}", file=sys.stderr)
        return 2
    if args.bench:
        pattern = re.compile(args.bench)
        keep = lambda key: pattern.search(f"{key[0]} {list(key[1])}")  # noqa: E731
        base = {k: v for k, v in base.items() if keep(k)}
        new = {k: v for k, v in new.items() if keep(k)}
    rows, slower = compare(base, new, args.factor)
    measured = [r for r in rows if r[5] in ("SLOWER", "faster", "same")]
    if not measured:
        print("asv_regression_check: no speed benchmark measured in both commits", file=sys.stderr)
        return 2
    print(f"{args.base[:8]} -> {args.new[:8]} on {args.machine}: slowdown = new/base for time_*, "
          f"base/new for TFLOP/s; fails above {args.factor:g}")
    print(f"{'verdict':7} {'slowdown':>8} {'base':>11} {'new':>11}  benchmark [params]")
    for name, combo, a, b, ratio, verdict in rows:
        if not args.all and verdict in ("same", "n/a", "info"):
            continue
        show = lambda x: "n/a" if x is None else f"{x:.4g}"  # noqa: E731
        print(f"{verdict:7} {show(ratio):>8} {show(a):>11} {show(b):>11}  {name} {list(combo)}")
    counts = {v: sum(1 for r in rows if r[5] == v) for v in ("SLOWER", "faster", "same", "n/a", "info")}
    print(f"{counts['SLOWER']} slower, {counts['faster']} faster, {counts['same']} within {args.factor:g}x, "
          f"{counts['n/a']} n/a, {counts['info']} not speed")
    return 1 if slower else 0


if __name__ == "__main__":
    sys.exit(main())
