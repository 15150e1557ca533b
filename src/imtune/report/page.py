"""The compare report's page: compare.json + the run directories -> blocks (imtune.report.render writes them as
Markdown and HTML). Top to bottom: the headline, warnings, the advice next to the outcome, the verdict as bullets, the
tables, example answers side by side, the plots, the data, versions, commands and each run's config as a diff from
the base config."""
from __future__ import annotations

import shlex
from pathlib import Path

from imtune.analysis.stats import format_one
from imtune.data.records import read_records
from imtune.model.provenance import versions_line
from imtune.report.runs import THRESHOLDS, eval_points, show_diff, show_value, train_points
from imtune.results import CompareResult
from imtune.types import Problem


def f4(x) -> str:
    return "–" if x is None else f"{x:.4f}"


def results_table(summary: CompareResult) -> tuple[list[str], list[list[str]]]:
    """One row per arm: the mean over seeds (one seed: that run), its spread, and the best checkpoint's score."""
    arms = summary.arms
    r0 = arms[0].results
    header = ["arm", f"train output loss (n={r0.train.n})", f"held-out output loss (n={r0.heldout.n})",
              "gap (held-out − train)"]
    seeds = len(arms[0].runs)
    if seeds > 1:
        header.append(f"held-out output loss: sd over {seeds} seeds")
    has_best = all(a.results.best for a in arms)
    if has_best:
        header.append("held-out output loss at the best checkpoint (its step)")
    if all(a.results.bleu for a in arms):
        header.append(f"BLEU vs train outputs (n={r0.bleu.n})")
    if all(a.results.exact_match for a in arms):
        header.append(f"held-out exact match (n={r0.exact_match.n})")
    labels = sorted(r0.bench or {})
    header += [f"{label} ({r0.bench[label].metric}" + (f", judge {r0.bench[label].judge}" if r0.bench[label].judge
                                                       else "") + f", n={r0.bench[label].n})" for label in labels]
    rows = []
    for a in arms:
        r = a.results
        row = [a.spec, f4(r.train.output_loss), f4(r.heldout.output_loss), f4(r.gap)]
        if seeds > 1:
            row.append(f4((r.seeds or {}).get("heldout_loss", {}).get("sd")))
        if has_best:
            row.append(f"{f4(r.best.heldout.output_loss)} ({', '.join(map(str, r.best.steps))})")
        if "BLEU" in " ".join(header):
            row.append(f"{r.bleu.corpus_bleu:.2f}" if r.bleu.corpus_bleu is not None else "–")
        if "exact match" in " ".join(header):
            e = r.exact_match
            row.append(f"{100 * e.accuracy:.1f}% ({sum(e.correct)}/{e.n})")
        for label in labels:
            b = (r.bench or {}).get(label)
            row.append(show_value(f"bench:{label}", b.value if b else None))
        rows.append(row)
    return header, rows


def difference_table(summary: CompareResult) -> tuple[list[str], list[list[str]]] | None:
    """Every arm minus the reference arm, per measure with an interval."""
    ev = summary.evidence
    if not ev or not ev.measures:
        return None
    header = ["measure", "arm − reference", "difference", f"{100 * ev.level:g}% interval", "decision"]
    rows = []
    for key, m in ev.measures.items():
        for arm, iv in m.differences.items():
            if arm == ev.reference:
                continue
            win = None
            if iv.excludes_zero():
                win = arm if (iv.value < 0) == (m.better == "lower") else ev.reference
            rows.append([m.label, f"{arm} − {ev.reference}", show_diff(key, iv.value),
                         f"{show_diff(key, iv.low)} to {show_diff(key, iv.high)}",
                         f"{win} won" if win else "no difference"])
    return header, rows


def seed_table(summary: CompareResult) -> tuple[list[str], list[list[str]]]:
    """One row per run (arm x seed): what the means above are made of."""
    header = ["arm", "seed", "train output loss", "held-out output loss (final)", "best step",
              "held-out output loss (best)", "held-out exact match"]
    rows = []
    for a, run in summary.runs():
        r = run.results or a.results
        best, em = r.best, r.exact_match
        rows.append([a.spec, str(run.seed), f4(r.train.output_loss), f4(r.heldout.output_loss),
                     str(best.step) if best else "–", f4(best.heldout.output_loss) if best else "–",
                     f"{100 * em.accuracy:.1f}%" if em else "–"])
    return header, rows


def curve_table(summary: CompareResult, metrics: dict) -> tuple[list[str], list[list[str]]]:
    runs = summary.runs()
    points = {run.dir: eval_points(metrics[run.dir]) for _, run in runs}
    seeds = True  # every run is an (arm, seed) pair; the column stays even for one seed
    val = any(r.get("val_output_loss") is not None for p in points.values() for r in p)
    header = ["arm", *(["seed"] if seeds else []), "step", "epoch", "train-sample output loss",
              "held-out output loss", "gap", *(["validation output loss"] if val else [])]
    rows = []
    for a, run in runs:
        for r in points[run.dir]:
            t, h, v = r.get("train_output_loss"), r.get("eval_output_loss"), r.get("val_output_loss")
            rows.append([a.spec, *([str(run.seed)] if seeds else []), str(r["step"]),
                         f"{r.get('epoch', 0):.2f}", f4(t), f4(h),
                         f4(h - t if h is not None and t is not None else None), *([f4(v)] if val else [])])
    return header, rows


