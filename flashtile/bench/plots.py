"""PNG plots of the benchmark's results (matplotlib, no display needed).

Readability rules: one colour and marker per contender in every plot; one legend per figure,
outside the panels; a y axis turns logarithmic where the curves of a panel span more than a
factor LOG_SPAN (one slow contender would otherwise squash the others flat).

- fwd_latency.png, fwd_bwd_latency.png, fwd_tflops.png, fwd_bwd_tflops.png: against N (log2),
  panels (dtype, D) x causal;
- memory.png: peak extra MiB of forward+backward, log scale, with O(N) and O(N^2) guides;
- stability.png: max |error| vs float64, log scale, panels (dtype, D, causal) x (O, dQ, dK, dV),
  PyTorch's own same-precision error dashed in black;
- features.png: TFLOP/s forward and forward+backward per contender, one panel per workload;
- window_sweep.png: forward and forward+backward ms against the window width, log-log, with a
  guide of slope 1 (cost proportional to the width);
- training.png: the loss curve of each attention implementation, and each one's |loss - sdpa's
  loss| per step (log scale), the noise yardstick (eager) beside flashtile.

Points that failed (OOM or not applicable) are left out; the legend says from which N a
contender ran out of memory.
"""
import os

from .grid import TORCH_SAME_PRECISION
from .training import REFERENCE

QUANTITY_LABELS = {"out": "O", "dq": "dQ", "dk": "dK", "dv": "dV"}
LOG_SPAN = 20.0


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _styles(names):
    """A fixed colour and marker per contender, the same in every plot."""
    import matplotlib

    colours = matplotlib.colormaps["tab10"].colors
    markers = "osD^v<>ph*"
    return {name: dict(color=colours[i % 10], marker=markers[i % len(markers)]) for i, name in enumerate(names)}


def _figure(plt, n_rows, n_cols, title, width=4.6, height=3.4):
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(width * n_cols + 2.2, height * n_rows), squeeze=False,
                             layout="constrained")
    fig.suptitle(title)
    return fig, axes


def _save(plt, fig, out_dir, name):
    """One legend for the whole figure, right of the panels, then write the PNG."""
    labelled = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labelled.setdefault(label, handle)
    if labelled:
        fig.legend(labelled.values(), labelled.keys(), loc="outside right upper", fontsize=8)
    fig.savefig(os.path.join(out_dir, name), dpi=110)
    plt.close(fig)
    return name


def _y_scale(ax, values):
    """Logarithmic where the panel's values span more than LOG_SPAN."""
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > LOG_SPAN:
        ax.set_yscale("log")


def _log2_x(ax, seqs, label="sequence length N"):
    ax.set_xscale("log", base=2)
    ax.set_xticks(seqs)
    ax.set_xticklabels([f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n) for n in seqs])
    ax.set_xlabel(label)
    ax.grid(True, which="both", alpha=0.3)


def _lines(ax, rows, styles, key, x="N", linestyle="-"):
    """One line per contender: row[key] against row[x]; returns the values drawn."""
    drawn = []
    for name in dict.fromkeys(r["impl"] for r in rows):
        mine = sorted((r for r in rows if r["impl"] == name), key=lambda r: r[x])
        good = [r for r in mine if key in r]
        oom = [r[x] for r in mine if "OOM" in (r.get("error"), r.get("fwd_error"), r.get("fwd_bwd_error"))]
        if not good:
            continue
        label = name + (f" (OOM from {x}={min(oom)})" if oom else "")
        ax.plot([r[x] for r in good], [r[key] for r in good], label=label, linestyle=linestyle, markersize=4,
                **styles[name])
        drawn += [r[key] for r in good]
    return drawn


def _case_title(dtype, d, causal=None):
    text = f"{dtype}, D={d}"
    return text if causal is None else text + (", causal" if causal else ", not causal")


def _where(env):
    return env["gpu"] if env["device"] == "cuda" else "CPU (interpreter: says nothing of GPU speed)"


def _speed_plot(plt, rows, styles, out_dir, env, key, ylabel, title, filename):
    seqs = sorted({r["N"] for r in rows})
    panels = list(dict.fromkeys((r["dtype"], r["D"]) for r in rows))
    causals = list(dict.fromkeys(r["causal"] for r in rows))
    fig, axes = _figure(plt, len(panels), len(causals), f"{title} on {_where(env)}")
    for i, (dtype, d) in enumerate(panels):
        for j, causal in enumerate(causals):
            ax = axes[i][j]
            drawn = _lines(ax, [r for r in rows if (r["dtype"], r["D"], r["causal"]) == (dtype, d, causal)],
                           styles, key)
            _log2_x(ax, seqs)
            _y_scale(ax, drawn)
            ax.set_ylabel(ylabel)
            ax.set_title(_case_title(dtype, d, causal))
    return _save(plt, fig, out_dir, filename)


