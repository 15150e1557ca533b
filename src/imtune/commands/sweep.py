"""`imtune sweep --data F [--eval-data G] --prompt-weights 0,0.01,0.1,0.5,1 --seeds 0,1 [--normalize nonzero]
[--weights assistant=0.6,eot=0.6] [train flags] --out DIR`: one `weighted:λ` arm per λ and seed under one budget
(imtune.experiments.sweep, through imtune.experiments.compare), then sweep.json and a report with the recommended λ.
`imtune sweep --report-only DIR` rebuilds the report."""
from __future__ import annotations

import sys
from pathlib import Path

from imtune.commands.common import CommaList, add_grid_args, add_jobs_arg, add_loss_samples_arg, ray_plan
from imtune.console import say


def add_arguments(p) -> None:
    from imtune.config import add_train_arguments

    add_train_arguments(p)
    g = p.add_argument_group("sweep")
    g.add_argument("--prompt-weights", action=CommaList, default="0,0.01,0.1,0.5,1", metavar="L1,L2,...",
                   help="the prompt-loss weights λ to try (instruction tokens weigh λ, output tokens 1)")
    g.add_argument("--seeds", action=CommaList, default=None, metavar="S1,S2,...",
                   help="seeds per λ (default: the one --seed)")
    g.add_argument("--out", default=None, metavar="DIR", help="sweep directory (default: runs/sweep-<data>)")
    g.add_argument("--val-fraction", type=float, default=0.3,
                   help="share of the held-out data that selects best checkpoints (or --val-data FILE)")
    g.add_argument("--heldout-fraction", type=float, default=0.1,
                   help="without --eval-data: this share of --data (a seeded split) is held out")
    add_loss_samples_arg(g)
    add_jobs_arg(g)
    add_grid_args(g, "the whole sweep (every λ and seed)")
    g.add_argument("--device", default="auto", help="device for the evaluation: auto (cuda if any), cpu, ...")
    g.add_argument("--report-only", default=None, metavar="DIR", help="only rebuild report.md/report.html of DIR")


def settings_from(args):
    from imtune.commands.compare import parse_seeds
    from imtune.config import TrainConfig
    from imtune.experiments.sweep import SweepSettings, parse_weights
    from imtune.types import UsageError

    for flag, dest in (("--loss", "loss"), ("--prompt-weight", "prompt_weight"), ("--output-dir", "output_dir")):
        if hasattr(args, dest):
            raise UsageError(f"{flag} is set by the sweep: use --prompt-weights (and --out DIR)")
    base = TrainConfig.from_args(args)
    if not base.data:
        raise UsageError("no training data: give --data FILE")
    stem = Path(base.data.removeprefix("hf:").split(":")[0]).name.split(".")[0] or "data"
    return SweepSettings(out=Path(args.out) if args.out else Path("runs") / f"sweep-{stem}",
                         base=base.replace(val_data=None, keep_best=False),
                         prompt_weights=parse_weights(args.prompt_weights), seeds=parse_seeds(args.seeds),
                         val_fraction=args.val_fraction, val_data=base.val_data,
                         heldout_fraction=args.heldout_fraction, loss_samples=args.loss_samples, device=args.device,
                         jobs=args.jobs, ray=ray_plan(args), keep=args.keep, dry_run=args.dry_run,
                         argv=getattr(args, "_argv", None) or list(sys.argv))


def show(out: Path) -> None:
    from imtune.experiments.sweep import read_sweep, recommendation_text
    from imtune.report.write import next_text

    result = read_sweep(out)
    for r in result.prompt_weights:
        parts = [f"{k} {e.value:.4f} [{e.low:.4f}, {e.high:.4f}]" for k, e in (("final", r.final), ("best", r.best))
                 if e is not None]
        print(f"λ = {r.prompt_weight:<8g} held-out output loss: " + ", ".join(parts))
    print("\n" + recommendation_text(result.recommendation))
    for line in next_text(result.recommendation.next, result.cwd):
        print(line)
    print(f"report: {out / 'report.md'}  (self-contained HTML: {out / 'report.html'})")


def run(args) -> int:
    from imtune.experiments.compare import is_main_process
    from imtune.experiments.sweep import sweep, write_report

    if args.report_only:
        md, page = write_report(args.report_only)
        say(f"wrote {md} and {page}")
        show(Path(args.report_only))
        return 0
    s = settings_from(args)
    out = sweep(s)
    if is_main_process() and not s.dry_run:
        show(out)
    return 0
