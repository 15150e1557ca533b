"""The comparison report: COMPARE_DIR/compare.json + arms/*/ (config.yaml, metrics.jsonl) -> plots, report.md,
report.html (self-contained: the PNGs are embedded as base64 data URIs), and the verdict.

Nothing here trains or evaluates: the report is a function of files, so `imtune compare --report-only DIR` rebuilds
it. The page is built once as a list of blocks (heading, paragraph, table, image, code) and written twice, as
Markdown and as HTML, so both always say the same.

The verdict decides each measure between the best arm and every other arm; a difference counts only when it is larger
than the measure's threshold (THRESHOLDS, stated in the report):
- losses (held-out output loss, the train/held-out gap): 1% of the value, or the change between the last two
  evaluation points of either arm's held-out curve (how much the number moves from one eval to the next), the larger;
- BLEU-to-train: 1 BLEU point, or 2 standard errors of the per-prompt sentence-BLEU difference, the larger;
- accuracies (held-out exact match, benchmarks): 2 standard errors of the difference (paired per example when both
  arms answered the same examples, else binomial).
"""
from __future__ import annotations

import base64
import html
import json
import math
import re
import shlex
from pathlib import Path

THRESHOLDS = {"loss_relative": 0.01, "bleu_points": 1.0, "standard_errors": 2.0}


# ----------------------------------------------------------------------------------------------------------------
# Reading
def runs_of(summary: dict) -> list[tuple[dict, dict]]:
    """(arm, run) for every arm x seed; a version-1 compare.json (one seed, arms/<arm>/) has one run per arm."""
    seed = summary["settings"]["base_config"].get("seed")
    return [(a, r) for a in summary["arms"] for r in a.get("runs") or [{"seed": seed, "dir": a["dir"]}]]


def run_label(arm: dict, run: dict, summary: dict) -> str:
    return arm["spec"] if len(summary.get("settings", {}).get("seeds") or [0]) == 1 else \
        f"{arm['spec']} seed {run['seed']}"


def load(compare_dir: str | Path) -> tuple[dict, dict[str, list[dict]], dict[str, str]]:
    """(compare.json, run dir -> metrics.jsonl records, run dir -> config.yaml text)."""
    d = Path(compare_dir)
    path = d / "compare.json"
    if not path.exists():
        from .types import UsageError

        raise UsageError(f"{d}: no compare.json (not a finished `imtune compare` directory)")
    from .rundir import config_text

    summary = json.loads(path.read_text(encoding="utf-8"))
    texts = {r["dir"]: config_text(d / r["dir"]) for _, r in runs_of(summary)}
    configs = {k: "(missing)" if v is None else v for k, v in texts.items()}
    return summary, load_metrics(summary, d), configs


def load_metrics(summary: dict, d: Path) -> dict[str, list[dict]]:
    from .rundir import metrics

    return {r["dir"]: metrics(d / r["dir"], kind=None) for _, r in runs_of(summary)}


def eval_points(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("type") == "eval"]


def train_points(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("type", "train") == "train"]


# ----------------------------------------------------------------------------------------------------------------
# The verdict
def _measures(summary: dict) -> list[tuple[str, str, str, dict]]:
    """(key, label, 'lower'|'higher', arm -> value) for every measure the arms have."""
    arms = summary["arms"]
    get = lambda f: {a["name"]: f(a["results"]) for a in arms}  # noqa: E731
    out = [("heldout_loss", "held-out output loss", "lower", get(lambda r: r["heldout"]["output_loss"])),
           ("gap", "train/held-out gap", "lower", get(lambda r: r["gap"]))]
    if all("bleu" in a["results"] and bleu_meaningful(a["results"]["bleu"]) for a in arms):
        out.append(("bleu", "memorisation (BLEU of greedy answers vs training outputs)", "lower",
                    get(lambda r: r["bleu"]["corpus_bleu"])))
    if all("exact_match" in a["results"] for a in arms):
        out.append(("exact_match", "held-out exact match", "higher", get(lambda r: r["exact_match"]["accuracy"])))
    labels = [set(a["results"].get("bench", {})) for a in arms]
    for label in sorted(set.intersection(*labels) if labels else set()):
        b0 = arms[0]["results"]["bench"][label]
        judge = f", judge {b0['judge']}" if b0.get("judge") else ""
        out.append((f"bench:{label}", f"{label} ({b0['metric']}{judge})", "higher",
                    get(lambda r, k=label: r["bench"][k]["value"])))
    return out


