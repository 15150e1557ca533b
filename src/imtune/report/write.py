"""The comparison report: COMPARE_DIR/compare.json + arms/*/ (config.yaml, metrics.jsonl) -> plots, report.md,
report.html (self-contained: the PNGs are embedded as base64 data URIs), and the verdict.

Nothing here trains or evaluates: the report is a function of files, so `imtune compare --report-only DIR` rebuilds
it. This module reads the files and decides the verdict; the page (imtune.report.page: tables, example answers,
versions, configs as a diff from the base) is built once as a list of blocks and written twice, as Markdown and as
HTML (imtune.report.render), so both always say the same; imtune.report.plots draws the plots on honest axes.

The verdict opens with a one-line headline (who won, by how much, the 95% interval, how many seeds and examples; or
that no arm won), then warnings (a run that learned nothing: imtune.report.checks), the `imtune data stats` advice
next to the outcome, and one bullet per measure and note.

Measures with intervals (compare.json "evidence") are won when the interval excludes zero. The others decide each
measure between the best arm and every other arm; a difference counts only when it is larger than the measure's
threshold (THRESHOLDS, stated in the report):
- losses (held-out output loss, the train/held-out gap): 1% of the value, or the change between the last two
  evaluation points of either arm's held-out curve (how much the number moves from one eval to the next), the larger;
- BLEU-to-train: 1 BLEU point, or 2 standard errors of the per-prompt sentence-BLEU difference, the larger;
- accuracies (held-out exact match, benchmarks): 2 standard errors of the difference (paired per example when both
  arms answered the same examples, else binomial).
"""
from __future__ import annotations

import math
from pathlib import Path

from imtune import files
from imtune.report.checks import advice_vs_outcome, learned_nothing, next_commands, nothing_warning, undecided
from imtune.report.page import blocks, text_table as table
from imtune.report.plots import plot_bars, plot_curves
from imtune.report.render import to_html, to_markdown  # noqa: F401 (imtune.experiments.sweep and imtune.experiments.study import them from here)
from imtune.report.runs import THRESHOLDS, eval_points, load, load_metrics, show_diff, show_value
from imtune.results import CompareResult, Evidence, Interval, Measure, Verdict


# ----------------------------------------------------------------------------------------------------------------
# The verdict
def _measures(summary: CompareResult) -> list[tuple[str, str, str, dict]]:
    """(key, label, 'lower'|'higher', arm -> value) for every measure the arms have."""
    arms = summary.arms
    get = lambda f: {a.name: f(a.results) for a in arms}  # noqa: E731
    out = [("heldout_loss", "held-out output loss", "lower", get(lambda r: r.heldout.output_loss)),
           ("gap", "train/held-out gap", "lower", get(lambda r: r.gap))]
    if all(a.results.bleu and a.results.bleu.meaningful() for a in arms):
        out.append(("bleu", "memorisation (BLEU of greedy answers vs training outputs)", "lower",
                    get(lambda r: r.bleu.corpus_bleu)))
    if all(a.results.exact_match for a in arms):
        out.append(("exact_match", "held-out exact match", "higher", get(lambda r: r.exact_match.accuracy)))
    labels = [set(a.results.bench or {}) for a in arms]
    for label in sorted(set.intersection(*labels) if labels else set()):
        b0 = arms[0].results.bench[label]
        judge = f", judge {b0.judge}" if b0.judge else ""
        out.append((f"bench:{label}", f"{label} ({b0.metric}{judge})", "higher",
                    get(lambda r, k=label: r.bench[k].value)))
    return out


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