def training_table(summary: CompareResult, metrics: dict) -> tuple[list[str], list[list[str]]]:
    header = ["arm", "seed", "steps", "tokens", "train time (s)", "output loss, first step", "output loss, last step",
              "objective (loss), last step"]
    rows = []
    for a, run in summary.runs():
        tp = train_points(metrics[run.dir])
        if not tp:
            rows.append([a.spec, str(run.seed), "0", "–", "–", "–", "–", "–"])
            continue
        rows.append([a.spec, str(run.seed), str(tp[-1]["step"]), f"{tp[-1].get('tokens', 0):,}",
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




# ----------------------------------------------------------------------------------------------------------------
# Example answers, side by side
GENERATIONS = (("compare-exact-match.jsonl", "held-out prompts (the exact-match sample)"),
               ("compare-bleu.jsonl", "training prompts (the memorisation sample: BLEU against these references)"))
N_EXAMPLES = 3
CELL_CHARS = 400


def _clip(text) -> str:
    if text is None:
        return "–"
    text = str(text).strip()
    if not text:
        return "(empty answer)"
    return text if len(text) <= CELL_CHARS else text[:CELL_CHARS].rstrip() + " …"


def _generations(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [v for _, v in (item for item in read_records(str(path))[1] if not isinstance(item, Problem))
            if isinstance(v, dict)]


def examples_table(summary: CompareResult, compare_dir: Path) -> tuple[str, list[str], list[list[str]]] | None:
    """(what they are, header, rows): the first N_EXAMPLES prompts every arm answered (each arm's first seed) with the
    reference and each arm's greedy answer, from the generations compare wrote (RUN/eval/compare-*.jsonl)."""
    first = {}
    for arm, run in summary.runs():
        first.setdefault(arm.spec, run)
    for name, what in GENERATIONS:
        per_arm = {spec: {r.get("source"): r for r in _generations(Path(compare_dir) / run.dir / "eval" / name)}
                   for spec, run in first.items()}
        if not per_arm or not all(per_arm.values()):
            continue
        sources = [s for s in next(iter(per_arm.values())) if all(s in rows for rows in per_arm.values())]
        if not sources:
            continue
        rows = []
        for s in sources[:N_EXAMPLES]:
            r0 = per_arm[next(iter(per_arm))][s]
            prompt = r0.get("instruction") or next((m["content"] for m in reversed(r0.get("prompt") or [])
                                                    if m.get("role") == "user"), "")
            rows.append([_clip(prompt), _clip(r0.get("reference")), *(_clip(per_arm[a][s].get("output"))
                                                                      for a in per_arm)])
        seeds = {str(run.seed) for run in first.values()}
        return (f"{len(rows)} {what}; greedy answers of each arm's final model (seed {', '.join(sorted(seeds))}); "
                f"cut at {CELL_CHARS} characters", ["prompt", "reference", *per_arm], rows)
    return None


# ----------------------------------------------------------------------------------------------------------------
# Configs: the base once, each run as what differs from it
def config_diff(summary: CompareResult, configs: dict) -> tuple[list[str], list[list[str]]]:
    """One row per run: the arm's own settings (its overrides) and every other field that differs from the base."""
    import yaml

    base = summary.base_config
    rows = []
    for arm, run in summary.runs():
        text = configs.get(run.dir, "(missing)")
        cfg = yaml.safe_load(text) if text != "(missing)" else None
        if not isinstance(cfg, dict):
            rows.append([arm.spec, str(run.seed), f"`{run.dir}`", "(config.yaml missing)"])
            continue
        keys = [k for k in cfg if k not in ("output_dir", "seed") and (k == "loss" or cfg[k] != base.get(k))]
        shown = "; ".join(f"{k}: {'–' if cfg[k] is None else cfg[k]}" for k in keys) or "(same as the base)"
        rows.append([arm.spec, str(run.seed), f"{run.dir}/config.yaml", shown])
    return ["arm", "seed", "config", "loss, and the settings of this run that differ from the base config"], rows


def _base_yaml(summary: CompareResult) -> str:
    """The base config without what each run sets for itself (its arm's loss settings, seed, directory)."""
    import yaml

    own = {"output_dir", "seed"} | {k for a in summary.arms for k in a.overrides}
    base = {k: v for k, v in summary.base_config.items() if k not in own}
    return yaml.safe_dump(base, sort_keys=False, allow_unicode=True).rstrip()


# ----------------------------------------------------------------------------------------------------------------
# The page
def blocks(summary: CompareResult, metrics: dict, configs: dict, plots: dict, compare_dir: Path) -> list[tuple]:
    arms = ", ".join(a.spec for a in summary.arms)
    data = summary.data
    v = summary.verdict
    seeds = summary.settings.get("seeds")
    b: list[tuple] = [("h", 1, f"imtune compare: {arms}"), ("headline", v.headline)]
    if v.learned_nothing:
        b.append(("warn", v.learned_nothing["warning"], v.learned_nothing["runs"]))
    if v.advice:
        b.append(("p", "Advice vs outcome: " + v.advice["text"]))
    b += [("p", f"Training data `{data['source']}` ({data['n_train']} training examples, "
                f"{data['n_heldout']} held-out: " + _split_text(data)
                + f"); model `{summary.base_config['model']}`"
                + (f"; seeds {', '.join(map(str, seeds))}" if seeds else "") + "."),
          ("h", 2, "Verdict"), ("ul", v.bullets), *next_blocks(v.next, summary.cwd),
          ("h", 2, "Results (final models" + (", mean over seeds" if seeds and len(seeds) > 1 else "") + ")"),
          ("table", *results_table(summary)),
          ("p", "Output loss = mean NLL per output token (assistant content + end-of-turn), the tokens IT trains on, "
                "whatever the arm's own loss. gap = held-out − train. BLEU: greedy answers to a fixed sample of "
                "training prompts vs the training outputs (higher = more memorised). Thresholds for “no difference” "
                f"where no interval is computed: losses {100 * THRESHOLDS['loss_relative']:g}% or the "
                "eval-to-eval change of the held-out curve (the larger); BLEU "
                f"{THRESHOLDS['bleu_points']:g} point or {THRESHOLDS['standard_errors']:g} SE; accuracies "
                f"{THRESHOLDS['standard_errors']:g} SE of the difference.")]
    diffs = difference_table(summary)
    if diffs:
        b += [("h", 2, f"Differences to the reference arm ({summary.evidence.reference})"), ("table", *diffs),
              ("p", f"Interval method: {summary.evidence.method} (imtune.analysis.evidence). A measure "
               "is won only "
                    "when its interval excludes zero.")]
    if summary.evidence:
        b += [("h", 3, "Per seed"), ("table", *seed_table(summary))]
    b.append(("h", 2, "Example answers"))
    ex = examples_table(summary, compare_dir)
    b += [("p", ex[0] + "."), ("table", ex[1], ex[2], "text")] if ex else \
        [("p", "No generations were made (`--bleu-samples 0` and no `--exact-match`): no answers to show.")]
    b += [("h", 2, "Curves"), ("img", plots["curves"], "output-token loss curves per arm")]
    b += [("img", plots["gap"], "train/held-out gap per arm")]
    if plots.get("scores"):
        b.append(("img", plots["scores"], "exact match and benchmark scores per arm"))
    b += [("p", "Loss axes span at least 20% of the values they show (never zoomed onto a tiny difference); "
                "scores use the whole 0–100% scale. Whether a difference is real is decided by the verdict's "
                "intervals and thresholds above, not by the plots.")]
    b += [("h", 3, "Evaluation points (from each run's metrics.jsonl)"), ("table", *curve_table(summary, metrics)),
          ("p", "The train sample is the trainer's fixed sample of training examples (`eval_train_sample`, the same "
                "for every run); the final results above take the train output loss from its last evaluation "
                "(or, with `--loss-samples N|all`, score N or all training examples with the final model). The "
                "validation loss selects the best checkpoint; held-out = the test part."),
          ("h", 3, "Training (from each run's metrics.jsonl)"), ("table", *training_table(summary, metrics))]
    b += [("h", 2, "Data"), ("code", "text", format_one(data["stats"], data["source"]))]
    b += [("h", 2, "Versions"), ("p", versions_line(summary.versions))]
    b += [("h", 2, "Commands")]
    b += [("code", "bash", "\n".join(f"# {c['time']} in {c['cwd']}\n" + " ".join(shlex.quote(x) for x in c["argv"])
                                     for c in summary.commands))]
    b += [("h", 2, "Configs"), ("p", "Each run's `config.yaml` is the base config below with these changes:"),
          ("table", *config_diff(summary, configs), "text"),
          ("h", 3, "Base config (shared by every run; loss settings and seed are per run, above)"),
          ("code", "yaml", _base_yaml(summary))]
    b += [("h", 2, "What this can and cannot show"), ("p", CAN_CANNOT)]
    return b


def next_blocks(steps: list[dict], cwd: str | None) -> list[tuple]:
    """"To decide": each step that would make an undecided or tied result decide, with its command
    (report_checks.next_commands; the compare page and the sweep page); [] when there are none."""
    if not steps:
        return []
    b: list[tuple] = [("h", 3, "To decide"),
                      ("p", "This result does not decide. Each of these would help; each command is the one that "
                            "ran it with one setting changed, and a new --out where it trains new runs"
                            + (f" (run them in `{cwd}`)" if cwd else "") + ":")]
    for step in steps:
        b.append(("p", step["why"][0].upper() + step["why"][1:] + "."))
        if step.get("command"):
            b.append(("code", "bash", step["command"]))
    return b


def text_table(summary: CompareResult) -> str:
    """The results table for a terminal."""
    header, rows = results_table(summary)
    width = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, width)))  # noqa
    return "\n".join([line(header), line(["-" * w for w in width]), *map(line, rows)])