def bleu_meaningful(b: dict) -> bool:
    """4-gram BLEU of answers shorter than 4 words is 0 whatever they say: no verdict on it then."""
    return b.get("reference_words_mean", 4) >= 4


def _spread(records: list[dict], key: str) -> float:
    """How much the quantity moved between the last two evaluation points (0 with fewer than two)."""
    pts = [r for r in eval_points(records) if r.get("eval_output_loss") is not None]
    vals = [r["eval_output_loss"] - (r.get("train_output_loss") or 0.0) if key == "gap" else r["eval_output_loss"]
            for r in pts if key != "gap" or r.get("train_output_loss") is not None]
    return abs(vals[-1] - vals[-2]) if len(vals) >= 2 else 0.0


def _se_paired(x: list, y: list) -> float | None:
    if len(x) != len(y) or len(x) < 2:
        return None
    d = [float(a) - float(b) for a, b in zip(x, y)]
    m = sum(d) / len(d)
    return math.sqrt(sum((v - m) ** 2 for v in d) / (len(d) - 1) / len(d))


def _threshold(key: str, a: str, b: str, summary: dict, metrics: dict) -> tuple[float, str]:
    """(threshold for |value_a - value_b|, how it was set)."""
    res = {x["name"]: x["results"] for x in summary["arms"]}
    k = THRESHOLDS["standard_errors"]
    if key in ("heldout_loss", "gap"):
        ref = [res[a]["heldout"]["output_loss"], res[b]["heldout"]["output_loss"]]
        rel = THRESHOLDS["loss_relative"] * max(abs(v) for v in ref if v is not None)
        spread = max(_spread(metrics.get(a, []), key), _spread(metrics.get(b, []), key))
        return (spread, "eval-to-eval change") if spread > rel else (rel, "1% of the loss")
    if key == "bleu":
        se = _se_paired(res[a]["bleu"]["sentence_bleu"], res[b]["bleu"]["sentence_bleu"]) or 0.0
        return (k * se, f"{k:g} SE") if k * se > THRESHOLDS["bleu_points"] else (THRESHOLDS["bleu_points"], "1 point")
    if key == "exact_match":
        se = _se_paired(res[a]["exact_match"]["correct"], res[b]["exact_match"]["correct"])
        if se is not None:
            return k * se, f"{k:g} paired SE"
        n, m = res[a]["exact_match"]["n"], res[b]["exact_match"]["n"]
        p, q = res[a]["exact_match"]["accuracy"], res[b]["exact_match"]["accuracy"]
    else:
        label = key.split(":", 1)[1]
        sa, sb = res[a]["bench"][label].get("standard_error"), res[b]["bench"][label].get("standard_error")
        if sa is not None and sb is not None:  # judged benchmarks report their own standard errors
            return k * math.sqrt(sa ** 2 + sb ** 2), f"{k:g} SE"
        n, m = res[a]["bench"][label]["n"] or 1, res[b]["bench"][label]["n"] or 1
        p, q = res[a]["bench"][label]["value"] or 0.0, res[b]["bench"][label]["value"] or 0.0
    return k * math.sqrt(p * (1 - p) / max(n, 1) + q * (1 - q) / max(m, 1)), f"{k:g} SE"


def _show(key: str, v) -> str:
    if v is None:
        return "–"
    if key == "bleu":
        return f"{v:.2f}"
    if key.startswith("bench:mtbench"):
        return f"{v:.2f}"  # MT-Bench: a 1-10 score, not a fraction
    if key == "exact_match" or key.startswith("bench:"):
        return f"{100 * v:.1f}%"
    return f"{v:.4f}"


def _diff(key: str, d: float) -> str:
    if key.startswith("bench:mtbench"):
        return f"{d:.2f}"
    return f"{100 * d:.1f} points" if key == "exact_match" or key.startswith("bench:") else _show(key, d)