def _threshold(key: str, a: str, b: str, summary: CompareResult, metrics: dict) -> tuple[float, str]:
    """(threshold for |value_a - value_b|, how it was set)."""
    res = {x.name: x.results for x in summary.arms}
    k = THRESHOLDS["standard_errors"]
    if key in ("heldout_loss", "gap"):
        ref = [res[a].heldout.output_loss, res[b].heldout.output_loss]
        rel = THRESHOLDS["loss_relative"] * max(abs(v) for v in ref if v is not None)
        spread = max(_spread(metrics.get(a, []), key), _spread(metrics.get(b, []), key))
        return (spread, "eval-to-eval change") if spread > rel else (rel, "1% of the loss")
    if key == "bleu":
        se = _se_paired(res[a].bleu.sentence_bleu, res[b].bleu.sentence_bleu) or 0.0
        return (k * se, f"{k:g} SE") if k * se > THRESHOLDS["bleu_points"] else (THRESHOLDS["bleu_points"], "1 point")
    if key == "exact_match":
        se = _se_paired(res[a].exact_match.correct, res[b].exact_match.correct)
        if se is not None:
            return k * se, f"{k:g} paired SE"
        n, m = res[a].exact_match.n, res[b].exact_match.n
        p, q = res[a].exact_match.accuracy, res[b].exact_match.accuracy
    else:
        label = key.split(":", 1)[1]
        sa, sb = res[a].bench[label].standard_error, res[b].bench[label].standard_error
        if sa is not None and sb is not None:  # judged benchmarks report their own standard errors
            return k * math.sqrt(sa ** 2 + sb ** 2), f"{k:g} SE"
        n, m = res[a].bench[label].n or 1, res[b].bench[label].n or 1
        p, q = res[a].bench[label].value or 0.0, res[b].bench[label].value or 0.0
    return k * math.sqrt(p * (1 - p) / max(n, 1) + q * (1 - q) / max(m, 1)), f"{k:g} SE"






VERDICT_VERSION = 1  # compare.json's stored verdict is trusted when it has this version (write_report)


def verdict(summary: CompareResult, compare_dir: str | Path) -> Verdict:
    """Per measure: the values, the decision and the text. Measures with intervals (compare.json "evidence": held-out
    loss final and best, gap, exact match) compare every arm with the reference arm: "won" only when the 95% interval
    of the difference excludes zero. The others (BLEU, benchmarks; and every measure of a version-1 compare.json)
    compare the best arm with the rest against THRESHOLDS. Reads metrics.jsonl and compare.json."""
    d = Path(compare_dir)
    metrics = load_metrics(summary, d)
    runs = summary.runs()
    by_arm = {}
    for a, r in runs:  # the threshold rules look at one run per arm (the first seed)
        by_arm.setdefault(a.name, metrics[r.dir])
    spec = {a.name: a.spec for a in summary.arms}
    measures, sentences, wins = [], [], {}
    evidence = summary.evidence or Evidence()
    for key, m in evidence.measures.items():
        rec, sentence = _interval_measure(key, m, evidence.reference)
        measures.append(rec)
        sentences.append(sentence)
        for c in rec["comparisons"]:
            if c["winner"]:
                wins.setdefault(c["winner"], []).append(m.label)
    for key, label, better, values in _measures(summary):
        known = {a: v for a, v in values.items() if v is not None}
        if len(known) < 2 or key in evidence.measures:
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
    if {"heldout_loss", "best_heldout_loss"} <= set(evidence.measures):
        sentences.append(_early_stopping(measures))
    curves = {summary.run_label(a, r): metrics[r.dir] for a, r in runs}
    bullets = [x for x in sentences if x] + _notes(summary, curves)
    stalled = learned_nothing(summary, metrics, d)
    nothing = nothing_warning(stalled, len(runs)) if stalled else None
    warnings = [nothing[0] + " " + "; ".join(nothing[1]) + "."] if nothing else []
    advice = advice_vs_outcome(summary, measures)
    primary = next((m for m in measures if m["key"] == "heldout_loss" and "reference" in m), None)
    held = {r.dir: [(e["step"], e["eval_output_loss"]) for e in eval_points(metrics[r.dir])
                       if e.get("eval_output_loss") is not None] for _, r in runs}
    why_not = undecided(summary, held, primary) if primary else []
    head = headline(summary, measures, wins, [why for _, why in why_not]) + (
        f" — ⚠ {len(stalled)} of {len(runs)} runs learned nothing" if stalled else "")
    tie = primary is not None and not any(c["winner"] for c in primary["comparisons"])
    steps = [{"why": why, "command": cmd}
             for why, cmd in next_commands(summary, [k for k, _ in why_not] + (["tie"] if tie else []))]
    text = "\n".join([head, *([f"⚠ Warning: {nothing[0]}", *(f"  {x}" for x in nothing[1])] if nothing else []),
                      *([f"Advice vs outcome: {advice['text']}"] if advice else []), ""]
                     + [f"- {x}" for x in bullets]
                     + next_text(steps, summary.cwd))
    return Verdict(version=VERDICT_VERSION, thresholds=THRESHOLDS, evidence_method=evidence.method or None,
                   measures=measures, headline=head, warnings=warnings,
                   learned_nothing={"warning": nothing[0], "runs": nothing[1]} if nothing else None, advice=advice,
                   bullets=bullets, undecided=[k for k, _ in why_not], next=steps, text=text)


