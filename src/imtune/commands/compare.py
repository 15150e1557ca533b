"""`imtune compare --data F [--eval-data G] --arms it,im[,weighted:0.1][,im+neftune:5][,it+kl:1] [--seeds 0,1,2]
[--reference ARM] [--val-data V | --val-fraction F] [--flags]`:
train every arm with the same model, data, order, budget and seeds, evaluate each final and best model, write a report
(imtune.experiments.compare, imtune.report.write). Every `imtune train` flag applies to all arms. Re-running the same
command skips finished arms. `imtune compare --report-only DIR` rebuilds the report of a finished comparison.
Multi-GPU: `accelerate launch -m imtune.cli compare ...` (every process trains; rank 0 evaluates and reports)."""
from __future__ import annotations

import sys
from pathlib import Path

from imtune.commands.common import CommaList, add_grid_args, add_jobs_arg, add_loss_samples_arg, ray_plan
from imtune.console import say


def add_arguments(p) -> None:
    from imtune.config import add_train_arguments
    from imtune.experiments.arms import ARM_FORMS

    add_train_arguments(p)  # first: it SUPPRESSes the defaults of every action already added
    g = p.add_argument_group("comparison")
    g.add_argument("--arms", action=CommaList, default="it,im", help=f"the arms, comma-separated: {ARM_FORMS}")
    g.add_argument("--out", default=None, metavar="DIR",
                   help="comparison directory (default: runs/compare-<data>); re-running with it resumes")
    g.add_argument("--seeds", action=CommaList, default=None, metavar="S1,S2,...",
                   help="train every arm once per seed (each its own run directory) and report intervals over "
                        "seeds and held-out examples (default: the one --seed)")
    g.add_argument("--reference", default=None, metavar="ARM",
                   help="the arm every other arm is compared with (default: the first of --arms)")
    g.add_argument("--val-fraction", type=float, default=0.3,
                   help="share of the held-out data that selects each run's best checkpoint (the rest scores; "
                        "0: no best checkpoint); --val-data FILE gives the validation data instead")
    g.add_argument("--heldout-fraction", type=float, default=0.1,
                   help="without --eval-data: this share of --data (a seeded split) is held out")
    add_loss_samples_arg(g)
    g.add_argument("--bleu-samples", type=int, default=16, metavar="N",
                   help="memorisation: greedy answers to N fixed training prompts vs their outputs (0: skip)")
    g.add_argument("--exact-match", type=int, default=0, metavar="N",
                   help="greedy answers to the first N held-out prompts scored by exact match (short checkable "
                        "answers, e.g. imtune data synth); 0: skip")
    g.add_argument("--max-new-tokens", type=int, default=128, help="generation length for BLEU and exact match")
    g.add_argument("--bench", action="append", default=[], metavar="NAME:PATH",
                   help="also run a benchmark on each final model, e.g. gsm8k:gsm8k_test.jsonl (repeatable)")
    g.add_argument("--bench-limit", type=int, default=None, metavar="N", help="first N examples of each benchmark")
    g.add_argument("--judge-url", default=None, metavar="URL",
                   help="OpenAI-compatible endpoint of the LLM judge for --bench alpacaeval:PATH / mtbench:DIR "
                        "(one judge for every arm)")
    g.add_argument("--judge-model", default=None, metavar="NAME", help="the judge's model name")
    g.add_argument("--judge-max-tokens", type=int, default=None, metavar="N",
                   help="reply tokens asked of the judge (default: each protocol's)")
    g.add_argument("--bench-max-new-tokens", type=int, default=None, metavar="N",
                   help="answer length for --bench benchmarks (default: each benchmark's own, e.g. 1024 for "
                        "AlpacaEval)")
    g.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", metavar="VAR",
                   help="environment variable holding the judge's API key")
    g.add_argument("--judge-cache", default=None, metavar="FILE",
                   help="SQLite cache of judge replies (default: $IMTUNE_CACHE/judge-cache.sqlite)")
    add_jobs_arg(g)
    g.add_argument("--device", default="auto", help="device for the final evaluation: auto (cuda if any), cpu, ...")
    add_grid_args(g)
    g.add_argument("--report-only", default=None, metavar="DIR",
                   help="only rebuild report.md/report.html of an existing comparison directory")