def verdict(summary: dict, compare_dir: str | Path) -> dict:
    """Per measure: the values, the decision and the text. Measures with intervals (compare.json "evidence": held-out
    loss final and best, gap, exact match) compare every arm with the reference arm: "won" only when the 95% interval
    of the difference excludes zero. The others (BLEU, benchmarks; and every measure of a version-1 compare.json)
    compare the best arm with the rest against THRESHOLDS. Reads metrics.jsonl and compare.json."""
    d = Path(compare_dir)
    metrics = load_metrics(summary, d)
    runs = runs_of(summary)
    by_arm = {}
    for a, r in runs:  # the threshold rules look at one run per arm (the first seed)
        by_arm.setdefault(a["name"], metrics[r["dir"]])
    spec = {a["name"]: a["spec"] for a in summary["arms"]}
    measures, sentences, wins = [], [], {}
    evidence = summary.get("evidence") or {"measures": {}}
    for key, m in evidence["measures"].items():
        rec, sentence = _interval_measure(key, m, evidence["reference"])
        measures.append(rec)
        sentences.append(sentence)
        for c in rec["comparisons"]:
            if c["winner"]:
                wins.setdefault(c["winner"], []).append(m["label"])
    for key, label, better, values in _measures(summary):
        known = {a: v for a, v in values.items() if v is not None}
        if len(known) < 2 or key in evidence["measures"]:
            continue
        order = sorted(known, key=lambda a: known[a] if better == "lower" else -known[a])
        best = order[0]
        rows = []
        for other in order[1:]:
            diff = abs(known[best] - known[other])
            thr, how = _threshold(key, best, other, summary, by_arm)
            rows.append({"arm": other, "value": known[other], "diff": diff, "threshold": thr, "threshold_rule": how,
                         "relative": diff / abs(known[other]) if known[other] else None, "decided": diff > thr})
        tied = [best] + [r["arm"] for r in rows if not r["decided"]]
        measures.append({"key": key, "label": label, "better": better, "values": values, "best": best,
                         "tied_with_best": tied[1:], "comparisons": rows})
        sentences.append(_sentence(key, label, better, known, best, rows, spec))
        if len(tied) == 1:
            wins.setdefault(spec[best], []).append(label.split(" (")[0])
    if {"heldout_loss", "best_heldout_loss"} <= set(evidence["measures"]):
        sentences.append(_early_stopping(measures))
    curves = {run_label(a, r, summary): metrics[r["dir"]] for a, r in runs}
    text = _paragraph(summary, sentences, wins, spec, curves)
    return {"thresholds": THRESHOLDS, "evidence_method": evidence.get("method"), "measures": measures, "text": text}


def _iv(key: str, iv: dict) -> str:
    return f"{_diff(key, iv['value'])} (95% interval {_diff(key, iv['low'])} to {_diff(key, iv['high'])})"


def _interval_measure(key: str, m: dict, ref: str) -> tuple[dict, str]:
    """Each arm minus the reference: the difference, its interval, and who won (None: no difference)."""
    from .evidence import excludes_zero

    rows, parts = [], []
    for arm, iv in m["differences"].items():
        if arm == ref:
            continue
        winner = None
        if excludes_zero(iv):
            winner = arm if (iv["value"] < 0) == (m["better"] == "lower") else ref
        rows.append({"arm": arm, "reference": ref, "diff": iv["value"], "low": iv["low"], "high": iv["high"],
                     "decided": winner is not None, "winner": winner})
        vals = f"{arm} {_show(key, m['values'][arm]['value'])} vs {ref} {_show(key, m['values'][ref]['value'])}"
        parts.append(f"{arm} − {ref} = {_iv(key, iv)}, {vals}: "
                     + (f"**{winner} won**" if winner else "no difference"))
    rec = {"key": key, "label": m["label"], "better": m["better"], "reference": ref,
           "values": {a: v["value"] for a, v in m["values"].items()}, "comparisons": rows}
    return rec, f"On {m['label']} ({m['better']} is better): " + "; ".join(parts) + "."


def _early_stopping(measures: list[dict]) -> str:
    """Which conclusion of the final models survives early stopping (each run's best checkpoint on validation)."""
    by = {m["key"]: {c["arm"]: c for c in m["comparisons"]} for m in measures}
    said = []
    for arm, fin in by["heldout_loss"].items():
        best = by["best_heldout_loss"].get(arm)
        if best is None:
            continue
        f = f"{fin['winner']} won" if fin["winner"] else "no difference"
        b = f"{best['winner']} won" if best["winner"] else "no difference"
        keep = "survives early stopping" if f == b else "does not survive early stopping"
        said.append(f"{arm} vs {fin['reference']}: final checkpoints — {f}; best checkpoints (selected on the "
                    f"validation part, scored on the test part) — {b}: the final-checkpoint conclusion {keep}")
    return ("Best vs final: " + "; ".join(said) + ".") if said else ""


