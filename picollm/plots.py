"""The one module that imports matplotlib (headless backend)."""

from __future__ import annotations

import math

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FormatStrFormatter  # noqa: E402


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _best(values: list[float]):
    """Index of the lowest finite value (a diverged NaN or inf loss is never the best), or None."""
    ok = [i for i, v in enumerate(values) if math.isfinite(v)]
    return min(ok, key=values.__getitem__) if ok else None


def loss_curves(runs: dict[str, list[dict]], path: str, title: str = "loss") -> None:
    """Train loss per step (thin) and test loss per evaluation (markers) of one or several runs."""
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, records) in enumerate(runs.items()):
        c = colors[i % len(colors)]
        s, v = _series(records, "train_loss")
        if s:
            ax.plot(s, v, color=c, alpha=0.45, lw=1, label=f"{name} train")
        s, v = _series(records, "test_loss")
        if s:
            ax.plot(s, v, color=c, marker="o", ms=4, lw=2, label=f"{name} test")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def attention_heatmaps(grid: list, tokens: list[str], path: str, title: str = "",
                       label_every_panel: bool = True) -> None:
    """Query x key attention heat-maps. grid: rows of panels, each (title, (T, T) weights) or None for an
    empty cell; tokens: the T axis labels. Weights share one colour scale (0 to 1); the masked upper
    triangle (future keys) is drawn light grey. Without label_every_panel only the left column carries
    query labels and the bottom row key labels."""
    rows, cols, T = len(grid), max(len(r) for r in grid), len(tokens)
    cell = min(max(3.2, 0.17 * T + 1.6), 7.0, 30.0 / cols)  # inches per panel
    fontsize = max(3.5, min(9.0, 0.5 * 72 * cell / max(T, 1)))  # half a row's height, in points
    fig, axes = plt.subplots(rows, cols, figsize=(cols * cell + 1.2, rows * cell + 0.8), dpi=110,
                             squeeze=False, layout="constrained")
    cmap = plt.get_cmap("viridis").with_extremes(bad="#eeeeee")
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    image = None
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            panel = grid[r][c] if c < len(grid[r]) else None
            if panel is None:
                ax.axis("off")
                continue
            name, weights = panel
            image = ax.imshow(np.ma.masked_where(future, np.asarray(weights, dtype=float)), cmap=cmap,
                              vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(name, fontsize=8)
            ax.set_xticks(range(T))
            ax.set_yticks(range(T))
            last_in_column = r == rows - 1 or c >= len(grid[r + 1] if r + 1 < rows else [])
            ax.set_xticklabels(tokens if label_every_panel or last_in_column else [], rotation=90, fontsize=fontsize)
            ax.set_yticklabels(tokens if label_every_panel or c == 0 else [], fontsize=fontsize)
            ax.tick_params(length=0)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight")
    fig.supxlabel("key (attended to)", fontsize=9)
    fig.supylabel("query (attending)", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path)
    plt.close(fig)


def _colors(n: int) -> list:
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing running mean (the first points average what there is)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def loss_panels(runs: dict[str, list[dict]], path, title: str = "loss") -> None:
    """Two panels sharing the step axis: train loss (running mean, log scale) and test loss per evaluation,
    with each run's best test loss (its early-stopping point) starred. `path`: a file name or a binary file."""
    fig, (tr, te) = plt.subplots(1, 2, figsize=(11, 4.3), dpi=110, sharex=True, layout="constrained")
    for c, (name, records) in zip(_colors(len(runs)), runs.items()):
        s, v = _series(records, "train_loss")
        if s:
            tr.plot(s, _smooth(v, max(1, len(v) // 50)), color=c, lw=1.4, label=name)
        s, v = _series(records, "test_loss")
        if s:
            te.plot(s, v, color=c, marker="o", ms=3, lw=1.6, label=name)
            b = _best(v)
            if b is not None:
                te.plot([s[b]], [v[b]], marker="*", ms=13, color=c, mec="black", mew=0.6, ls="none")
    tr.set_title("train loss (running mean)")
    tr.set_yscale("log")
    tr.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
    tr.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))
    tr.tick_params(axis="y", which="minor", labelsize=7)
    te.set_title("test loss (★ best)")
    for ax in (tr, te):
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats / token)")
        ax.grid(alpha=0.3, which="both")
    handles, labels = te.get_legend_handles_labels() if te.lines else tr.get_legend_handles_labels()
    keep = [(h, lb) for h, lb in zip(handles, labels) if not lb.startswith("_")]
    if keep:
        fig.legend([h for h, _ in keep], [lb for _, lb in keep], loc="outside right center", fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.savefig(path, format="png")
    plt.close(fig)


METRIC_LABELS = {"test_loss": "final test loss", "best_test_loss": "best test loss", "train_loss": "final train loss",
                 "bits_per_byte": "bits per byte", "continuation_accuracy": "continuation accuracy",
                 "tokens_per_s": "tokens / s", "params": "parameters"}


def _numeric(values: list) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def metrics_vs_param(rows: list[dict], x: str, panels: list[list[str]], path, series: str = None,
                     title: str = None) -> None:
    """One panel per list of metric keys, each metric plotted against rows' `x` value (one line per value
    of `series`, when given). Numeric x spanning 20x or more gets a log axis; other x values are categories
    in the order given. `path`: a file name or a binary file."""
    xs = [r[x] for r in rows]
    numeric = _numeric(xs)
    cats = list(dict.fromkeys(map(str, xs)))
    groups = list(dict.fromkeys(r.get(series) for r in rows)) if series else [None]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4), dpi=110, squeeze=False,
                             layout="constrained")
    markers = "osD^vP*X"
    for ax, keys in zip(axes[0], panels):
        for gi, g in enumerate(groups):
            for ki, key in enumerate(keys):
                pts = [(r[x], r[key]) for r in rows if r.get(key) is not None and (series is None or r.get(series) == g)]
                if not pts:
                    continue
                if numeric:
                    pts.sort(key=lambda p: p[0])
                    px = [p[0] for p in pts]
                else:
                    dodge = (ki - (len(keys) - 1) / 2) * 0.1  # side by side, not on top of each other
                    px = [cats.index(str(p[0])) + dodge for p in pts]
                label = METRIC_LABELS.get(key, key) if len(keys) > 1 else None
                if series:
                    label = f"{series}={g}" + (f" {label}" if label else "")
                # categories are not a continuum: markers only, unless a series joins its own points
                ls = ("-" if ki == 0 else "--") if numeric or series else "none"
                ax.plot(px, [p[1] for p in pts], marker=markers[(ki + gi) % len(markers)], lw=1.6,
                        ms=6 if ls != "none" else 9, ls=ls, alpha=0.9, label=label)
        if numeric:
            lo, hi = min(xs), max(xs)
            if lo > 0 and hi / lo >= 20:
                ax.set_xscale("log")
        else:
            ax.set_xticks(range(len(cats)), cats, rotation=20 if max(map(len, cats)) > 8 else 0)
            ax.margins(x=0.12)
        ax.set_xlabel(x)
        ax.set_ylabel(" / ".join(METRIC_LABELS.get(k, k) for k in keys) if len(keys) == 1 else "")
        ax.set_title(", ".join(METRIC_LABELS.get(k, k) for k in keys))
        ax.grid(alpha=0.3, which="both")
        if any(line.get_label() and not line.get_label().startswith("_") for line in ax.lines):
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.savefig(path, format="png")
    plt.close(fig)


