"""The compare report's plots (matplotlib's object API: no pyplot state; renders with Agg).

Honest axes. Left to itself matplotlib zooms a y-axis onto the data, so two curves 1e-4 apart fill the plot and
look like a clear win. Every loss axis here spans at least MIN_SPAN of the largest value shown (and at least
MIN_SPAN_NATS), without an offset (`+1.08e1`) on the ticks; percentages are drawn on their full 0-100 scale. A
difference that looks large in these plots is large next to the values themselves; whether it is real is the
verdict's job (intervals), not the eye's.
"""
from __future__ import annotations

import math
from pathlib import Path

from imtune import files
from imtune.report.runs import eval_points, train_points
from imtune.results import CompareResult

MIN_SPAN = 0.2  # a loss axis spans at least this share of the largest |value| it shows
MIN_SPAN_NATS = 0.05  # ... and at least this many nats


def honest_ylim(ax, values: list, floor_of: list | None = None) -> None:
    """Widen ax's y-range (around the data) to at least MIN_SPAN x max |v| of `floor_of` (default: the values), and
    MIN_SPAN_NATS; a non-negative quantity is not pushed below zero."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    ref = [abs(v) for v in (floor_of or vals) if v is not None and math.isfinite(v)]
    if not vals:
        return
    lo, hi = ax.get_ylim()
    need = max(MIN_SPAN * max(ref or [0.0]), MIN_SPAN_NATS)
    if hi - lo < need:
        mid = (min(vals) + max(vals)) / 2
        lo, hi = mid - need / 2, mid + need / 2
        if min(vals) >= 0 > lo:
            lo, hi = 0.0, need
        ax.set_ylim(lo, hi)
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")


def curves_figure(summary: CompareResult, metrics: dict):
    """Left: output loss of the training batches per step; right: held-out and train-sample output loss at the
    evaluation points. One colour per arm, one line style per seed."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(12, 4.4), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    colour = {a.name: f"C{i}" for i, a in enumerate(summary.arms)}
    shown1, shown2 = [], []
    for a, run in summary.runs():
        c, recs, label = colour[a.name], metrics[run.dir], summary.run_label(a, run)
        k = a.runs.index(run)
        dash = ["-", "-.", ":", (0, (5, 1))][k % 4]  # one line style per seed
        tp = [r for r in train_points(recs) if r.get("loss_output") is not None]
        ax1.plot([r["step"] for r in tp], [r["loss_output"] for r in tp], color=c, lw=1.2, ls=dash, label=label)
        ep = eval_points(recs)
        h = [r for r in ep if r.get("eval_output_loss") is not None]
        t = [r for r in ep if r.get("train_output_loss") is not None]
        ax2.plot([r["step"] for r in h], [r["eval_output_loss"] for r in h], "o", ls=dash, color=c,
                 label=f"{label} held-out")
        ax2.plot([r["step"] for r in t], [r["train_output_loss"] for r in t], "s", ls="--", color=c, alpha=0.55,
                 ms=4, label=f"{label} train sample")
        shown1 += [r["loss_output"] for r in tp]
        shown2 += [r["eval_output_loss"] for r in h] + [r["train_output_loss"] for r in t]
    ax1.set_title("training batches: output loss per step", fontsize=10)
    ax2.set_title("evaluation points: held-out (solid), fixed train sample (dashed)", fontsize=10)
    for ax, shown in ((ax1, shown1), (ax2, shown2)):
        ax.set(xlabel="optimizer step", ylabel="output loss (nats per output token)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        honest_ylim(ax, shown)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    return fig


def bars_figure(summary: CompareResult, key: str):
    """key 'gap': final train/held-out gap per arm; key 'scores': exact match and benchmark scores per arm (None
    when there are none)."""
    from matplotlib.figure import Figure

    arms = summary.arms
    if key == "gap":
        groups = [("held-out − train output loss", [a.results.gap for a in arms])]
        ylabel, title, pct = "gap (nats per output token)", "final models: held-out − train output loss\n" \
            "(lower = less overfit)", False
    else:
        groups = []
        if all(a.results.exact_match for a in arms):
            groups.append(("held-out exact match", [a.results.exact_match.accuracy for a in arms]))
        for label in sorted(arms[0].results.bench or {}):
            if all(label in (a.results.bench or {}) for a in arms):
                groups.append((label, [a.results.bench[label].value for a in arms]))
        if not groups:
            return None
        ylabel, title, pct = "score (%)", "scores of the final models (higher is better)", True
    fig = Figure(figsize=(max(5, 1.6 + 1.3 * len(arms) * len(groups)), 4), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(arms)
    shown = []
    for i, a in enumerate(arms):
        xs = [g + (i - (len(arms) - 1) / 2) * width for g in range(len(groups))]
        vals = [(v or 0.0) * (100 if pct else 1) for _, g in groups for v in [g[i]]]
        bars = ax.bar(xs, vals, width * 0.95, color=f"C{i}", label=a.spec)
        ax.bar_label(bars, labels=[f"{v:.1f}" if pct else f"{v:.4f}" for v in vals], fontsize=8)
        shown += vals
    ax.set_xticks(range(len(groups)), [g for g, _ in groups])
    ax.axhline(0, color="k", lw=0.6)
    if pct:
        ax.set_ylim(min(0.0, *shown), max(105.0, *shown))  # the whole 0-100 scale: 0.1 vs 0.2% stays flat
    else:  # a gap is a difference of losses: its axis is scaled to the losses themselves
        honest_ylim(ax, shown + [0.0], floor_of=[a.results.heldout.output_loss for a in arms] + shown)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return fig


def plot_curves(summary: CompareResult, metrics: dict, out: Path) -> Path:
    p = out / "loss_curves.png"
    return files.save_figure(curves_figure(summary, metrics), p, out)


def plot_bars(summary: CompareResult, out: Path, key: str) -> Path | None:
    fig = bars_figure(summary, key)
    if fig is None:
        return None
    return files.save_figure(fig, out / f"{key}.png", out)
