"""PNG plots of `python -m flashtile.bench` results (matplotlib, no display needed).

One line per implementation, sequence length on a log2 axis, one panel per case:

- fwd_latency.png, fwd_bwd_latency.png: ms, log scale, panels (dtype, D) x causal;
- fwd_tflops.png, fwd_bwd_tflops.png: TFLOP/s, linear, same panels;
- memory.png: peak extra MiB of forward+backward, log scale, with O(N) and O(N^2) guides;
- stability.png: max |error| vs float64, log scale, panels (dtype, D, causal) x (O, dQ, dK, dV),
  PyTorch's own same-precision error dashed in black.

Points that failed (OOM or unsupported) are left out; the legend says from which N an
implementation ran out of memory.
"""
import os

from .bench import TORCH_SAME_PRECISION

QUANTITY_LABELS = {"out": "O", "dq": "dQ", "dk": "dK", "dv": "dV"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _styles(impls):
    """A fixed colour and marker per implementation, the same in every plot."""
    import matplotlib

    colours = matplotlib.colormaps["tab10"].colors
    markers = "osD^v<>ph*"
    return {name: dict(color=colours[i % 10], marker=markers[i % len(markers)]) for i, name in enumerate(impls)}


def _grid(plt, n_rows, n_cols, title, width=4.6, height=3.4):
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(width * n_cols, height * n_rows), squeeze=False)
    fig.suptitle(title)
    return fig, axes


def _save(fig, out_dir, name):
    fig.tight_layout()
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return name


def _log2_x(ax, seqs):
    ax.set_xscale("log", base=2)
    ax.set_xticks(seqs)
    ax.set_xticklabels([f"{n // 1024}k" if n >= 1024 else str(n) for n in seqs])
    ax.set_xlabel("sequence length N")
    ax.grid(True, which="both", alpha=0.3)


def _lines(ax, rows, impls, styles, value, linestyle="-"):
    """One line per implementation: value(row) against N; OOM noted in the label."""
    for name in impls:
        mine = sorted((r for r in rows if r["impl"] == name), key=lambda r: r["N"])
        good = [r for r in mine if "error" not in r]
        oom = [r["N"] for r in mine if r.get("error") == "OOM"]
        if not good and not oom:
            continue
        label = name + (f" (OOM from N={min(oom)})" if oom else "")
        ax.plot([r["N"] for r in good], [value(r) for r in good], label=label, linestyle=linestyle,
                markersize=4, **styles[name])


def _case_title(dtype, d, causal=None):
    text = f"{dtype}, D={d}"
    return text if causal is None else text + (", causal" if causal else ", not causal")


def _speed_plot(plt, rows, styles, out_dir, env, key, ylabel, title, filename, log_y):
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    seqs = sorted({r["N"] for r in rows})
    panels = list(dict.fromkeys((r["dtype"], r["D"]) for r in rows))
    causals = list(dict.fromkeys(r["causal"] for r in rows))
    where = env["gpu"] if env["device"] == "cuda" else "CPU (interpreter: says nothing of GPU speed)"
    fig, axes = _grid(plt, len(panels), len(causals), f"{title} on {where}")
    for i, (dtype, d) in enumerate(panels):
        for j, causal in enumerate(causals):
            ax = axes[i][j]
            case = [r for r in rows if (r["dtype"], r["D"], r["causal"]) == (dtype, d, causal)]
            _lines(ax, case, impls, styles, lambda r: r[key])
            _log2_x(ax, seqs)
            if log_y:
                ax.set_yscale("log")
            ax.set_ylabel(ylabel)
            ax.set_title(_case_title(dtype, d, causal))
            ax.legend(fontsize=7)
    return _save(fig, out_dir, filename)