def _memory_plot(plt, rows, styles, out_dir):
    seqs = sorted({r["N"] for r in rows})
    causal = rows[0]["causal"]  # memory hardly depends on causal masking: the first setting is shown
    panels = list(dict.fromkeys((r["dtype"], r["D"]) for r in rows))
    fig, axes = _figure(plt, 1, len(panels), "Peak memory of forward+backward beyond q, k, v, dO "
                        f"(B={rows[0]['B']}, {'causal' if causal else 'not causal'})", width=5.5, height=4.4)
    for j, (dtype, d) in enumerate(panels):
        ax = axes[0][j]
        case = [r for r in rows if (r["dtype"], r["D"], r["causal"]) == (dtype, d, causal)]
        drawn = [m for m in _lines(ax, case, styles, "fwd_bwd_mib") if m > 0]
        if drawn and len(seqs) > 1:
            # Guides through the smallest measurement: slope 1 (O(N)) and slope 2 (O(N^2)).
            n0, m0 = seqs[0], min(drawn)
            ax.plot(seqs, [m0 * n / n0 for n in seqs], color="grey", linestyle=":", label="O(N) guide")
            ax.plot(seqs, [m0 * (n / n0) ** 2 for n in seqs], color="grey", linestyle="--", label="O(N²) guide")
        _log2_x(ax, seqs)
        ax.set_yscale("log")
        ax.set_ylabel(f"MiB (H={case[0]['H'] if case else '?'})")
        ax.set_title(_case_title(dtype, d))
    return _save(plt, fig, out_dir, "memory.png")


def _stability_plot(plt, rows, styles, out_dir):
    seqs = sorted({r["N"] for r in rows})
    cases = list(dict.fromkeys((r["dtype"], r["D"], r["causal"]) for r in rows))
    fig, axes = _figure(plt, len(cases), 4, "max |error| vs float64 (lower is better; dashed black: PyTorch's own "
                        "computation in the same precision)", width=4.0, height=3.2)
    for i, (dtype, d, causal) in enumerate(cases):
        case = [r for r in rows if (r["dtype"], r["D"], r["causal"]) == (dtype, d, causal)]
        for j, quantity in enumerate(QUANTITY_LABELS):
            ax = axes[i][j]
            _lines(ax, [r for r in case if r["impl"] != TORCH_SAME_PRECISION], styles, quantity)
            torch_rows = sorted((r for r in case if r["impl"] == TORCH_SAME_PRECISION and quantity in r),
                                key=lambda r: r["N"])
            ax.plot([r["N"] for r in torch_rows], [r[quantity] for r in torch_rows], color="black",
                    linestyle="--", linewidth=2, label=TORCH_SAME_PRECISION)
            _log2_x(ax, seqs)
            ax.set_yscale("log")
            ax.set_title(f"{QUANTITY_LABELS[quantity]}: {_case_title(dtype, d, causal)}", fontsize=9)
            if j == 0:
                ax.set_ylabel("max |error|")
    return _save(plt, fig, out_dir, "stability.png")


def _features_plot(plt, rows, styles, out_dir, env):
    """Bars: forward (solid) and forward+backward (hatched) TFLOP/s of each contender."""
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    fig, axes = _figure(plt, 1, len(workloads), f"Feature workloads, TFLOP/s over the visible keys on {_where(env)}"
                        "\n(solid: forward, hatched: forward+backward; missing: not applicable)", width=4.2, height=4.0)
    for j, workload in enumerate(workloads):
        ax = axes[0][j]
        mine = [r for r in rows if r["workload"] == workload]
        drawn = []
        for i, r in enumerate(mine):
            colour = styles[r["impl"]]["color"]
            for offset, key, hatch in ((-0.2, "fwd_tflops", None), (0.2, "fwd_bwd_tflops", "//")):
                if key in r:
                    ax.bar(i + offset, r[key], width=0.38, color=colour, hatch=hatch, edgecolor="white",
                           label=r["impl"])
                    drawn.append(r[key])
                else:
                    ax.annotate("n.a.", (i + offset, 0.01), xycoords=("data", "axes fraction"), ha="center",
                                fontsize=6, rotation=90)
        _y_scale(ax, drawn)
        ax.set_xticks(range(len(mine)))
        ax.set_xticklabels([r["impl"] + (f"\n{r['note']}" if r.get("note") else "") for r in mine], rotation=30,
                           ha="right", fontsize=7)
        ax.set_title(workload)
        ax.set_ylabel("TFLOP/s")
        ax.grid(True, axis="y", alpha=0.3)
    return _save(plt, fig, out_dir, "features.png")