def _sentence(key, label, better, known, best, rows, spec) -> str:
    """One measure in words: who won by how much, or that the differences are within the thresholds."""
    def vs(r) -> str:
        rel = f" = {100 * r['relative']:.1f}% {better}" if key == "heldout_loss" and r["relative"] else ""
        cmp = ">" if r["decided"] else "≤"
        return (f"{spec[r['arm']]} {_show(key, r['value'])} (Δ {_diff(key, r['diff'])}{rel} {cmp} threshold "
                f"{_diff(key, r['threshold'])}, {r['threshold_rule']})")

    tied = [r for r in rows if not r["decided"]]
    ahead = [r for r in rows if r["decided"]]
    if not tied:
        return f"On {label}, **{spec[best]}** won: {_show(key, known[best])} vs " + "; ".join(map(vs, rows)) + "."
    if not ahead:
        return (f"On {label}, no difference: {spec[best]} {_show(key, known[best])} vs "
                + "; ".join(map(vs, rows)) + ".")
    return (f"On {label}, {spec[best]} ({_show(key, known[best])}) and " + "; ".join(map(vs, tied))
            + " are within the threshold of each other, ahead of " + "; ".join(map(vs, ahead)) + ".")


def _overfitting(metrics: dict, spec: dict) -> str:
    """Did each arm's held-out output loss turn up after its best evaluation point (overfitting), or still fall?"""
    rising, flat, falling = [], [], []
    for name, recs in metrics.items():
        pts = [(r["step"], r["eval_output_loss"]) for r in eval_points(recs) if r.get("eval_output_loss") is not None]
        if len(pts) < 3:
            continue
        best = min(range(len(pts)), key=lambda i: pts[i][1])
        where = f"{spec[name]} (best {pts[best][1]:.4f} at step {pts[best][0]}, last {pts[-1][1]:.4f} at step " \
                f"{pts[-1][0]})"
        if best == len(pts) - 1:
            falling.append(spec[name])
        elif pts[-1][1] - pts[best][1] > THRESHOLDS["loss_relative"] * pts[best][1]:
            rising.append(where)
        else:
            flat.append(where)
    out = ""
    if rising:
        out += " Held-out output loss rose after its best point (by more than 1%) for " + "; ".join(rising) + "."
    if flat:
        out += " Held-out output loss levelled off (within 1% of its best) for " + "; ".join(flat) + "."
    if falling and len(falling) == len(metrics):
        out += (f" Held-out output loss was still falling at the last evaluation for every arm ({', '.join(falling)}):"
                " training stopped before any arm began to overfit by this measure, and the IM paper's gains come "
                "from IM overfitting less.")
    elif falling:
        out += " Held-out output loss was still falling at the last evaluation for " + ", ".join(falling) + "."
    return out


def _paragraph(summary: dict, sentences: list[str], wins: dict, spec: dict, metrics: dict) -> str:
    res = {a["name"]: a["results"] for a in summary["arms"]}
    tr = {a: r["train"]["output_loss"] for a, r in res.items() if r["train"]["output_loss"] is not None}
    extra = ""
    if len(tr) >= 2:
        lo = min(tr, key=tr.get)
        extra = (f" Training output loss (not a goal; the paper's sign of overfitting is a low training but high "
                 f"held-out loss) was lowest for {spec[lo]}: "
                 + ", ".join(f"{spec[a]} {v:.4f}" for a, v in sorted(tr.items(), key=lambda kv: kv[1])) + ".")
    if wins:
        overall = "In short: " + "; ".join(f"{arm} won on {', '.join(ms)}" for arm, ms in wins.items()) + \
            "; every other comparison showed no difference (interval includes zero, or within its threshold)."
    else:
        overall = ("In short: no arm won any measure beyond its threshold (every interval includes zero, or every "
                   "difference is within its threshold) — no difference at this budget.")
    extra += _overfitting(metrics, {k: k for k in metrics})  # keyed by run label
    b = [a["results"]["bleu"] for a in summary["arms"] if "bleu" in a["results"]]
    if b and not bleu_meaningful(b[0]):
        extra += (f" BLEU is not judged: the training outputs average {b[0]['reference_words_mean']:.1f} words, "
                  "fewer than BLEU's 4-gram order, so it is 0 for any answer.")
    seeds = summary["settings"].get("seeds") or [summary["settings"]["base_config"].get("seed")]
    if summary.get("evidence"):
        how = (f" Every arm ran with {len(seeds)} seed(s) ({', '.join(map(str, seeds))}); intervals: "
               f"{summary['evidence']['method']}.")
        if len(seeds) == 1:
            how += " With one seed the intervals cover the held-out examples only, not seed-to-seed variation."
    else:
        how = (f" All arms ran with one seed ({seeds[0]}); a single seed cannot show seed-to-seed variation, so "
               "treat small wins as indicative.")
    return " ".join(x for x in sentences if x) + extra + " " + overall + how