def _memory_plot(plt, rows, styles, out_dir, env):
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    seqs = sorted({r["N"] for r in rows})
    # Memory hardly depends on causal masking: the first causal setting measured is shown.
    causal = rows[0]["causal"]
    panels = list(dict.fromkeys((r["dtype"], r["D"]) for r in rows))
    fig, axes = _grid(plt, 1, len(panels), "Peak memory of forward+backward\nbeyond q, k, v, dO "
                      f"(B={rows[0]['B']}, {'causal' if causal else 'not causal'})", width=5.5, height=4.4)
    for j, (dtype, d) in enumerate(panels):
        ax = axes[0][j]
        case = [r for r in rows if (r["dtype"], r["D"], r["causal"]) == (dtype, d, causal)]
        _lines(ax, case, impls, styles, lambda r: r["fwd_bwd_mib"])
        good = [r["fwd_bwd_mib"] for r in case if "error" not in r and r["fwd_bwd_mib"] > 0]
        if good and len(seqs) > 1:
            # Guides through the smallest measurement: slope 1 (O(N)) and slope 2 (O(N^2)).
            n0, m0 = seqs[0], min(good)
            ax.plot(seqs, [m0 * n / n0 for n in seqs], color="grey", linestyle=":", label="O(N) guide")
            ax.plot(seqs, [m0 * (n / n0) ** 2 for n in seqs], color="grey", linestyle="--", label="O(N²) guide")
        _log2_x(ax, seqs)
        ax.set_yscale("log")
        ax.set_ylabel(f"MiB (H={case[0]['H'] if case else '?'})")
        ax.set_title(_case_title(dtype, d))
        ax.legend(fontsize=7)
    return _save(fig, out_dir, "memory.png")


def _stability_plot(plt, rows, styles, out_dir, env):
    impls = list(dict.fromkeys(r["impl"] for r in rows if r["impl"] != TORCH_SAME_PRECISION))
    seqs = sorted({r["N"] for r in rows})
    cases = list(dict.fromkeys((r["dtype"], r["D"], r["causal"]) for r in rows))
    fig, axes = _grid(plt, len(cases), 4, "max |error| vs float64 (lower is better; dashed black: PyTorch's own "
                      "computation in the same precision)", width=4.0, height=3.2)
    for i, (dtype, d, causal) in enumerate(cases):
        case = [r for r in rows if (r["dtype"], r["D"], r["causal"]) == (dtype, d, causal)]
        for j, quantity in enumerate(QUANTITY_LABELS):
            ax = axes[i][j]
            _lines(ax, [r for r in case if r["impl"] != TORCH_SAME_PRECISION], impls, styles, lambda r: r[quantity])
            torch_rows = sorted((r for r in case if r["impl"] == TORCH_SAME_PRECISION and "error" not in r),
                                key=lambda r: r["N"])
            ax.plot([r["N"] for r in torch_rows], [r[quantity] for r in torch_rows], color="black",
                    linestyle="--", linewidth=2, label=TORCH_SAME_PRECISION)
            _log2_x(ax, seqs)
            ax.set_yscale("log")
            ax.set_title(f"{QUANTITY_LABELS[quantity]}: {_case_title(dtype, d, causal)}", fontsize=9)
            if j == 0:
                ax.set_ylabel("max |error|")
                ax.legend(fontsize=6)
    return _save(fig, out_dir, "stability.png")


def write_plots(results, env, out_dir):
    """Write the plots for whichever parts `results` (speed, memory, stability) holds;
    return the file names."""
    plt = _pyplot()
    every = [r["impl"] for part in ("speed", "memory", "stability") for r in results.get(part, [])]
    styles = _styles([name for name in dict.fromkeys(every) if name != TORCH_SAME_PRECISION])
    written = []
    speed = results.get("speed") or []
    if speed:
        for key, ylabel, title, log_y in (
                ("fwd_ms", "ms (median)", "Forward latency", True),
                ("fwd_bwd_ms", "ms (median)", "Forward+backward latency", True),
                ("fwd_tflops", "TFLOP/s", "Forward TFLOP/s", False),
                ("fwd_bwd_tflops", "TFLOP/s", "Forward+backward TFLOP/s", False)):
            name = key.replace("_ms", "_latency") + ".png"
            written.append(_speed_plot(plt, speed, styles, out_dir, env, key, ylabel, title, name, log_y))
    if results.get("memory"):
        written.append(_memory_plot(plt, results["memory"], styles, out_dir, env))
    if results.get("stability"):
        written.append(_stability_plot(plt, results["stability"], styles, out_dir, env))
    return written
