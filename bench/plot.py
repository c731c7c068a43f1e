"""``bam-triton plot RESULTS.csv``: per op, grouped bars of speedup vs the authors' eager formulation and of the
fraction of the device's copy bandwidth, one group per shape and one bar per provider; PNG and SVG.

Interpreter rows (``timing_mode == "interpreter"``) are validation runs, not speed: they are never plotted.
"""
import csv
import json
import os
import sys

from .providers import PROVIDERS

COLORS = {"authors-eager": "#8c8c8c", "torch-path": "#4c72b0", "authors-compiled": "#dd8452",
          "triton": "#55a868", "triton-compiled": "#c44e52", "triton-single-read": "#8172b3", "no-bam": "#937860"}


# The columns plotting reads; a CSV without them is not one `bam-triton sweep` wrote.
REQUIRED_COLUMNS = ("provider", "op", "N", "C", "H", "W", "dtype", "layout", "median_ms", "timing_mode")


def read_rows(path):
    """The rows of a sweep CSV, sizes as ints and timings as floats; ``ValueError`` naming ``path`` for a file that
    is not one (columns missing, text where numbers go, not text at all)."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [k for k in REQUIRED_COLUMNS if k not in (reader.fieldnames or ())]
            if missing:
                raise ValueError(f"no column {', '.join(missing)}")
            rows = list(reader)
        for r in rows:
            for k in ("N", "C", "H", "W"):
                r[k] = int(r[k])
            for k in ("median_ms", "p20_ms", "p80_ms", "gbps", "frac_copy_bw", "speedup_vs_authors_eager"):
                r[k] = float(r[k]) if r.get(k) not in (None, "") else None
    except (ValueError, csv.Error) as error:  # UnicodeDecodeError is a ValueError
        raise ValueError(f"{path} is not a CSV written by `bam-triton sweep`: {error}") from error
    return rows


def plottable(rows, timing_mode=None):
    """Rows that may be plotted: never the interpreter's; one timing mode (default: do_bench, else cpu-timer)."""
    rows = [r for r in rows if r["timing_mode"] != "interpreter" and r["median_ms"] is not None]
    if timing_mode is None:
        modes = {r["timing_mode"] for r in rows}
        timing_mode = "do_bench" if "do_bench" in modes else ("cpu-timer" if "cpu-timer" in modes else None)
    return [r for r in rows if timing_mode is None or r["timing_mode"] == timing_mode], timing_mode


def timing_mode_problem(rows, timing_mode, path):
    """Why ``--timing-mode`` selects nothing to plot in ``rows`` (one line naming the modes they have), or None."""
    if timing_mode in {r["timing_mode"] for r in plottable(rows, timing_mode)[0]}:
        return None
    modes = sorted({r["timing_mode"] for r in rows if r["timing_mode"] != "interpreter" and r["median_ms"] is not None})
    why = ("interpreter rows are validation runs, never plotted" if timing_mode == "interpreter" else
           f"{path} has no timed rows of that mode")
    return (f"--timing-mode {timing_mode!r}: {why}; "
            + (f"its modes: {', '.join(modes)}" if modes else "it has no timed (non-interpreter) rows at all"))


def _device_label(csv_path, rows):
    meta = os.path.join(os.path.dirname(os.path.abspath(csv_path)), "sweep.json")
    try:
        with open(meta) as f:
            env = json.load(f)["environment"]
        if env.get("gpu"):
            return env["gpu"], env.get("copy_bandwidth_gbps")
        return f"CPU: {env['cpu']} ({env['cpu_cores']} cores, {env['torch_threads']} threads)", \
            env.get("copy_bandwidth_gbps")
    except (OSError, KeyError, ValueError):
        return (rows[0]["device"] if rows else "?"), None


def not_faster(rows):
    """``[(op, dtype, layout, shape, provider, speedup), ...]``: where one of our providers (not the authors' own
    formulations) is not faster than the authors' eager code, so that the charts and the command say so."""
    return [(r["op"], r["dtype"], r["layout"], f"{r['N']}x{r['C']}x{r['H']}x{r['W']}", r["provider"],
             r["speedup_vs_authors_eager"]) for r in rows
            if not r["provider"].startswith("authors") and r["speedup_vs_authors_eager"] is not None
            and r["speedup_vs_authors_eager"] < 1.0]


def _not_faster_note(cases, limit=3):
    import textwrap

    text = ", ".join(f"{provider} {speedup:.2f}x at {shape}" for _, _, _, shape, provider, speedup in cases[:limit])
    more = f" and {len(cases) - limit} more" if len(cases) > limit else ""
    return textwrap.fill(f"not faster than the authors' eager: {text}{more}", 70)