def settings_from(args):
    from imtune.config import TrainConfig
    from imtune.experiments.arms import CompareSettings, parse_arms
    from imtune.types import UsageError

    for flag, dest in (("--loss", "loss"), ("--prompt-weight", "prompt_weight"), ("--output-dir", "output_dir"),
                       ("--neftune-alpha", "neftune_alpha"), ("--kl-coef", "kl_coef")):
        if hasattr(args, dest):
            raise UsageError(f"{flag} is set per arm in compare: use --arms (e.g. --arms it,im,weighted:0.1,"
                             "im+neftune:5,it+kl:1)" + (" and --out DIR" if dest == "output_dir" else ""))
    for name in ("bleu_samples", "exact_match", "max_new_tokens", "bench_limit"):
        v = getattr(args, name)
        if v is not None and v < (1 if name in ("max_new_tokens", "bench_limit") else 0):
            raise UsageError(f"--{name.replace('_', '-')} must be >= {1 if name != 'bleu_samples' else 0}, not {v}")
    bench = []
    for item in args.bench:
        name, sep, path = item.partition(":")
        if not sep or not path:
            raise UsageError(f"--bench {item!r}: expected NAME:PATH, e.g. gsm8k:../shared/data/eval/gsm8k_test.jsonl")
        bench.append((name, path))
    from imtune.tasks import JUDGED

    judged = [n for n, _ in bench if n in JUDGED]
    if judged and not (args.judge_url and args.judge_model):
        raise UsageError(f"--bench {judged[0]}: an LLM judge scores it: give --judge-url URL and --judge-model NAME "
                         "(e.g. an `imtune serve` or vLLM endpoint, or https://api.openai.com/v1 with gpt-4)")
    judge = {"judge_url": args.judge_url, "judge_model": args.judge_model,
             "judge_api_key_env": args.judge_api_key_env, "judge_cache": args.judge_cache,
             **({"judge_max_tokens": args.judge_max_tokens} if args.judge_max_tokens else {})} if judged else {}
    base = TrainConfig.from_args(args)
    if not base.data:
        raise UsageError("no training data: give --data FILE")
    stem = Path(base.data.removeprefix("hf:").split(":")[0]).name.split(".")[0] or "data"
    out = Path(args.out) if args.out else Path("runs") / f"compare-{stem}"
    return CompareSettings(out=out, base=base.replace(val_data=None, keep_best=False), arms=parse_arms(args.arms),
                           seeds=parse_seeds(args.seeds), reference=args.reference, val_fraction=args.val_fraction,
                           val_data=base.val_data, heldout_fraction=args.heldout_fraction,
                           loss_samples=args.loss_samples, bleu_samples=args.bleu_samples,
                           exact_match=args.exact_match, max_new_tokens=args.max_new_tokens, bench=bench,
                           bench_limit=args.bench_limit, device=args.device, jobs=args.jobs, ray=ray_plan(args),
                           judge=judge, bench_max_new_tokens=args.bench_max_new_tokens, dry_run=args.dry_run,
                           keep=args.keep, argv=getattr(args, "_argv", None) or list(sys.argv))


def parse_seeds(text: str | None) -> list[int] | None:
    """`0,1,2` -> [0, 1, 2]; None stays None (the one --seed)."""
    from imtune.types import UsageError

    if text is None:
        return None
    try:
        seeds = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"--seeds {text!r}: give whole numbers separated by commas, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) < len(seeds):
        raise UsageError(f"--seeds {text!r}: give at least one seed, each once, e.g. 0,1,2")
    return seeds


def show(out: Path) -> None:
    """The results table, the verdict compare.json holds (computed once, by compare or --report-only) and where the
    report is (stdout)."""
    from imtune.report.runs import read_summary
    from imtune.report.write import text_table

    summary = read_summary(out)
    v = summary.verdict
    print(v.headline)  # first, so the one line that matters is not scrolled away by the table
    print()
    print(text_table(summary))
    print()
    print(v.text.removeprefix(v.headline).strip().replace("**", ""))
    print()
    print(f"report: {out / 'report.md'}  (self-contained HTML: {out / 'report.html'})")


def run(args) -> int:
    from imtune.experiments.compare import compare, is_main_process
    from imtune.report.write import write_report

    if args.report_only:
        md, page = write_report(args.report_only, recompute=True)
        say(f"wrote {md} and {page}")
        show(Path(args.report_only))
        return 0
    s = settings_from(args)
    out = compare(s)
    if is_main_process() and not s.dry_run:
        show(out)
    return 0