def next_text(steps: list[dict], cwd: str | None) -> list[str]:
    """The next steps for a terminal (compare's and sweep's): a heading, each reason with its command under it
    (report_checks.next_commands: {"why", "command"}); [] when there are none."""
    if not steps:
        return []
    lines = ["", "To decide" + (f" (run in {cwd}):" if cwd else ":")]
    for step in steps:
        lines += [f"- {step['why']}", *([f"    {step['command']}"] if step.get("command") else [])]
    return lines


def _signed(key: str, v: float) -> str:
    return ("−" if v < 0 else "+") + show_diff(key, abs(v))


def _pct(m: dict, c: dict) -> str:
    ref = (m.get("values") or {}).get(c["reference"])
    x = c["diff"] / ref if ref else 0.0
    return f" ({'−' if x < 0 else '+'}{abs(x):.1%} of {c['reference']}'s)" if ref and m["key"].endswith("loss") else ""


def _beat(m: dict, c: dict) -> str:
    """`im beat it on held-out output loss (final): im − it −0.3100 (−51.7% of it's; 95% interval −0.4500 to
    −0.1800)`: always arm − reference, the tables' sign, whoever won."""
    loser = c["reference"] if c["winner"] == c["arm"] else c["arm"]
    return (f"{c['winner']} beat {loser} on {m['label']}: {_diff_iv(m, c)}")


def _diff_iv(m: dict, c: dict) -> str:
    k = m["key"]
    return (f"{c['arm']} − {c['reference']} {_signed(k, c['diff'])}{_pct(m, c)}, 95% interval {_signed(k, c['low'])} "
            f"to {_signed(k, c['high'])}")


def headline(summary: CompareResult, measures: list[dict], wins: dict, why_not: list[str] | None = None) -> str:
    """One line: who won, by how much (arm − reference, as in the tables), the 95% interval and how much evidence;
    that no arm won; or "Undecided" and why (report_checks.undecided) when the budget cannot decide, interval or not.
    Held-out output loss (final) first; other interval measures only when it has no winner."""
    arms = summary.arms
    if len(arms) < 2:
        return f"One arm ({arms[0].spec}): nothing to compare."
    ivm = [m for m in measures if "reference" in m]
    if not ivm:  # a version-1 compare.json: thresholds, one seed
        if wins:
            return "; ".join(f"{a} won on {', '.join(ms)}" for a, ms in wins.items()) + \
                " (beyond its thresholds; one seed, no intervals)"
        return "No arm won: every difference is within its threshold (one seed, no intervals)"
    ev = summary.evidence
    n_seeds, n_ex = ev.n_seeds, ev.n_examples.get("heldout")
    size = f"{n_seeds} seed{'s' if n_seeds != 1 else ''}" + (f" × {n_ex} held-out examples" if n_ex else "")
    primary = next((m for m in ivm if m["key"] == "heldout_loss"), ivm[0])
    if why_not:
        return (f"Undecided on {primary['label']}: " + "; ".join(_diff_iv(primary, c) for c in primary["comparisons"])
                + " — but " + "; ".join(why_not) + f" — {size}")
    won = [(primary, c) for c in primary["comparisons"] if c["winner"]]
    if won:
        same = [f"{c['arm']} vs {c['reference']}: no difference" for c in primary["comparisons"] if not c["winner"]]
        return "; ".join([*(_beat(m, c) for m, c in won), *same]) + f" — {size}"
    other = [(m, c) for m in ivm for c in m["comparisons"] if c["winner"]]
    ivs = "; ".join(_diff_iv(primary, c) for c in primary["comparisons"])
    if other:
        return (f"No difference on {primary['label']} ({ivs}); " + "; ".join(_beat(m, c) for m, c in other)
                + f" — {size}")
    return f"No arm won: every interval includes zero ({primary['label']}: {ivs}) — {size}"