def _bars(ax, groups, providers, values, fmt="{:.2f}"):
    import numpy as np

    width = 0.8 / max(len(providers), 1)
    xs = np.arange(len(groups))
    for i, p in enumerate(providers):
        vals = [values.get((g, p), float("nan")) for g in groups]
        bars = ax.bar(xs + (i - (len(providers) - 1) / 2) * width, vals, width, label=p, color=COLORS.get(p))
        for b, v in zip(bars, vals):
            if v == v:  # not NaN
                ax.annotate(fmt.format(v), (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=7,
                            rotation=90 if len(providers) * len(groups) > 12 else 0, xytext=(0, 2),
                            textcoords="offset points")
    ax.set_xticks(xs)
    ax.set_xticklabels(groups, rotation=20 if len(groups) > 4 else 0, ha="right" if len(groups) > 4 else "center")


def plot_results(csv_path, out_dir=None, timing_mode=None, rows=None):
    """Write one speedup chart and one bandwidth chart per (op, dtype, layout); returns the written paths. ``rows``:
    the CSV's rows where the caller has read them already (:func:`read_rows`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matplotlib.rcParams["svg.fonttype"] = "none"  # SVG text stays text: smaller, searchable, selectable

    rows, mode = plottable(read_rows(csv_path) if rows is None else rows, timing_mode)
    out_dir = out_dir or os.path.dirname(os.path.abspath(csv_path))
    os.makedirs(out_dir, exist_ok=True)
    device, copy_bw = _device_label(csv_path, rows)
    written = []
    keys = sorted({(r["op"], r["dtype"], r["layout"]) for r in rows})
    for op, dtype, layout in keys:
        sel = [r for r in rows if (r["op"], r["dtype"], r["layout"]) == (op, dtype, layout)]
        groups = []
        for r in sel:
            g = f"{r['N']}x{r['C']}x{r['H']}x{r['W']}"
            if g not in groups:
                groups.append(g)
        providers = [p for p in PROVIDERS if any(r["provider"] == p for r in sel)]
        speed = {(f"{r['N']}x{r['C']}x{r['H']}x{r['W']}", r["provider"]): r["speedup_vs_authors_eager"]
                 for r in sel if r["speedup_vs_authors_eager"] is not None}
        frac = {(f"{r['N']}x{r['C']}x{r['H']}x{r['W']}", r["provider"]): 100 * r["frac_copy_bw"]
                for r in sel if r["frac_copy_bw"] is not None}
        stem = os.path.join(out_dir, f"{op}_{dtype}_{layout}")
        layout_txt = "" if layout == "nchw" else f", {layout}"
        # Side by side for a few shapes; one chart above the other for a whole grid, so neither gets too wide to read.
        if len(groups) <= 4:
            fig, axes = plt.subplots(1, 2, figsize=(max(10, 4.4 * len(groups)), 4.6))
        else:
            fig, axes = plt.subplots(2, 1, figsize=(max(10, 1.6 * len(groups)), 9.2))
        ax = axes[0]
        _bars(ax, groups, providers, speed, "{:.2f}x")
        ax.axhline(1.0, color="black", linewidth=1, linestyle="--", label="authors-eager = 1")
        ax.set_ylabel("speedup vs authors' eager (higher is better)")
        ax.set_xlabel("shape N x C x H x W")
        slower = not_faster(sel)
        ax.set_title(f"{op}: speedup vs the authors' formulation"
                     + (f"\n{_not_faster_note(slower)}" if slower else ""), fontsize=9 if slower else None)
        ax.set_ylim(0, max([v for v in speed.values() if v == v] + [1.0]) * 1.25)
        ax = axes[1]
        _bars(ax, groups, providers, frac, "{:.0f}%")
        ax.axhline(100.0, color="black", linewidth=1, linestyle="--", label="100% = device copy bandwidth")
        ax.set_ylabel("% of the device's copy bandwidth (minimal bytes / time)")
        ax.set_xlabel("shape N x C x H x W")
        bw = f" = {copy_bw:.1f} GB/s" if copy_bw else ""
        ax.set_title(f"{op}: effective bandwidth (copy bandwidth{bw})")
        ax.set_ylim(0, max([v for v in frac.values() if v == v] + [100.0]) * 1.2)
        handles, labels = [], []
        for a in axes:
            for h_, l_ in zip(*a.get_legend_handles_labels()):
                if l_ not in labels:
                    handles.append(h_)
                    labels.append(l_)
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
        fig.suptitle(f"BAM {op} — {device} — {dtype}{layout_txt} — timing: {mode}", fontsize=11)
        fig.tight_layout(rect=(0, 0.07 if len(groups) <= 4 else 0.04, 1, 0.95))
        for ext in ("png", "svg"):
            fig.savefig(f"{stem}.{ext}", dpi=130)
            written.append(f"{stem}.{ext}")
        plt.close(fig)
    return written


def _sweep_csv(path):
    """The CSV to plot for the command's argument: the file itself, or the sweep.csv in a sweep's output directory;
    ``(None, message)`` where there is none."""
    if os.path.isdir(path):
        inside = os.path.join(path, "sweep.csv")
        if os.path.isfile(inside):
            return inside, None
        return None, f"{path} is a directory without a sweep.csv: pass the CSV that `bam-triton sweep` wrote"
    if not os.path.isfile(path):
        return None, f"no such file: {path}"
    return path, None


def run_plot(args):
    path, problem = _sweep_csv(args.csv)
    if problem is None:
        try:
            rows = read_rows(path)
        except ValueError as error:
            problem = str(error)
    if problem is None and args.timing_mode is not None:
        problem = timing_mode_problem(rows, args.timing_mode, path)
    if problem is not None:
        print(f"error: bam-triton plot: {problem}", file=sys.stderr)
        return 2
    written = plot_results(path, args.out, args.timing_mode, rows=rows)
    if not written:
        print("nothing to plot: no timed (non-interpreter) rows in the CSV", file=sys.stderr)
        return 1
    for w in written:
        print(f"wrote {w}")
    for op, dtype, layout, shape, provider, speedup in not_faster(plottable(rows, args.timing_mode)[0]):
        print(f"not faster than the authors' eager code: {op} {shape} {dtype} {layout}: {provider} {speedup:.2f}x")
    return 0
