"""`sweep(settings) -> SWEEP_DIR`: the prompt-loss weight finder. One `weighted:λ` arm per λ and seed, trained and
scored by imtune.experiments.compare (same data, budget, seeds, validation/test split), then summarized per λ.

    SWEEP_DIR/
      compare/            the comparison of the λ arms (run directories, compare.json, its own report)
      sweep.json          per λ: held-out output loss of the final models and of the best checkpoints (mean over
                          seeds, 95% interval over seeds and held-out examples, per seed), the paired difference to
                          the recommended λ, and "recommendation": {"prompt_weight", "interval", "rule", ...}
      plots/sweep.png, report.md, report.html

The rule (RULE): the λ with the lowest mean held-out output loss at the best checkpoint (selected on the validation
part, as an early stop would; the final model's loss when there is no validation part) is recommended only when it is
distinguishable from every other λ (each paired interval of the difference to it excludes zero). Otherwise the sweep
says which λs tie with it and what would separate them, and recommends none. Re-running the same command skips
finished runs (compare's resumption).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from imtune import files
from imtune.config import TrainConfig
from imtune.console import is_main_process
from imtune.experiments.aggregate import aggregate
from imtune.experiments.arms import CompareSettings, parse_arm, read_json
from imtune.experiments.compare import check_settings, compare
from imtune.report.checks import PRACTICAL, next_commands
from imtune.report.page import next_blocks
from imtune.report.runs import read_record, read_summary
from imtune.report.write import to_html, to_markdown
from imtune.results import Estimate, Evidence, Interval, Recommendation, SweepResult, SweepRow
from imtune.types import UsageError

RULE = ("lowest mean held-out output loss at the best checkpoint (selected on the validation part; the final model "
        "without one), recommended only when every other λ's paired 95% interval of the difference to it excludes "
        "zero and the difference is at least 2% of its loss; otherwise the λs tie and none is recommended")


@dataclass
class SweepSettings:
    out: Path
    base: TrainConfig  # every training flag; loss and prompt_weight are set per λ
    prompt_weights: list[str]  # as typed, e.g. ["0", "0.01", "0.1", "1"]
    seeds: list[int] | None = None
    val_fraction: float = 0.3
    val_data: str | None = None
    heldout_fraction: float = 0.1
    loss_samples: int | str | None = None  # CompareSettings.loss_samples
    device: str = "auto"
    jobs: int = 1  # runs trained side by side (imtune.experiments.jobs)
    ray: object = None  # imtune.experiments.ray_jobs.RayPlan: the grid on a Ray cluster
    keep: str = "both"  # which models of each run stay on disk after its evaluation (imtune.experiments.arms.KEEP)
    dry_run: bool = False  # print the plan of the whole grid (imtune.train.cost), train nothing
    argv: list[str] = field(default_factory=lambda: list(sys.argv))


def parse_weights(text: str) -> list[str]:
    vals = [t.strip() for t in text.split(",") if t.strip()]
    for v in vals:
        parse_arm(f"weighted:{v}")  # raises for a bad λ
    if len(vals) < 2 or len({float(v) for v in vals}) < len(vals):
        raise UsageError(f"--prompt-weights {text!r}: give at least two different λ >= 0, e.g. 0,0.01,0.1,1")
    return sorted(vals, key=float)


def sweep(s: SweepSettings) -> Path:
    out = Path(s.out)
    arms = [parse_arm(f"weighted:{v}") for v in s.prompt_weights]
    check_settings(CompareSettings(out=out / "compare", base=s.base, arms=arms, seeds=s.seeds,
                                   val_fraction=s.val_fraction, heldout_fraction=s.heldout_fraction, jobs=s.jobs,
                                   keep=s.keep))
    with files.claiming(out, "sweep"):  # checked first: a refused sweep leaves nothing behind
        cmp = compare(CompareSettings(out=out / "compare", base=s.base, arms=arms, seeds=s.seeds,
                                      val_fraction=s.val_fraction, val_data=s.val_data,
                                      heldout_fraction=s.heldout_fraction, loss_samples=s.loss_samples,
                                      bleu_samples=0, device=s.device, jobs=s.jobs, ray=s.ray, argv=s.argv,
                                      keep=s.keep, dry_run=s.dry_run))
    if s.dry_run or not is_main_process():  # a plan only; under accelerate launch: rank 0 alone reports
        return out
    summary = read_summary(cmp)
    measures = summary.evidence.measures
    measure = "best_heldout_loss" if "best_heldout_loss" in measures else "heldout_loss"
    values = measures[measure].values
    chosen = min(arms, key=lambda a: values[a.spec].value)
    # Paired differences to the chosen λ: the evidence again, with the chosen arm as the reference (each run's
    # per-example losses, which compare.json leaves out, from the run's own evaluation).
    runs = [{"spec": a.spec, "name": a.name, "runs": [
        {"seed": r.seed, "dir": r.dir,
         "results": read_json(files.inside(cmp, r.dir) / "eval" / "compare.json")["results"]}
        for r in summary.arm(a.name).runs]} for a in arms]
    vs_chosen = Evidence.from_json(aggregate(runs, chosen.name)).measures
    rows = []
    for a in arms:
        est = {}
        for key, name in (("heldout_loss", "final"), ("best_heldout_loss", "best")):
            m = measures.get(key)
            if m:
                v = m.values[a.spec]
                est[name] = Estimate(v.value, v.low, v.high, m.per_seed[a.spec], vs_chosen[key].differences[a.spec])
        best = summary.arm(a.name).results.best
        rows.append(SweepRow(float(a.overrides["prompt_weight"]), a.spec, est.get("final"), est.get("best"),
                             best.steps if best else None))
    key = "best" if measure == "best_heldout_loss" else "final"
    floor = PRACTICAL * abs(values[chosen.spec].value)  # smaller differences are not worth choosing on
    tied = [r.prompt_weight for r in rows if r.arm != chosen.spec
            and (not getattr(r, key).difference_to_recommended.excludes_zero()
                 or abs(getattr(r, key).difference_to_recommended.value) < floor)]
    n_seeds = len(summary.settings["seeds"] or [1])
    rec = Recommendation(
        float(chosen.overrides["prompt_weight"]), f"held-out output loss ({key})", values[chosen.spec].value,
        [values[chosen.spec].low, values[chosen.spec].high], tied, not tied, RULE,
        None if not tied else (f"more seeds (--seeds with {max(3, 2 * n_seeds)} or more), more held-out examples "
                               "(--eval-data), or a longer budget (--epochs) where every run was still improving"),
        # the same as commands, from this sweep's own command line (report_checks.next_commands)
        [] if not tied else [{"why": why, "command": cmd} for why, cmd in next_commands(
            summary, ["tie", *(summary.verdict.undecided if summary.verdict else [])], out=str(out))])
    data = {k: summary.data[k] for k in ("source", "n_train", "n_val", "n_test")}
    result = SweepResult(1, "compare", s.base.normalize, s.base.weights, summary.settings["seeds"],
                         summary.evidence.method, data, tuple(rows), rec, summary.cwd)  # cwd: where next runs
    files.write_json(out / "sweep.json", result.to_json(), root=out)
    write_report(out)
    return out


def plot(result: SweepResult, path: Path, root: Path) -> Path:
    """The paired difference of each λ's held-out output loss to the lowest λ's (what decides), final and best, with
    95% intervals; one tick per λ, evenly spaced (λ = 0 included), the two measures side by side."""
    from matplotlib.figure import Figure

    rows = result.prompt_weights
    rec = result.recommendation
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.subplots()
    for i, (key, label) in enumerate((("final", "final models"), ("best", "best checkpoints (validation)"))):
        pts = [(j, getattr(r, key).difference_to_recommended) for j, r in enumerate(rows) if getattr(r, key)]
        if not pts:
            continue
        err = [[p.value - p.low for _, p in pts], [p.high - p.value for _, p in pts]]
        ax.errorbar([j + (i - 0.5) * 0.15 for j, _ in pts], [p.value for _, p in pts], yerr=err, fmt="o",
                    capsize=4, color=f"C{i}", label=label)
    ax.set_xticks(range(len(rows)), [f"{r.prompt_weight:g}" for r in rows])
    ax.axhline(0, color="k", lw=0.7)
    verdict = (f"λ = {rec.prompt_weight:g} lowest and distinguishable from the rest" if rec.decided
               else f"λ = {rec.prompt_weight:g} lowest, tied with " + ", ".join(f"{x:g}" for x in
                                                                          rec.indistinguishable))
    ax.set(xlabel="prompt-loss weight λ", ylabel=f"held-out output loss − λ = {rec.prompt_weight:g}'s (nats)")
    ax.set_title(f"paired differences to the lowest λ, 95% intervals, seeds {result.seeds}\n{verdict}",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return files.save_figure(fig, path, root)


def recommendation_text(rec: Recommendation, bold: bool = False) -> str:
    """The recommendation in words: a λ only when it is distinguishable from every other, else the tie."""
    lam = f"λ = {rec.prompt_weight:g}"
    found = f"{rec.measure} {rec.value:.4f} (95% interval {rec.interval[0]:.4f} to {rec.interval[1]:.4f})"
    if rec.decided:
        return (f"Recommended: {'**' + lam + '**' if bold else lam}, {found}; every other λ's paired interval to it "
                f"excludes zero. Rule: {rec.rule}.")
    tied = ", ".join(f"{x:g}" for x in rec.indistinguishable)
    return (f"No λ recommended: {lam} has the lowest {found}, but it ties with λ = {tied} (their paired intervals to "
            f"it include zero). To separate them: {rec.to_decide or 'more seeds or held-out examples'}. "
            f"Rule: {rec.rule}.")


def _iv(p: Interval | Estimate | None) -> str:
    return "–" if p is None else f"{p.value:.4f} [{p.low:.4f}, {p.high:.4f}]"


def read_sweep(sweep_dir: str | Path) -> SweepResult:
    return read_record(Path(sweep_dir) / "sweep.json", SweepResult)


def write_report(sweep_dir: str | Path) -> tuple[Path, Path]:
    d = files.owned(sweep_dir, "sweep")
    result = read_sweep(d)
    png = plot(result, d / "plots" / "sweep.png", d)
    rec = result.recommendation
    header = ["λ", "held-out output loss, final [95% interval]", "held-out output loss, best [95% interval]",
              "best steps", "difference to recommended λ (best) [95% interval]"]
    rows = [[f"{r.prompt_weight:g}", _iv(r.final), _iv(r.best), ", ".join(map(str, r.best_steps or [])) or "–",
             _iv((r.best or r.final).difference_to_recommended if (r.best or r.final) else None)]
            for r in result.prompt_weights]
    data = result.data
    blocks = [("h", 1, "imtune sweep: prompt-loss weight λ"),
              ("p", f"Data `{data['source']}`: {data['n_train']} training examples, {data['n_val']} validation "
                    f"(selects best checkpoints), {data['n_test']} test (every score); seeds {result.seeds}; "
                    f"loss normalisation `{result.normalize}`"
                    + (f", class weights `{result.weights}`" if result.weights else "") + "."),
              ("h", 2, "Recommendation"),
              ("p", recommendation_text(rec, bold=True)),
              ("table", header, rows), ("img", png, "held-out output loss against λ"),
              ("p", f"Intervals: {result.method}. The λ arms' runs, curves and full comparison: "
                    f"`{result.compare_dir}/report.md`.")]
    blocks += next_blocks(rec.next, result.cwd)
    md, page = d / "report.md", d / "report.html"
    files.write_text(md, to_markdown(blocks, d), d)
    files.write_text(page, to_html(blocks, blocks[0][2]), d)
    return md, page