# ----------------------------------------------------------------------------------------------------------------
# Plots (matplotlib's object API: no pyplot state; renders with Agg)
def plot_curves(summary: dict, metrics: dict, out: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.4), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    colour = {a["name"]: f"C{i}" for i, a in enumerate(summary["arms"])}
    for a, run in runs_of(summary):
        c, recs, label = colour[a["name"]], metrics[run["dir"]], run_label(a, run, summary)
        k = next(i for i, r in enumerate(a.get("runs") or [run]) if r["dir"] == run["dir"])
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
    ax1.set(xlabel="optimizer step", ylabel="mean NLL of output tokens (nats)")
    ax1.set_title("training batches: output loss per step", fontsize=10)
    ax2.set(xlabel="optimizer step", ylabel="mean NLL of output tokens (nats)")
    ax2.set_title("evaluation points: held-out (solid), fixed train sample (dashed)", fontsize=10)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    p = out / "loss_curves.png"
    fig.savefig(p, dpi=100)
    return p


def plot_bars(summary: dict, out: Path, key: str) -> Path | None:
    """key 'gap': final train/held-out gap per arm; key 'scores': exact match and benchmark scores per arm."""
    from matplotlib.figure import Figure

    arms = summary["arms"]
    if key == "gap":
        groups = [("held-out − train output loss", [a["results"]["gap"] for a in arms])]
        ylabel, title, pct = "nats", "final models: held-out − train output loss (lower = less overfit)", False
    else:
        groups = []
        if all("exact_match" in a["results"] for a in arms):
            groups.append(("held-out exact match", [a["results"]["exact_match"]["accuracy"] for a in arms]))
        for label in sorted(arms[0]["results"].get("bench", {})):
            if all(label in a["results"].get("bench", {}) for a in arms):
                groups.append((label, [a["results"]["bench"][label]["value"] for a in arms]))
        if not groups:
            return None
        ylabel, title, pct = "%", "scores of the final models (higher is better)", True
    fig = Figure(figsize=(max(5, 1.6 + 1.3 * len(arms) * len(groups)), 4), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(arms)
    for i, a in enumerate(arms):
        xs = [g + (i - (len(arms) - 1) / 2) * width for g in range(len(groups))]
        vals = [(v or 0.0) * (100 if pct else 1) for _, g in groups for v in [g[i]]]
        bars = ax.bar(xs, vals, width * 0.95, color=f"C{i}", label=a["spec"])
        ax.bar_label(bars, labels=[f"{v:.1f}" if pct else f"{v:.4f}" for v in vals], fontsize=8)
    ax.set_xticks(range(len(groups)), [g for g, _ in groups])
    ax.axhline(0, color="k", lw=0.6)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    p = out / f"{key}.png"
    fig.savefig(p, dpi=100)
    return p


# ----------------------------------------------------------------------------------------------------------------
# The page, as blocks: ("h", level, text) ("p", text) ("table", header, rows) ("img", path, alt) ("code", lang, text)
def f4(x) -> str:
    return "–" if x is None else f"{x:.4f}"


def results_table(summary: dict) -> tuple[list[str], list[list[str]]]:
    """One row per arm: the mean over seeds (one seed: that run), its spread, and the best checkpoint's score."""
    arms = summary["arms"]
    r0 = arms[0]["results"]
    header = ["arm", f"train output loss (n={r0['train']['n']})", f"held-out output loss (n={r0['heldout']['n']})",
              "gap (held-out − train)"]
    seeds = len(arms[0].get("runs") or [0])
    if seeds > 1:
        header.append(f"held-out output loss: sd over {seeds} seeds")
    has_best = all("best" in a["results"] for a in arms)
    if has_best:
        header.append("held-out output loss at the best checkpoint (its step)")
    if all("bleu" in a["results"] for a in arms):
        header.append(f"BLEU vs train outputs (n={r0['bleu']['n']})")
    if all("exact_match" in a["results"] for a in arms):
        header.append(f"held-out exact match (n={r0['exact_match']['n']})")
    labels = sorted(r0.get("bench", {}))
    header += [f"{label} ({r0['bench'][label]['metric']}"
               + (f", judge {r0['bench'][label]['judge']}" if r0["bench"][label].get("judge") else "")
               + f", n={r0['bench'][label]['n']})" for label in labels]
    rows = []
    for a in arms:
        r = a["results"]
        row = [a["spec"], f4(r["train"]["output_loss"]), f4(r["heldout"]["output_loss"]), f4(r["gap"])]
        if seeds > 1:
            row.append(f4(r.get("seeds", {}).get("heldout_loss", {}).get("sd")))
        if has_best:
            row.append(f"{f4(r['best']['heldout']['output_loss'])} ({', '.join(map(str, r['best']['steps']))})")
        if "BLEU" in " ".join(header):
            row.append(f"{r['bleu']['corpus_bleu']:.2f}" if r["bleu"]["corpus_bleu"] is not None else "–")
        if "exact match" in " ".join(header):
            e = r["exact_match"]
            row.append(f"{100 * e['accuracy']:.1f}% ({sum(e['correct'])}/{e['n']})")
        for label in labels:
            v = r.get("bench", {}).get(label, {}).get("value")
            row.append(_show(f"bench:{label}", v))
        rows.append(row)
    return header, rows


def difference_table(summary: dict) -> tuple[list[str], list[list[str]]] | None:
    """Every arm minus the reference arm, per measure with an interval."""
    ev = summary.get("evidence")
    if not ev or not ev["measures"]:
        return None
    from .evidence import excludes_zero

    header = ["measure", "arm − reference", "difference", f"{100 * ev['level']:g}% interval", "decision"]
    rows = []
    for key, m in ev["measures"].items():
        for arm, iv in m["differences"].items():
            if arm == ev["reference"]:
                continue
            win = None
            if excludes_zero(iv):
                win = arm if (iv["value"] < 0) == (m["better"] == "lower") else ev["reference"]
            rows.append([m["label"], f"{arm} − {ev['reference']}", _diff(key, iv["value"]),
                         f"{_diff(key, iv['low'])} to {_diff(key, iv['high'])}",
                         f"{win} won" if win else "no difference"])
    return header, rows


def seed_table(summary: dict) -> tuple[list[str], list[list[str]]]:
    """One row per run (arm x seed): what the means above are made of."""
    header = ["arm", "seed", "train output loss", "held-out output loss (final)", "best step",
              "held-out output loss (best)", "held-out exact match"]
    rows = []
    for a, run in runs_of(summary):
        r = run.get("results") or a["results"]
        best = r.get("best")
        em = r.get("exact_match")
        rows.append([a["spec"], str(run["seed"]), f4(r["train"]["output_loss"]), f4(r["heldout"]["output_loss"]),
                     str(best["step"]) if best else "–", f4(best["heldout"]["output_loss"]) if best else "–",
                     f"{100 * em['accuracy']:.1f}%" if em else "–"])
    return header, rows


def curve_table(summary: dict, metrics: dict) -> tuple[list[str], list[list[str]]]:
    runs = list(runs_of(summary))
    points = {run["dir"]: eval_points(metrics[run["dir"]]) for _, run in runs}
    seeds = True  # every run is an (arm, seed) pair; the column stays even for one seed
    val = any(r.get("val_output_loss") is not None for p in points.values() for r in p)
    header = ["arm", *(["seed"] if seeds else []), "step", "epoch", "train-sample output loss",
              "held-out output loss", "gap", *(["validation output loss"] if val else [])]
    rows = []
    for a, run in runs:
        for r in points[run["dir"]]:
            t, h, v = r.get("train_output_loss"), r.get("eval_output_loss"), r.get("val_output_loss")
            rows.append([a["spec"], *([str(run["seed"])] if seeds else []), str(r["step"]),
                         f"{r.get('epoch', 0):.2f}", f4(t), f4(h),
                         f4(h - t if h is not None and t is not None else None), *([f4(v)] if val else [])])
    return header, rows


def training_table(summary: dict, metrics: dict) -> tuple[list[str], list[list[str]]]:
    header = ["arm", "seed", "steps", "tokens", "train time (s)", "output loss, first step", "output loss, last step",
              "objective (loss), last step"]
    rows = []
    for a, run in runs_of(summary):
        tp = train_points(metrics[run["dir"]])
        if not tp:
            rows.append([a["spec"], str(run["seed"]), "0", "–", "–", "–", "–", "–"])
            continue
        rows.append([a["spec"], str(run["seed"]), str(tp[-1]["step"]), f"{tp[-1].get('tokens', 0):,}",
                     f"{tp[-1].get('time', 0):.0f}", f4(tp[0].get("loss_output")), f4(tp[-1].get("loss_output")),
                     f4(tp[-1].get("loss"))])
    return header, rows


CAN_CANNOT = (
    "What this comparison can show: for this model, this data, this budget and these seeds, which loss arm reached the "
    "lower output-token loss on held-out data (at the final checkpoint and at the checkpoint an early stop on the "
    "validation part would keep), how far each arm's training and held-out losses drifted apart (the "
    "IM paper's overfitting signal: IM tends to have a *higher* training output loss but a *lower* held-out one), "
    "how much each arm reproduces its training outputs (BLEU), and the scores listed, with intervals over seeds and "
    "held-out examples. What it cannot show: that the ranking holds for other data sizes (`imtune study --factor n`), "
    "instruction/output ratios (`imtune study --factor ratio`), larger models (the paper's results are for 7B/13B "
    "models) or other benchmarks; nor that a held-out loss difference turns into a quality difference a person would "
    "notice. With few seeds the seed level of the interval is coarse: more `--seeds` make it trustworthy.")


def _split_text(data: dict) -> str:
    sp = data["split"]
    held = (f"a seeded {100 * sp['heldout_fraction']:g}% split of the data" if sp["kind"] == "split"
            else f"`{sp['heldout_source']}`")
    val = sp.get("val")
    if not val:
        return held
    if val["kind"] == "none":
        return f"{held}; no validation part ({val['why']}): no best checkpoint"
    how = (f"`{val['source']}`" if val["kind"] == "given"
           else f"a seeded {100 * val['val_fraction']:g}% of the held-out data")
    return (f"{held}; best checkpoints are selected on a validation part ({data['n_val']} examples: {how}) and every "
            f"score is measured on the other {data['n_test']} (test), which selection never sees")


def blocks(summary: dict, metrics: dict, configs: dict, plots: dict) -> list[tuple]:
    from .stats import format_one

    arms = ", ".join(a["spec"] for a in summary["arms"])
    data = summary["data"]
    v = summary["verdict"]
    seeds = summary["settings"].get("seeds")
    b: list[tuple] = [("h", 1, f"imtune compare: {arms}"),
                      ("p", f"Training data `{data['source']}` ({data['n_train']} training examples, "
                            f"{data['n_heldout']} held-out: " + _split_text(data)
                            + f"); model `{summary['settings']['base_config']['model']}`"
                            + (f"; seeds {', '.join(map(str, seeds))}" if seeds else "") + "."),
                      ("h", 2, "Verdict"), ("p", v["text"]),
                      ("h", 2, "Results (final models" + (", mean over seeds" if seeds and len(seeds) > 1 else "")
                       + ")"), ("table", *results_table(summary)),
                      ("p", "Output loss = mean NLL per output token (assistant content + end-of-turn), the tokens IT "
                            "trains on, whatever the arm's own loss. gap = held-out − train. BLEU: greedy answers to "
                            "a "
                            "fixed sample of training prompts vs the training outputs (higher = more memorised). "
                            f"Thresholds for “no difference” where no interval is computed: losses "
                            f"{100 * THRESHOLDS['loss_relative']:g}% or the "
                            "eval-to-eval change of the held-out curve (the larger); BLEU "
                            f"{THRESHOLDS['bleu_points']:g} point or {THRESHOLDS['standard_errors']:g} SE; accuracies "
                            f"{THRESHOLDS['standard_errors']:g} SE of the difference.")]
    diffs = difference_table(summary)
    if diffs:
        b += [("h", 2, f"Differences to the reference arm ({summary['evidence']['reference']})"), ("table", *diffs),
              ("p", f"Interval method: {summary['evidence']['method']} (imtune.evidence). A measure is won only "
                    "when its interval excludes zero.")]
    if summary.get("evidence"):
        b += [("h", 3, "Per seed"), ("table", *seed_table(summary))]
    b += [("h", 2, "Curves"), ("img", plots["curves"], "output-token loss curves per arm")]
    b += [("img", plots["gap"], "train/held-out gap per arm")]
    if plots.get("scores"):
        b.append(("img", plots["scores"], "exact match and benchmark scores per arm"))
    b += [("h", 3, "Evaluation points (from each run's metrics.jsonl)"), ("table", *curve_table(summary, metrics)),
          ("p", "The train sample is the trainer's fixed sample of training examples (`eval_train_sample`); the final "
                "results above score the training set (or `--loss-samples` of it) with the final model. The "
                "validation loss selects the best checkpoint; held-out = the test part."),
          ("h", 3, "Training (from each run's metrics.jsonl)"), ("table", *training_table(summary, metrics))]
    b += [("h", 2, "Data"), ("code", "text", format_one(data["stats"], data["source"]))]
    b += [("h", 2, "Commands")]
    b += [("code", "bash", "\n".join(f"# {c['time']} in {c['cwd']}\n" + " ".join(shlex.quote(x) for x in c["argv"])
                                     for c in summary["commands"]))]
    for a, run in runs_of(summary):
        b += [("h", 3, f"Arm {a['spec']}: `{run['dir']}/config.yaml`"), ("code", "yaml", configs[run["dir"]].rstrip())]
    b += [("h", 2, "What this can and cannot show"), ("p", CAN_CANNOT)]
    return b


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def to_markdown(blocks_: list[tuple], root: Path) -> str:
    out = []
    for blk in blocks_:
        kind = blk[0]
        if kind == "h":
            out.append("#" * blk[1] + " " + blk[2])
        elif kind == "p":
            out.append(blk[1])
        elif kind == "table":
            header, rows = blk[1], blk[2]
            rule = "|---|" + "---:|" * (len(header) - 1)  # numbers right-aligned
            out.append("\n".join(["| " + " | ".join(map(_md_cell, header)) + " |", rule]
                                 + ["| " + " | ".join(map(_md_cell, r)) + " |" for r in rows]))
        elif kind == "img":
            out.append(f"![{blk[2]}]({Path(blk[1]).relative_to(root).as_posix()})")
        elif kind == "code":
            out.append(f"```{blk[1]}\n{blk[2]}\n```")
    return "\n\n".join(out) + "\n"


def _inline(text: str) -> str:
    t = html.escape(text, quote=False)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    t = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", t)
    return re.sub(r"(?<![*\w])\*([^*]+)\*(?![*\w])", r"<em>\1</em>", t)


CSS = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;line-height:1.45}"
       "table{border-collapse:collapse;margin:1em 0;font-size:.92em}td,th{border:1px solid #ccc;padding:.25em .6em}"
       "td{text-align:right}td:first-child{text-align:left}th{background:#f3f3f3}"
       "pre{background:#f6f6f6;padding:.8em;overflow-x:auto;font-size:.85em}img{max-width:100%}")