def _iv(key: str, iv: Interval) -> str:
    return f"{show_diff(key, iv.value)} (95% interval {show_diff(key, iv.low)} to {show_diff(key, iv.high)})"


def _interval_measure(key: str, m: Measure, ref: str) -> tuple[dict, str]:
    """Each arm minus the reference: the difference, its interval, and who won (None: no difference)."""
    rows, parts = [], []
    for arm, iv in m.differences.items():
        if arm == ref:
            continue
        winner = None
        if iv.excludes_zero():
            winner = arm if (iv.value < 0) == (m.better == "lower") else ref
        rows.append({"arm": arm, "reference": ref, "diff": iv.value, "low": iv.low, "high": iv.high,
                     "decided": winner is not None, "winner": winner})
        vals = f"{arm} {show_value(key, m.values[arm].value)} vs {ref} {show_value(key, m.values[ref].value)}"
        parts.append(f"{arm} − {ref} = {_iv(key, iv)}, {vals}: "
                     + (f"**{winner} won**" if winner else "no difference"))
    rec = {"key": key, "label": m.label, "better": m.better, "reference": ref,
           "values": {a: v.value for a, v in m.values.items()}, "comparisons": rows}
    return rec, f"On {m.label} ({m.better} is better): " + "; ".join(parts) + "."


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
        return (f"{spec[r['arm']]} {show_value(key, r['value'])} (Δ {show_diff(key, r['diff'])}{rel} {cmp} threshold "
                f"{show_diff(key, r['threshold'])}, {r['threshold_rule']})")

    tied = [r for r in rows if not r["decided"]]
    ahead = [r for r in rows if r["decided"]]
    if not tied:
        return f"On {label}, **{spec[best]}** won: {show_value(key, known[best])} vs " + "; ".join(map(vs, rows)) + "."
    if not ahead:
        return (f"On {label}, no difference: {spec[best]} {show_value(key, known[best])} vs "
                + "; ".join(map(vs, rows)) + ".")
    return (f"On {label}, {spec[best]} ({show_value(key, known[best])}) and " + "; ".join(map(vs, tied))
            + " are within the threshold of each other, ahead of " + "; ".join(map(vs, ahead)) + ".")


def _overfitting(metrics: dict, spec: dict) -> list[str]:
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
    out = []
    if rising:
        out.append("Held-out output loss rose after its best point (by more than 1%) for " + "; ".join(rising) + ".")
    if flat:
        out.append("Held-out output loss levelled off (within 1% of its best) for " + "; ".join(flat) + ".")
    if falling and len(falling) == len(metrics):
        out.append(f"Held-out output loss was still falling at the last evaluation for every arm "
                   f"({', '.join(falling)}): training stopped before any arm began to overfit by this measure, and "
                   "the IM paper's gains come from IM overfitting less.")
    elif falling:
        out.append("Held-out output loss was still falling at the last evaluation for " + ", ".join(falling) + ".")
    return out


