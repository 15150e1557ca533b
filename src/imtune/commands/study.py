"""`imtune study --factor ratio|n --values V1,V2,... [--family F | --data FILE] --arms it,im --seeds 0,1
--model M [train flags] --out DIR [--budget STEPS]`: the IM paper's two factors, measured (imtune.experiments.study):
one comparison per value, the second arm minus the first (IM − IT) against the factor with intervals and a trend.
`imtune study --report-only DIR` rebuilds the report."""
from __future__ import annotations

import sys
from pathlib import Path

from imtune.commands.common import CommaList, add_grid_args, add_jobs_arg, ray_plan
from imtune.console import say


def add_arguments(p) -> None:
    from imtune.config import add_train_arguments

    add_train_arguments(p)
    g = p.add_argument_group("study")
    g.add_argument("--factor", choices=["ratio", "n"], default=None,
                   help="ratio: the instruction/output ratio of synthetic data (--family); n: nested subsets of the "
                        "training data (--data FILE or --family F)")
    g.add_argument("--values", action=CommaList, default=None, metavar="V1,V2,...",
                   help="the factor's values, e.g. 2,8,32 (not with --factor ratio --data: the strata are measured)")
    g.add_argument("--strata", type=int, default=None, metavar="K",
                   help="--factor ratio --data FILE: cut the data into K equal-size bins by each example's "
                        "instruction/output ratio (default 3); each bin gives --heldout held-out and --n training "
                        "examples")
    g.add_argument("--family", default=None, metavar="F",
                   help="synthetic family (imtune data synth): rule, lookup, ...")
    g.add_argument("--n", type=int, default=64,
                   help="--factor ratio: training examples per value (synthetic) or per stratum (--data)")
    g.add_argument("--heldout", type=int, default=32, metavar="H",
                   help="held-out examples: synthetic, or per stratum with --factor ratio --data")
    g.add_argument("--ratio", type=float, default=None,
                   help="--factor n with --family: the ratio of the synthetic data (default: the family's)")
    g.add_argument("--arms", action=CommaList, default="it,im",
                   help="two arms; the study reports the second minus the first")
    g.add_argument("--seeds", action=CommaList, default=None, metavar="S1,S2,...", help="seeds per arm and value")
    g.add_argument("--budget", type=int, default=None, metavar="STEPS", help="at most STEPS optimizer steps per run")
    g.add_argument("--out", default=None, metavar="DIR", help="study directory (default: runs/study-<factor>)")
    g.add_argument("--val-fraction", type=float, default=0.3,
                   help="share of the held-out data that selects best checkpoints")
    g.add_argument("--heldout-fraction", type=float, default=0.1,
                   help="--factor n with --data and no --eval-data: the share held out (once, before subsetting)")
    add_jobs_arg(g)
    add_grid_args(g, "the whole study (every value's comparison, and their sum)")
    g.add_argument("--device", default="auto", help="device for the evaluation: auto (cuda if any), cpu, ...")
    g.add_argument("--report-only", default=None, metavar="DIR", help="only rebuild report.md/report.html of DIR")


def settings_from(args):
    from imtune.commands.compare import parse_seeds
    from imtune.config import TrainConfig
    from imtune.experiments.study import StudySettings, parse_values
    from imtune.types import UsageError

    for flag, dest in (("--loss", "loss"), ("--prompt-weight", "prompt_weight"), ("--output-dir", "output_dir")):
        if hasattr(args, dest):
            raise UsageError(f"{flag} is set per arm in a study: use --arms (and --out DIR)")
    given = getattr(args, "data", None)
    stratified = args.factor == "ratio" and bool(given)
    if stratified and args.values is not None:
        raise UsageError("--factor ratio --data FILE measures its values: give --strata K (equal-size bins of the "
                         "examples' own ratios), not --values")
    if args.strata is not None and not stratified:
        raise UsageError("--strata K is for --factor ratio --data FILE")
    if args.strata is not None and args.strata < 2:
        raise UsageError(f"--strata must be >= 2, not {args.strata}")
    if args.factor is None or (args.values is None and not stratified):
        raise UsageError("give --factor ratio|n and --values V1,V2,... (e.g. --factor ratio --values 2,8,32 "
                         "--family rule), or --factor ratio --data FILE --strata K")
    if min(args.n, args.heldout) < 1:
        raise UsageError("--n and --heldout must be >= 1")
    if args.budget is not None and args.budget < 1:
        raise UsageError(f"--budget must be >= 1, not {args.budget}")
    if args.family and given:
        raise UsageError("give --family F or --data FILE, not both")
    if not (args.family or given):
        need = ("--family F (it varies `imtune data synth --ratio`) or --data FILE (--strata K)"
                if args.factor == "ratio" else "--data FILE or --family F")
        raise UsageError(f"--factor {args.factor} needs {need}")
    base = TrainConfig.from_args(args)
    if args.family:
        base = base.replace(data="synthetic")  # a placeholder: every value trains on its own written files
    return StudySettings(out=Path(args.out) if args.out else Path("runs") / f"study-{args.factor}",
                         base=base, factor=args.factor,
                         values=[] if stratified else parse_values(args.factor, args.values),
                         arms=args.arms, seeds=parse_seeds(args.seeds), family=args.family, n=args.n,
                         heldout=args.heldout, ratio=args.ratio, budget=args.budget, val_fraction=args.val_fraction,
                         heldout_fraction=args.heldout_fraction, device=args.device, jobs=args.jobs, ray=ray_plan(args),
                         strata=(args.strata or 3) if stratified else None, keep=args.keep, dry_run=args.dry_run,
                         argv=getattr(args, "_argv", None) or list(sys.argv))


def show(out: Path) -> None:
    from imtune.experiments.study import iv_text, read_study

    result = read_study(out)
    print(f"{result.difference} of held-out output loss against {result.factor} (95% intervals):")
    for r in result.rows:
        parts = [f"{k} {iv_text(e)}" for k, e in (("final", r.final), ("best", r.best)) if e is not None]
        st = r.stratum
        where = (f" (stratum {st['stratum']} of {st['of']}: example ratios {st['ratio_low']:.3g} to "
                 f"{st['ratio_high']:.3g})" if st else "")
        print(f"  {result.factor} = {r.value:<8.4g}{where} " + ", ".join(parts))
    for name, t in result.trend.items():
        print(f"trend ({name}): {t['intercept']:+.4f} {t['slope']:+.4f}·log10({result.factor})")
    print(f"report: {out / 'report.md'}  (self-contained HTML: {out / 'report.html'})")


def run(args) -> int:
    from imtune.experiments.compare import is_main_process
    from imtune.experiments.study import study, write_report

    if args.report_only:
        md, page = write_report(args.report_only)
        say(f"wrote {md} and {page}")
        show(Path(args.report_only))
        return 0
    s = settings_from(args)
    out = study(s)
    if is_main_process() and not s.dry_run:
        show(out)
    return 0