def run_curves(records: list[dict], path, title: str = "loss") -> None:
    """One run: train loss per step (raw, faint, and its running mean), test loss per evaluation, the
    train/test gap shaded between them and the best evaluation (the early-stopping point) marked.
    `path`: a file name or a binary file."""
    fig, ax = plt.subplots(figsize=(9, 4.6), dpi=110, layout="constrained")
    ts, tv = _series(records, "train_loss")
    es, ev = _series(records, "test_loss")
    if ts:
        sm = _smooth(tv, max(1, len(tv) // 40))
        ax.plot(ts, tv, color="#4c72b0", alpha=0.25, lw=0.8)
        ax.plot(ts, sm, color="#4c72b0", lw=1.8, label="train (running mean)")
    if es:
        ax.plot(es, ev, color="#dd5a2b", marker="o", ms=3.5, lw=1.8, label="test")
        if ts:
            at = {s: v for s, v in zip(ts, sm)}
            pairs = [(s, v, at[s]) for s, v in zip(es, ev) if s in at]
            if pairs:
                ax.fill_between([p[0] for p in pairs], [p[2] for p in pairs], [p[1] for p in pairs],
                                color="#dd5a2b", alpha=0.10, lw=0, label="gap (test - train)")
        b = _best(ev)
        if b is not None:
            ax.axvline(es[b], color="gray", ls="--", lw=1)
            ax.plot([es[b]], [ev[b]], marker="*", ms=15, color="#dd5a2b", mec="black", mew=0.6, ls="none",
                    label=f"best test {ev[b]:.3f} @ step {es[b]}")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token, log scale)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.savefig(path, format="png")
    plt.close(fig)


def feature_density(freqs: list[float], n_dead: int, path, dense: float = None, title: str = "feature density") -> None:
    """Histogram of log10 firing frequency of an SAE's features that fired (`freqs`: fraction of tokens per
    feature; the n_dead that never fired are named in the title, not plotted), the dense threshold
    dashed. `path`: a file name or a binary file."""
    live = [math.log10(f) for f in freqs if f > 0]
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=110, layout="constrained")
    if live:
        ax.hist(live, bins=min(50, max(10, len(live) // 8)), color="#4c72b0", alpha=0.9)
    if dense:
        ax.axvline(math.log10(dense), color="#c2410c", ls="--", lw=1.2, label=f"dense above {dense:g}")
        ax.legend(fontsize=8)
    ax.set_xlabel("log10 firing frequency (fraction of tokens)")
    ax.set_ylabel("features")
    ax.set_title(f"{title}: {len(live)} fired, {n_dead} dead (not shown)")
    ax.grid(alpha=0.3)
    fig.savefig(path, format="png")
    plt.close(fig)


def annotated_heatmaps(panels: list[dict], path: str, title: str = "", cbar_label: str = "",
                       vmin: float = 0.0, vmax: float = 1.0, cmap: str = "viridis") -> None:
    """Heat-maps stacked top to bottom on one colour scale, for the logit lens and activation patching.
    Each panel: {"title", "values" (R, C), "rows" (R labels), "cols" (C labels), optional "text" (R x C
    strings written in the cells)}. A NaN cell is drawn light grey."""
    heights = [max(len(p["rows"]), 1) for p in panels]
    width = max(len(p["cols"]) for p in panels)
    cell = min(0.6, 14.0 / max(width, 1))  # inches per cell
    fig, axes = plt.subplots(len(panels), 1, figsize=(width * cell + 2.8, sum(heights) * cell + 1.4 * len(panels) + 0.6),
                             dpi=110, squeeze=False, layout="constrained", gridspec_kw={"height_ratios": heights})
    cm = plt.get_cmap(cmap).with_extremes(bad="#eeeeee")
    image = None
    for ax, p in zip(axes[:, 0], panels):
        values = np.ma.masked_invalid(np.asarray(p["values"], dtype=float))
        image = ax.imshow(values, cmap=cm, vmin=vmin, vmax=vmax, interpolation="nearest", aspect="auto")
        ax.set_title(p["title"], fontsize=9)
        ax.set_xticks(range(len(p["cols"])))
        ax.set_xticklabels(p["cols"], rotation=90, fontsize=7)
        ax.set_yticks(range(len(p["rows"])))
        ax.set_yticklabels(p["rows"], fontsize=7)
        ax.tick_params(length=0)
        mid = (vmin + vmax) / 2
        for (r, c), s in np.ndenumerate(np.asarray(p.get("text", []), dtype=object)):
            v = values[r, c]
            if np.ma.is_masked(v):
                dark = False
            else:  # viridis is dark at the low end, a diverging map at both ends
                dark = v < mid if cmap == "viridis" else abs(v - mid) > 0.3 * (vmax - vmin)
            ax.text(c, r, s, ha="center", va="center", fontsize=max(4.0, 9 * cell / 0.6),
                    color="white" if dark else "black")
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label=cbar_label)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path)
    plt.close(fig)