def _effective_lr(summary: CompareResult) -> list[str]:
    """At equal steps IM's output tokens get a smaller share of each step: the loss is normalised over every weighted
    token (--normalize tokens), so the outputs' gradient scale is about it-share / im-share of IT's."""
    share = (summary.data.get("stats") or {}).get("supervised_share") or {}
    norm = summary.base_config.get("normalize", "tokens")
    if norm != "tokens" or not share.get("it") or not share.get("im") or \
            not any(a.spec.split("+")[0] == "im" for a in summary.arms):
        return []
    k = share["it"] / share["im"]
    return [f"At equal steps IM is not IT with more tokens: each step's loss is normalised over all weighted tokens "
            f"(instruction + output under im), so IM's output tokens get about {k:.2f}× IT's gradient scale here "
            f"(an effective learning rate {1 / k:.1f}× lower on the outputs). A gap between them can come from that "
            "as well as from the instruction tokens themselves; `--normalize nonzero` or a larger lr for im separates "
            "the two."]


def _notes(summary: CompareResult, curves: dict) -> list[str]:
    """The verdict's bullets after the measures: training loss, overfitting, BLEU's limits, seeds and intervals."""
    res = {a.spec: a.results for a in summary.arms}
    tr = {a: r.train.output_loss for a, r in res.items() if r.train and r.train.output_loss is not None}
    out = []
    if len(tr) >= 2:
        lo = min(tr, key=tr.get)
        out.append(f"Training output loss was lowest for {lo}: "
                   + ", ".join(f"{a} {v:.4f}" for a, v in sorted(tr.items(), key=lambda kv: kv[1]))
                   + " (not a goal: the paper's sign of overfitting is a low training but high held-out loss).")
    out += _overfitting(curves, {k: k for k in curves})  # keyed by run label
    b = [a.results.bleu for a in summary.arms if a.results.bleu]
    if b and not b[0].meaningful():
        out.append(f"BLEU is not judged: the training outputs average {b[0].reference_words_mean:.1f} words, "
                   "fewer than BLEU's 4-gram order, so it is 0 for any answer.")
    out += _effective_lr(summary)
    seeds = summary.seeds
    if summary.evidence:
        how = (f"Every arm ran with {len(seeds)} seed(s) ({', '.join(map(str, seeds))}); intervals: "
               f"{summary.evidence.method}.")
        if len(seeds) == 1:
            how += " With one seed the intervals cover the held-out examples only, not seed-to-seed variation."
    else:
        how = (f"All arms ran with one seed ({seeds[0]}); a single seed cannot show seed-to-seed variation, so "
               "treat small wins as indicative.")
    return out + [how]


# ----------------------------------------------------------------------------------------------------------------
# Writing: plots (imtune.report.plots) + the page (imtune.report.page) as Markdown and HTML (imtune.report.render)
def write_report(compare_dir: str | Path, recompute: bool = False) -> tuple[Path, Path]:
    """Plots + report.md + report.html from compare.json and the arms' run directories; returns the two paths.
    The verdict is the one compare.json holds (compare computed it once); it is computed here, and stored back into
    compare.json, only when asked (`--report-only`: rebuild from the files), absent, or of another VERDICT_VERSION."""
    d = files.owned(compare_dir, "compare")
    summary, metrics, configs = load(d)
    if recompute or summary.verdict is None or summary.verdict.version != VERDICT_VERSION:
        summary = summary.replace(verdict=verdict(summary, d))
        files.write_json(d / "compare.json", summary.to_json(), root=d)
    plots_dir = files.make_dirs(d / "plots", d)
    plots = {"curves": plot_curves(summary, metrics, plots_dir), "gap": plot_bars(summary, plots_dir, "gap"),
             "scores": plot_bars(summary, plots_dir, "scores")}
    bl = blocks(summary, metrics, configs, plots, d)
    md, page = d / "report.md", d / "report.html"
    files.write_text(md, to_markdown(bl, d), d)
    files.write_text(page, to_html(bl, bl[0][2]), d)
    return md, page


def text_table(summary: CompareResult) -> str:
    """The results table for a terminal (imtune.report.page)."""
    return table(summary)