def to_html(blocks_: list[tuple], title: str) -> str:
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{CSS}</style></head><body>"]
    for blk in blocks_:
        kind = blk[0]
        if kind == "h":
            out.append(f"<h{blk[1]}>{_inline(blk[2])}</h{blk[1]}>")
        elif kind == "p":
            out.append(f"<p>{_inline(blk[1])}</p>")
        elif kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in blk[1])
            body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in blk[2])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode(Path(blk[1]).read_bytes()).decode("ascii")
            out.append(f"<p><img alt='{html.escape(blk[2])}' src='data:image/png;base64,{data}'></p>")
        elif kind == "code":
            out.append(f"<pre><code>{html.escape(blk[2])}</code></pre>")
    return "\n".join(out) + "\n</body></html>\n"


def write_report(compare_dir: str | Path) -> tuple[Path, Path]:
    """Plots + report.md + report.html from compare.json and the arms' run directories; returns the two paths."""
    d = Path(compare_dir)
    summary, metrics, configs = load(d)
    summary["verdict"] = verdict(summary, d)  # recomputed from the files: the report never trusts a stale text
    plots_dir = d / "plots"
    plots_dir.mkdir(exist_ok=True)
    plots = {"curves": plot_curves(summary, metrics, plots_dir), "gap": plot_bars(summary, plots_dir, "gap"),
             "scores": plot_bars(summary, plots_dir, "scores")}
    bl = blocks(summary, metrics, configs, plots)
    md, page = d / "report.md", d / "report.html"
    md.write_text(to_markdown(bl, d), encoding="utf-8")
    page.write_text(to_html(bl, bl[0][2]), encoding="utf-8")
    return md, page


def text_table(summary: dict) -> str:
    """The results table for a terminal."""
    header, rows = results_table(summary)
    width = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, width)))  # noqa
    return "\n".join([line(header), line(["-" * w for w in width]), *map(line, rows)])
