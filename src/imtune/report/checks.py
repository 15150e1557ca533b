"""Two checks the compare verdict states next to its outcome (imtune.report.write):

- `learned_nothing`: a run whose final training output loss is still near ln(vocabulary size) (what a uniform guess
  over the vocabulary scores) or not below its step-0 value learned nothing, and a comparison of such runs says
  nothing about the loss modes. Named per arm and seed, with the numbers.
- `undecided`: why a comparison cannot decide even where an interval excludes zero — too few held-out examples,
  every run's held-out loss still falling when training stopped, or a difference below a practical size.
- `next_commands`: what would make an undecided or tied result decide, as commands built from the command that ran
  it (compare.json "commands"): more steps, more held-out examples, more seeds; and that a GPU makes it minutes. The
  compare report and the sweep report end with them.
- `advice_vs_outcome`: what `imtune data stats` advised for this data (compare.json data.stats.recommendation,
  imtune.analysis.stats.recommend) next to who won on held-out output loss: agree, disagree, or untested.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import shlex
from pathlib import Path

from imtune.config import PRESETS
from imtune.report.runs import eval_points, train_points
from imtune.results import ArmResult, CompareResult

MIN_HELDOUT = 30  # fewer held-out (test) examples per seed than this: too few to decide
PRACTICAL = 0.02  # a difference below 2% of the reference arm's loss is not worth acting on, interval or not
NEAR_UNIFORM = 0.9  # final training output loss >= this x ln(vocabulary): as bad as guessing
MIN_DROP = 0.01  # ... or less than 1% below its step-0 value


def _vocab_size(run_dir: Path, summary: CompareResult) -> int | None:
    for cfg in (run_dir / "final" / "config.json", run_dir / "config.json"):
        try:
            v = json.loads(cfg.read_text(encoding="utf-8")).get("vocab_size")
        except (OSError, ValueError):
            continue
        if v:
            return int(v)
    return (summary.versions.get("model") or {}).get("vocab_size")


def _first_last(records: list[dict]) -> tuple[float, float, int | None, str] | None:
    """(first, last, steps, what) of the training output loss: the fixed train sample at the evaluation points when
    there are two (the same examples at step 0 and at the end), else the training batches."""
    ep = [r for r in eval_points(records) if r.get("train_output_loss") is not None]
    if len(ep) >= 2 and ep[0].get("step") == 0:
        return ep[0]["train_output_loss"], ep[-1]["train_output_loss"], ep[-1]["step"], "train-sample output loss"
    tp = [r for r in train_points(records) if r.get("loss_output") is not None]
    if len(tp) >= 2:
        return tp[0]["loss_output"], tp[-1]["loss_output"], tp[-1]["step"], "training-batch output loss"
    return None


def learned_nothing(summary: CompareResult, metrics: dict, compare_dir: Path) -> list[dict]:
    """{"run": "arm it seed 0", "said": its numbers, "vocab": vocabulary size} for every run (arm x seed) that learned
    nothing; [] when every run learned."""
    out = []
    for arm, run in summary.runs():
        res = run.results or arm.results
        trend = _first_last(metrics.get(run.dir, []))
        final = res.train.output_loss if res.train and res.train.output_loss is not None else \
            (trend[1] if trend else None)
        if final is None:
            continue
        vocab = _vocab_size(Path(compare_dir) / run.dir, summary)
        said = []
        if vocab and final >= NEAR_UNIFORM * math.log(vocab):
            said.append(f"final training output loss {final:.4f} = {final / math.log(vocab):.0%} of ln {vocab:,}")
        if trend and trend[1] > (1 - MIN_DROP) * trend[0]:
            said.append(f"{trend[3]} {trend[0]:.4f} at step 0 → {trend[1]:.4f} at step {trend[2]} "
                        f"(not {100 * MIN_DROP:g}% lower)")
        if said:
            out.append({"run": f"arm {arm.spec} seed {run.seed}", "said": "; ".join(said), "vocab": vocab})
    return out


def nothing_warning(stalled: list[dict], n_runs: int) -> tuple[str, list[str]]:
    """(the warning, one line per run) for the runs `learned_nothing` found."""
    vocab = next((s["vocab"] for s in stalled if s["vocab"]), None)
    uniform = (f" (a uniform guess over the {vocab:,}-token vocabulary scores ln {vocab:,} = {math.log(vocab):.4f} "
               "nats per token)") if vocab else ""
    head = (f"{len(stalled)} of {n_runs} runs learned nothing{uniform}. Comparisons involving them say nothing about "
            "the loss modes: train longer (--epochs, --max-steps), raise --lr, or start from a pretrained --model.")
    return head, [f"{s['run']}: {s['said']}" for s in stalled]


def _arm_for(rec: dict, arms: tuple[ArmResult, ...]) -> str | None:
    """The spec of the plain arm (no +neftune/+kl) that trains what the recommendation advises, if any."""
    for a in arms:
        o = a.overrides
        if o.get("neftune_alpha") or o.get("kl_coef") or o.get("loss", a.spec) != rec["mode"]:
            continue
        if rec["mode"] != "weighted" or o.get("prompt_weight") == rec.get("prompt_weight"):
            return a.spec
    return None


def _won_lost(measure: dict, spec: dict) -> tuple[set, set]:
    """(arms that won a comparison, arms that lost one) on one verdict measure (interval or threshold form)."""
    won, lost = set(), set()
    for c in measure["comparisons"]:
        if "winner" in c:  # interval: arm vs reference
            if c["winner"]:
                won.add(c["winner"])
                lost.add(c["reference"] if c["winner"] == c["arm"] else c["arm"])
        elif c["decided"]:  # threshold: best vs this arm (keyed by arm name)
            won.add(spec[measure["best"]])
            lost.add(spec[c["arm"]])
    return won, lost


def advice_vs_outcome(summary: CompareResult, measures: list[dict]) -> dict | None:
    """{"advised", "arm", "outcome", "agreement", "text"}; None when compare.json holds no recommendation."""
    rec = (summary.data.get("stats") or {}).get("recommendation")
    if not rec:
        return None
    spec = {a.name: a.spec for a in summary.arms}
    lam = f" --prompt-weight {rec['prompt_weight']:g}" if rec.get("prompt_weight") is not None else ""
    advised = f"--loss {rec['mode']}{lam}"
    arm = _arm_for(rec, summary.arms)
    m = next((m for m in measures if m["key"] == "heldout_loss"), None)
    won, lost = _won_lost(m, spec) if m else (set(), set())
    outcome = (", ".join(sorted(won)) + " won" + (f" (over {', '.join(sorted(lost - won))})" if lost - won else "")
               ) if won else "no arm won"
    if arm is None:
        agreement, why = "not tested", f"no arm of this comparison trains {advised} alone"
    elif arm in lost:
        agreement, why = "disagree", f"the advised arm {arm} lost"
    elif arm in won:
        agreement, why = "agree", f"the advised arm {arm} won"
    elif won:
        agreement, why = "disagree", f"{', '.join(sorted(won))} won, the advised arm {arm} did not"
    else:
        agreement, why = "undecided", "no difference, so this comparison neither confirms nor contradicts it"
    reason = rec["reasons"][0] if rec.get("reasons") else ""
    text = (f"`imtune data stats` advised `{advised}`" + (f" ({reason})" if reason else "")
            + f"; outcome on held-out output loss: {outcome} — **{agreement}**: {why}.")
    return {"advised": advised, "arm": arm, "outcome": outcome, "agreement": agreement, "text": text}


def undecided(summary: CompareResult, curves: dict[str, list[tuple[int, float]]],
              primary: dict) -> list[tuple[str, str]]:
    """(kind, reason) for each reason the comparison cannot decide, whatever its intervals say (empty: it can); kind
    is "few" (held-out examples), "falling" (every curve) or "small" (the difference), what next_commands acts on.
    `curves`: each run's held-out output loss per evaluation point; `primary`: the held-out loss measure of
    imtune.report.write.verdict."""
    why = []
    n_ex = summary.evidence.n_examples.get("heldout") if summary.evidence else None
    if n_ex is not None and n_ex < MIN_HELDOUT:
        why.append(("few", f"only {n_ex} held-out examples per seed (fewer than {MIN_HELDOUT}; more --eval-data, or "
                           "a larger --heldout-fraction)"))
    long_enough = [c for c in curves.values() if len(c) >= 2]
    if long_enough and all(min(v for _, v in c) == c[-1][1] for c in long_enough):
        why.append(("falling", "every run's held-out loss was still falling when training stopped (the budget ended "
                               "before any arm could overfit; more steps or --epochs)"))
    ref = primary["values"].get(primary["reference"])
    small = [c for c in primary["comparisons"] if ref and abs(c["diff"]) < PRACTICAL * abs(ref)]
    if small:
        why.append(("small", "; ".join(f"{c['arm']} − {c['reference']} is {c['diff'] / ref:+.1%} of "
                                       f"{c['reference']}'s loss" for c in small)
                    + f", below the practical threshold of {PRACTICAL:.0%}"))
    return why


# ----------------------------------------------------------------------------------------------------------------
# The next step: commands that would make an undecided result decide
RERUNNABLE = ("compare", "sweep")  # commands whose argv next_commands edits (others get the reasons in words)
MORE_SEEDS = 5  # at least this many seeds in the suggested command


def next_commands(summary: CompareResult, kinds, out: str | None = None) -> list[tuple[str, str | None]]:
    """(why, command) for each step that would help an undecided or tied comparison decide, the command being the
    last one that ran it (compare.json "commands") with one flag changed; None where no command can say it (held-out
    data given as a file). `kinds`: what stands in the way (undecided's kinds, and "tie": no interval excludes
    zero). `out`: the directory the command writes (default: the comparison's own; a sweep gives its directory).
    A longer budget or another split trains new runs, so those commands write to a new --out; more seeds reuse
    every run already trained (same --out). A GPU line ends any non-empty list."""
    kinds = set(kinds)
    if not kinds:
        return []
    argv = summary.argv
    words = argv[1] if len(argv) > 1 and argv[1] in RERUNNABLE else None
    parser = _parser(words) if words else None
    out = _out_of(argv, parser) or out or summary.dir or "runs/next"
    base = summary.base_config

    def command(changes: list[tuple[str, list[str]]]) -> str | None:
        if parser is None:
            return None
        new = list(argv[1:])
        for flag, values in changes:
            new = _with(new, parser, flag, values)
        return shlex.join(["imtune", *new])

    steps = []
    if "falling" in kinds:
        if base.get("max_steps"):
            flag, value = "--max-steps", str(2 * int(base["max_steps"]))
        else:
            flag, value = "--epochs", f"{2 * float(base.get('epochs') or 2.0):g}"
        steps.append((f"held-out loss still falling: twice the budget ({flag} {value}; new runs, a new --out)",
                      command([(flag, [value]), ("--out", [f"{out}-{flag[2:]}{value}"])])))
    if "few" in kinds:
        steps.append(_more_heldout(summary, argv, parser, out, command))
    if kinds & {"tie", "small"}:
        more = [int(x) for x in summary.settings.get("seeds") or [base.get("seed", 0)]]
        target, x = max(MORE_SEEDS, 2 * len(more)), 0
        while len(more) < target:  # the seeds that ran, then the smallest unused ones
            more += [x] if x not in more else []
            x += 1
        steps.append((f"an interval that includes zero, or a small difference: more seeds ({len(more)}; the runs "
                      "already trained are reused)", command([("--seeds", [",".join(map(str, more))])])))
    steps.append(("on a GPU each of these runs takes minutes, not hours (docs/scaling.md: --jobs N, one run per GPU)",
                  None))
    return steps


def _more_heldout(summary: CompareResult, argv: list[str], parser, out: str, command) -> tuple[str, str | None]:
    """A larger --heldout-fraction (and --limit, when one is in effect and the fraction alone cannot do it) that
    gives at least MIN_HELDOUT test examples per seed; in words when the held-out data is a file of its own."""
    data = summary.data
    split = data.get("split") or {}
    n_test = data.get("n_test") or (summary.evidence.n_examples.get("heldout") if summary.evidence else 0) or 0
    if split.get("kind") != "split" or not n_test:
        return (f"too few held-out examples ({n_test}): a larger --eval-data file, {MIN_HELDOUT} or more examples "
                "scored per seed", None)
    frac = float(split.get("heldout_fraction") or 0.1)
    total = (data.get("n_train") or 0) + (data.get("n_heldout") or 0)
    test_share = n_test / max(data.get("n_heldout") or n_test, 1)  # the part of the held-out data that is scored
    want = min(0.5, math.ceil(20 * frac * MIN_HELDOUT / n_test) / 20)  # in steps of 0.05, at most half the data
    changes = [("--heldout-fraction", [f"{want:g}"])]
    limit, short = _limit_of(argv, parser), ""
    if total * want * test_share < MIN_HELDOUT:
        need = math.ceil(MIN_HELDOUT / (want * test_share))
        if limit and total >= limit:  # --limit is what holds the data back
            changes.append(("--limit", [str(need)]))
        else:  # the file has no more records
            short = (f"; the data has {total} records, about {need} would be needed: more data, or a held-out file "
                     "(--eval-data)")
    changes.append(("--out", [f"{out}-heldout{want:g}"]))
    shown = " ".join(f"{f} {v[0]}" for f, v in changes[:-1])
    return (f"only {n_test} held-out examples per seed: {shown} scores more (a new split: new runs, a new --out)"
            + short, command(changes))


PARSER: list = []  # [build_parser]: the CLI (the layer above) registers how it reads a command line (register_parser)


def register_parser(build) -> None:
    """imtune.cli gives the report its parser builder, so that next_commands edits command lines exactly as the CLI
    reads them without the report importing the CLI. Without one (a library caller), next steps come in words."""
    PARSER[:] = [build]


def _parser(words: str):
    return PARSER[0](words) if PARSER else None


def _flag_value(argv: list[str], parser, flag: str) -> str | None:
    """The value `flag` has in argv as the parser reads it (the last one given), None when it is absent or argv
    does not parse."""

    if parser is None:
        return None
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args = parser.parse_args(argv[2:])
    except SystemExit:
        return None
    dest = parser._option_string_actions[flag].dest
    return getattr(args, dest, None)


def _out_of(argv: list[str], parser) -> str | None:
    return _flag_value(argv, parser, "--out")


def _limit_of(argv: list[str], parser) -> int | None:
    """--limit as the command had it: the flag, else its --preset's."""
    limit = _flag_value(argv, parser, "--limit")
    if limit is None:
        limit = PRESETS.get(_flag_value(argv, parser, "--preset") or "", {}).get("limit")
    return limit


def _with(argv: list[str], parser, flag: str, values: list[str]) -> list[str]:
    """argv (without the program name) with every occurrence of `flag` (any spelling of it, `--flag=v` included) and
    the values the parser takes after it removed, and `flag values` appended."""
    action = parser._option_string_actions[flag]
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a.split("=", 1)[0] not in action.option_strings:
            out.append(a)
            i += 1
            continue
        i += 1
        if "=" in a or action.nargs == 0:
            continue
        if action.nargs in ("+", "*"):
            while i < len(argv) and not argv[i].startswith("-"):
                i += 1
        elif action.nargs == "?":
            i += 1 if i < len(argv) and not argv[i].startswith("-") else 0
        else:
            i += 1 if action.nargs is None else int(action.nargs)
    return out + [flag, *values]
