"""`study(settings) -> STUDY_DIR`: the IM paper's two factors, measured. For each value of one factor, an
imtune.experiments.compare of the arms (default it,im) over the seeds; then the difference (second arm − first, e.g. IM
− IT) of the held-out output loss, final and best, against the factor, with 95% intervals and a fitted trend.

    --factor ratio   the instruction/output length ratio: of `imtune data synth --family F` (imtune.data.synth), one
                     synthetic data set per value (same n, same seed, held-out made alike); or of a real data set
                     (--data FILE --strata K): its examples sorted by their own instruction/output ratio in words (the
                     paper's convention) and cut into K equal-size quantile bins; each bin gives --heldout held-out
                     and --n training examples of its own, and its value is the ratio measured on its training part
    --factor n       nested training subsets of --data FILE (or of synthetic data): the first n of one seeded
                     permutation, so every smaller set is inside every larger one; the held-out data is the same for
                     all (--eval-data, or a seeded split made once, before subsetting)

    STUDY_DIR/
      data/                       the data of every value (written once; a re-run checks it is the same)
      runs/<factor>-<value>/      one comparison directory per value (imtune.experiments.compare: arms x seeds, report)
      study.json                  per value: the differences with intervals, per-seed values, data sizes; the trend
      plots/study.png, report.md, report.html

The trend: a weighted least-squares line of the difference against log10(value), weights 1/SE with SE = interval
width / 3.92 (imtune.analysis.evidence.linear_trend); the paper's Fig. 2 shape is a difference that grows in IM's
favour with
the ratio and shrinks with n. --budget caps every run's optimizer steps, so values differ only in data. Re-running the
same command resumes: finished runs are skipped.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from imtune import files
from imtune.analysis.evidence import linear_trend
from imtune.analysis.stats import measure
from imtune.config import TrainConfig
from imtune.console import is_main_process, say
from imtune.data.prepare import load
from imtune.data.synth import synthesize
from imtune.experiments.arms import CompareSettings, parse_arms
from imtune.experiments.compare import check_settings, compare, nothing_trained as none_in
from imtune.experiments.data import write_conversations
from imtune.report.runs import read_record, read_summary
from imtune.report.write import to_html, to_markdown
from imtune.results import CompareResult, Estimate, StudyResult, StudyRow
from imtune.train.cost import grid_text
from imtune.types import Interrupted, UsageError

FACTORS = ("ratio", "n")


@dataclass
class StudySettings:
    out: Path
    base: TrainConfig  # every training flag (data/eval_data: the source for --factor n)
    factor: str
    values: list[float]
    arms: str = "it,im"
    seeds: list[int] | None = None
    family: str | None = None  # synthetic family (ratio: required; n: when no --data)
    n: int = 64  # ratio: training examples per value; n with a family: the pool the subsets come from (max value)
    heldout: int = 32  # synthetic held-out examples
    ratio: float | None = None  # n with a family: its ratio (None: the family's default)
    budget: int | None = None  # at most this many optimizer steps per run
    val_fraction: float = 0.3
    heldout_fraction: float = 0.1
    device: str = "auto"
    jobs: int = 1  # runs trained side by side (imtune.experiments.jobs)
    ray: object = None  # imtune.experiments.ray_jobs.RayPlan: the grid on a Ray cluster
    strata: int | None = None  # ratio with --data: equal-size quantile bins of the per-example ratio
    keep: str = "both"  # which models of each run stay on disk after its evaluation (imtune.experiments.arms.KEEP)
    dry_run: bool = False  # print the plan of every value's comparison and their sum (imtune.train.cost), train nothing
    argv: list[str] = field(default_factory=lambda: list(sys.argv))


def parse_values(factor: str, text: str) -> list[float]:
    if factor not in FACTORS:
        raise UsageError(f"--factor {factor!r}: valid: {', '.join(FACTORS)}")
    try:
        vals = sorted({float(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise UsageError(f"--values {text!r}: give numbers separated by commas, e.g. 2,8,32") from None
    if len(vals) < 2 or any(not (math.isfinite(v) and v > 0) for v in vals):
        raise UsageError(f"--values {text!r}: give at least two different numbers > 0")
    if factor == "n" and any(v != int(v) for v in vals):
        raise UsageError(f"--values {text!r}: --factor n takes whole numbers of examples")
    return vals


def _name(v: float) -> str:
    return f"{v:g}"


def datasets(s: StudySettings) -> list[tuple[float, str, str | None, dict]]:
    """(value, training file, held-out file or None, what else study.json keeps of the value) per value, written
    under STUDY_DIR/data/."""
    import numpy as np

    out = []
    if s.factor == "ratio" and s.family:
        for v in s.values:
            train, held = synthesize(s.family, s.n, v, seed=0, heldout=s.heldout)
            out.append((v, _write(s, f"ratio-{_name(v)}.train.jsonl", train),
                        _write(s, f"ratio-{_name(v)}.heldout.jsonl", held), {}))
        return out
    if s.factor == "ratio" and s.base.data:
        return strata(s)
    if s.factor == "ratio":
        raise UsageError("--factor ratio needs --family F (rule, lookup, reverse: it varies `imtune data synth "
                         "--ratio`) or --data FILE (--strata K bins of the data's own ratios)")
    need = int(max(s.values))
    b = s.base
    if s.family:
        pool, held = synthesize(s.family, need, s.ratio, seed=0, heldout=s.heldout)
    elif b.data:
        pool, held = _load(b)
        if held is None:  # split the held-out part off once, before any subset
            k = max(1, round(s.heldout_fraction * len(pool)))
            pick = set(np.random.default_rng([b.seed, 1717]).permutation(len(pool))[:k].tolist())
            held = [c for i, c in enumerate(pool) if i in pick]
            pool = [c for i, c in enumerate(pool) if i not in pick]
    else:
        raise UsageError("--factor n needs --data FILE or --family F")
    if len(pool) < need:
        raise UsageError(f"--values asks for {need} training examples; the data has {len(pool)}")
    order = np.random.default_rng([b.seed, 4242]).permutation(len(pool)).tolist()  # one order: nested subsets
    heldout = _write(s, "heldout.jsonl", held)
    for v in s.values:
        out.append((v, _write(s, f"n-{_name(v)}.train.jsonl", [pool[i] for i in order[:int(v)]]), heldout, {}))
    return out


def _write(s: StudySettings, name: str, convs: list) -> str:
    """STUDY_DIR/data/NAME in the `messages` format (imtune.experiments.data.write_conversations)."""
    return str(write_conversations(Path(s.out) / "data" / name, convs, Path(s.out)))


def _load(b: TrainConfig) -> tuple[list, list | None]:
    """The --data pool and the --eval-data conversations (None without --eval-data), read as training reads them."""
    pool, _ = load(b.data, b.format, b.fields, b.on_invalid, b.limit, roles=b.roles)
    held = load(b.eval_data, b.format, b.fields, b.on_invalid, roles=b.roles)[0] if b.eval_data else None
    return pool, held


def strata(s: StudySettings) -> list[tuple[float, str, str, dict]]:
    """The paper's first factor on real data: every example's instruction/output ratio in words (imtune.analysis.stats,
    `"<|role|>\\n" + content`), sorted and cut into s.strata equal-size bins; from each bin (one seeded permutation)
    the first s.heldout examples are its held-out data and the next s.n its training data. A bin's value is the ratio
    of its training part (mean instruction words / mean output words, as `data stats` measures a file)."""
    import numpy as np

    k = s.strata or 3
    if s.base.eval_data:
        raise UsageError("--factor ratio --data takes its held-out examples from each stratum: leave out --eval-data")
    pool, _ = _load(s.base)
    if len(pool) < k * (s.heldout + 2):
        raise UsageError(f"--strata {k}: the data has {len(pool)} examples, too few for {k} bins of --heldout "
                         f"{s.heldout} held-out and some training examples each")
    lengths = measure(pool, unit="words")
    ins, outs = lengths.instruction.astype(float), lengths.output.astype(float)
    per = ins / np.maximum(outs, 1.0)  # an empty output counts as one word: its ratio stays finite
    bins = np.array_split(np.argsort(per, kind="stable"), k)
    rng = np.random.default_rng([s.base.seed, 2323])
    out, values = [], []
    for i, idx in enumerate(bins, 1):
        perm = idx[rng.permutation(len(idx))]
        held, train = perm[:s.heldout], perm[s.heldout:s.heldout + s.n]
        value = float(ins[train].sum() / max(outs[train].sum(), 1.0))
        if values and value <= values[-1]:
            raise UsageError(f"--strata {k}: bins {i - 1} and {i} have the same ratio ({value:.4g}); ask for fewer")
        values.append(value)
        info = {"stratum": i, "of": k, "ratio_low": float(per[idx].min()), "ratio_high": float(per[idx].max()),
                "pool": len(idx), "ratio_words": value}
        name = f"stratum-{i}"
        out.append((value, _write(s, f"{name}.train.jsonl", [pool[j] for j in train]),
                    _write(s, f"{name}.heldout.jsonl", [pool[j] for j in held]), info))
    short = [f"{i}: {len(idx) - s.heldout}" for i, idx in enumerate(bins, 1) if len(idx) - s.heldout < s.n]
    if short:
        say(f"study: --n {s.n} asks more training examples than some strata hold (stratum: examples): "
            f"{', '.join(short)}; those train on all they have")
    return out


def study(s: StudySettings) -> Path:
    """Every argument is checked before anything is written; STUDY_DIR is claimed (imtune.files) and removed again
    when the study fails before writing into it."""
    arms = parse_arms(s.arms)
    if len(arms) != 2:
        raise UsageError(f"--arms {s.arms!r}: a study compares exactly two arms (the second minus the first)")
    check_settings(CompareSettings(out=Path(s.out), base=s.base, arms=arms, seeds=s.seeds, val_fraction=s.val_fraction,
                                   heldout_fraction=s.heldout_fraction, jobs=s.jobs, keep=s.keep))
    files.check_claim(s.out, "study")
    with files.protecting(s.base.data, s.base.eval_data), files.claiming(s.out, "study", unused=nothing_trained):
        return run_study(s, arms)


def nothing_trained(out: Path) -> bool:
    """No comparison of the study began training (imtune.experiments.compare.nothing_trained): its data is remade in
    seconds."""
    return not (Path(out) / "study.json").exists() and all(none_in(d) for d in Path(out).glob("runs/*"))


def run_study(s: StudySettings, arms: list) -> Path:
    out = Path(s.out)
    rows, plans = [], []
    sets = datasets(s)
    for i, (v, train, held, info) in enumerate(sets, 1):
        say(f"study: {s.factor} = {_name(v)} ({i}/{len(sets)})"
            + (f", stratum {info['stratum']} of {info['of']} (per-example ratios {info['ratio_low']:.3g} to "
               f"{info['ratio_high']:.3g})" if info else ""))
        base = s.base.replace(data=train, eval_data=held, format="messages", fields={}, limit=None)
        cs = CompareSettings(out=out / "runs" / f"{s.factor}-{_name(v)}", base=base, arms=arms, seeds=s.seeds,
                             val_fraction=s.val_fraction, heldout_fraction=s.heldout_fraction, bleu_samples=0,
                             max_steps_cap=s.budget, device=s.device, jobs=s.jobs, ray=s.ray, argv=s.argv,
                             keep=s.keep, dry_run=s.dry_run)
        try:
            cmp = compare(cs)
        except Interrupted as e:  # Ctrl-C: the values before this one are kept whole
            raise Interrupted([f"study: {i - 1} of {len(sets)} values compared; stopped at {s.factor} = {_name(v)}",
                               *e.lines]) from None
        if s.dry_run:
            plans += [cs.planned] if cs.planned is not None else []
            continue
        if not is_main_process():  # under accelerate launch: every process trains, rank 0 alone reports
            continue
        rows.append(value_row(v, read_summary(cmp), cmp.relative_to(out), arms[1].spec, info))
        measured = rows[-1].ratio_measured
        if s.family and s.factor == "ratio" and measured and abs(measured / v - 1) > 0.5:
            say(f"study: ratio {_name(v)} asked, {measured:.1f} measured (tokens): family "
                f"{s.family} cannot make instructions that short or long; the report shows the measured ratio")
    if s.dry_run:
        if plans:
            say(grid_text(plans, f"study plan ({len(sets)} values of {s.factor})"))
        say(f"--dry-run: nothing trained (the data of every value is written under {out / 'data'})")
        return out
    if not is_main_process():
        return out
    result = StudyResult(1, s.factor, [v for v, *_ in sets], [a.spec for a in arms], f"{arms[1].spec} − {arms[0].spec}",
                         s.seeds, s.family, None if s.family else s.base.data,
                         s.strata if s.factor == "ratio" and not s.family else None, s.budget, tuple(rows),
                         trends(rows, s.factor))
    files.write_json(out / "study.json", result.to_json(), root=out)
    write_report(out)
    return out


def value_row(v: float, summary: CompareResult, where: Path, arm: str, stratum: dict | None = None) -> StudyRow:
    ms = summary.evidence.measures
    est = {}
    for key, name in (("heldout_loss", "final"), ("best_heldout_loss", "best")):
        if key in ms:
            ref, d = ms[key].per_seed[summary.evidence.reference], ms[key].differences[arm]
            est[name] = Estimate(d.value, d.low, d.high, [a - b for a, b in zip(ms[key].per_seed[arm], ref)])
    return StudyRow(v, str(where), summary.data["n_train"], summary.data["n_test"],
                    summary.data["stats"].get("ratio"),  # mean instruction / mean output, tokens
                    summary.data["steps"], est.get("final"), est.get("best"), stratum or None)


def trends(rows: list[StudyRow], factor: str) -> dict:
    out = {}
    for name in ("final", "best"):
        pts = [(r.value, getattr(r, name)) for r in rows if getattr(r, name) is not None]
        if len(pts) >= 2:
            out[name] = linear_trend([x for x, _ in pts], [p.value for _, p in pts],
                                     [(p.high - p.low) / 3.92 for _, p in pts], log_x=True)
    return out


def plot(result: StudyResult, path: Path, root: Path) -> Path:
    import numpy as np
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.subplots()
    xs_all = [r.value for r in result.rows]
    for i, (name, label) in enumerate((("final", "final models"), ("best", "best checkpoints (validation)"))):
        pts = [(r.value, getattr(r, name)) for r in result.rows if getattr(r, name) is not None]
        if not pts:
            continue
        shift = 1.0 + 0.03 * i  # side by side on the log axis
        ax.errorbar([x * shift for x, _ in pts], [p.value for _, p in pts],
                    yerr=[[p.value - p.low for _, p in pts], [p.high - p.value for _, p in pts]],
                    fmt="o", capsize=4, color=f"C{i}", label=label)
        t = result.trend.get(name)
        if t:
            grid = np.geomspace(min(xs_all), max(xs_all), 50)
            ax.plot(grid, t["intercept"] + t["slope"] * np.log10(grid), color=f"C{i}", ls="--", lw=1,
                    label=f"trend ({name}): {t['slope']:+.4f} per decade")
    ax.axhline(0, color="k", lw=0.7)
    ax.set_xscale("log")
    ax.set(xlabel={"ratio": "instruction/output length ratio", "n": "training examples"}[result.factor],
           ylabel=f"held-out output loss: {result.difference} (nats)")
    ax.set_title("below zero: the second arm has the lower held-out loss; 95% intervals", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return files.save_figure(fig, path, root)


def iv_text(p: Estimate | None) -> str:
    return "–" if p is None else f"{p.value:+.4f} [{p.low:+.4f}, {p.high:+.4f}]"


def value_text(r: StudyRow) -> str:
    if r.stratum is None:
        return f"{r.value:g}"
    st = r.stratum
    return (f"{r.value:.3g} (stratum {st['stratum']} of {st['of']}: examples with ratios {st['ratio_low']:.3g} to "
            f"{st['ratio_high']:.3g})")


def read_study(study_dir: str | Path) -> StudyResult:
    return read_record(Path(study_dir) / "study.json", StudyResult)


def write_report(study_dir: str | Path) -> tuple[Path, Path]:
    d = files.owned(study_dir, "study")
    result = read_study(d)
    png = plot(result, d / "plots" / "study.png", d)
    diff = result.difference
    header = [result.factor, "training examples", "test examples", "steps", "measured ratio (tokens)",
              f"{diff}, final [95% interval]", f"{diff}, best [95% interval]", "run"]
    rows = [[value_text(r), str(r.n_train), str(r.n_test), str(r.steps),
             "–" if r.ratio_measured is None else f"{r.ratio_measured:.2f}", iv_text(r.final),
             iv_text(r.best), f"`{r.compare_dir}/report.md`"] for r in result.rows]
    said = []
    for name, t in result.trend.items():
        said.append(f"{name}: {diff} ≈ {t['intercept']:+.4f} {t['slope']:+.4f}·log10({result.factor})")
    blocks = [("h", 1, f"imtune study: {diff} against {result.factor}"),
              ("p", f"Arms {', '.join(result.arms)}; seeds {result.seeds or 'the one --seed'}"
                    + (f"; synthetic family `{result.family}`" if result.family else "")
                    + (f"; data `{result.data}` cut into {result.strata} equal-size strata by each example's "
                       "instruction/output ratio in words, each with its own held-out examples"
                       if result.strata else "")
                    + (f"; at most {result.budget} optimizer steps per run" if result.budget else "") + "."),
              ("table", header, rows), ("img", png, f"{diff} against {result.factor}"),
              ("p", "Trend (weighted least squares on log10 of the factor, weights 1/SE): "
                    + ("; ".join(said) or "too few points") + ". A difference below zero means the second arm "
                    "reached the lower held-out output loss. Intervals: hierarchical paired bootstrap over seeds "
                    "and held-out examples (imtune.analysis.evidence); a value's difference counts only when "
                    "its interval "
                    "excludes zero.")]
    md, page = d / "report.md", d / "report.html"
    files.write_text(md, to_markdown(blocks, d), d)
    files.write_text(page, to_html(blocks, blocks[0][2]), d)
    return md, page