def _window_sweep_plot(plt, rows, styles, out_dir, env):
    widths = sorted({r["window"] for r in rows})
    fig, axes = _figure(plt, 1, 2, f"Causal sliding window on {_where(env)}: {rows[0]['shape']}", width=5.0, height=4.0)
    for ax, key, title in zip(axes[0], ("fwd_ms", "fwd_bwd_ms"), ("forward", "forward+backward")):
        drawn = [t for t in _lines(ax, rows, styles, key, x="window") if t > 0]
        timed = [r for r in rows if r.get(key, 0) > 0]
        if timed and len(widths) > 1:
            # Slope 1 through the narrowest window timed: where a kernel's cost follows the width.
            first = min(timed, key=lambda r: r["window"])
            ax.plot(widths, [first[key] * w / first["window"] for w in widths], color="grey", linestyle=":",
                    label="∝ width guide")
        _log2_x(ax, widths, label="window width (keys a query sees)")
        if drawn:
            ax.set_yscale("log")
        ax.set_ylabel("ms (median)")
        ax.set_title(title)
    return _save(plt, fig, out_dir, "window_sweep.png")


def _training_plot(plt, rows, styles, out_dir, env):
    done = [r for r in rows if "losses" in r]
    reference = next((r for r in done if r["impl"] == REFERENCE), None)
    fig, axes = _figure(plt, 1, 2, f"Training a small Llama on {_where(env)}\n{done[0]['model']}", width=5.0,
                        height=4.0)
    for r, linestyle in zip(done, ("-", "--", ":", "-.") * len(done)):  # the curves overlap: tell them apart
        steps = range(1, len(r["losses"]) + 1)
        axes[0][0].plot(steps, r["losses"], label=r["impl"], linewidth=1.5, linestyle=linestyle,
                        **dict(styles[r["impl"]], marker=None))
        if reference is not None and r is not reference:
            gaps = [abs(a - b) for a, b in zip(r["losses"], reference["losses"])]
            axes[0][1].plot(steps, gaps, label=r["impl"], linewidth=1, **dict(styles[r["impl"]], marker=None))
    axes[0][0].axhline(done[0]["loss_floor"], color="grey", linestyle=":", label="best possible loss")
    axes[0][0].set_ylabel("training loss")
    axes[0][0].set_title("loss per step")
    axes[0][1].set_ylabel(f"abs(loss - {REFERENCE} loss)")
    axes[0][1].set_title(f"gap to {REFERENCE}'s curve")
    gap_lines = axes[0][1].get_lines()
    if gap_lines and all(min(line.get_ydata()) > 0 for line in gap_lines):
        axes[0][1].set_yscale("log")
    for ax in axes[0]:
        ax.set_xlabel("step")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(True, which="both", alpha=0.3)
    return _save(plt, fig, out_dir, "training.png")


def write_plots(results, env, out_dir):
    """Write the plots of whichever parts `results` holds; return the file names."""
    plt = _pyplot()
    every = [r["impl"] for rows in results.values() for r in rows]
    styles = _styles([name for name in dict.fromkeys(every) if name != TORCH_SAME_PRECISION])
    written = []
    speed = results.get("speed") or []
    if speed:
        for key, ylabel, title in (("fwd_ms", "ms (median)", "Forward latency"),
                                   ("fwd_bwd_ms", "ms (median)", "Forward+backward latency"),
                                   ("fwd_tflops", "TFLOP/s", "Forward TFLOP/s"),
                                   ("fwd_bwd_tflops", "TFLOP/s", "Forward+backward TFLOP/s")):
            filename = key.replace("_ms", "_latency") + ".png"
            written.append(_speed_plot(plt, speed, styles, out_dir, env, key, ylabel, title, filename))
    if results.get("memory"):
        written.append(_memory_plot(plt, results["memory"], styles, out_dir))
    if results.get("stability"):
        written.append(_stability_plot(plt, results["stability"], styles, out_dir))
    if results.get("features"):
        written.append(_features_plot(plt, results["features"], styles, out_dir, env))
    if results.get("window_sweep"):
        written.append(_window_sweep_plot(plt, results["window_sweep"], styles, out_dir, env))
    if any("losses" in r for r in results.get("training", [])):
        written.append(_training_plot(plt, results["training"], styles, out_dir, env))
    return written
