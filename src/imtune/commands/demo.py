"""`imtune demo` (what `make demo` runs): the whole flow, offline, in a few minutes on a laptop CPU.

Fair synthetic data whose instructions are long and whose answers are short and checkable (imtune.data.synth `lookup`:
every example's answer is in its own instruction, none is shared with training), IT and IM
trained alike with every seed in SEEDS on the embedded SmolLM2-135M-Instruct (`imtune compare`), then the
comparison table, a report (plots, verdict, commands) and whether each arm's held-out loss passed its best point.
The same comparison at scale is one `imtune compare` command (README: "Compare loss modes").
Re-running reuses finished arms; --fresh starts over."""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

from imtune.commands.common import CommaList
from imtune.console import say
from imtune.files import MARKER  # noqa: F401  (every demo directory holds it: imtune.files; --fresh deletes only those)

# The demo's recipe, aimed at the overfitting regime (held-out output loss passes its minimum and ends >= RISE
# above it for at least one arm), 2 arms x 3 seeds, on FAIR data: `lookup` (imtune.data.synth), where every example has
# its own invented towns, its answer (a 1-2 word invented name) is stated in its own instruction, and no held-out
# answer or name occurs in any training record, so neither arm is handed the held-out answers. Tuned for the regime,
# never for a winner: the training settings are the ones tuned on 2026-12-01/02 for the regime (one example per step,
# no packing, a constant lr without warm-up, 1.5 epochs = 12 optimizer steps, held-out evaluations at steps 0, 4, 8,
# 12, no in-training train sample); moved to `lookup`, the first trial (2026-12-06, 2 seeds, 12 held-out) had all four
# runs pass their best point (+27% to +62%) and IM − IT undecided (final −0.33 [−0.76, +0.08], best −0.08 [−0.51,
# +0.25]). Held-out evaluations moved from every 4 to every 6 steps on 2026-12-07 for time: in-training
# evaluation was 57% of the demo's time (imtune.train.clock); the final models are the same, IT still passes its best
# point
# with every seed. The `chatml` template is SmolLM2's own format without its injected ~20-token default system prompt.
# Whether a run reached the regime is printed at its end (regime_text), whichever arm it is; so is the verdict, tie
# included (verdict_text). Timings: BENCHMARKS.md "Issue 11"/"Issue 24".
SEEDS = (0, 1)  # training seeds (initial order, dropout); the data is the same for every seed
DATA = dict(family="lookup", n=8, heldout=44, ratio=30.0, seed=0)
TRAIN = dict(template="chatml", epochs=1.5, lr=1.5e-4, lr_schedule="constant", warmup_ratio=0.0, packing=False,
             max_length=256, batch_size=1, eval_every=6, eval_train_sample=0)
# No memorisation BLEU: the answers are 1-3 words, below BLEU's 4-gram order (it would be 0 for any answer).
EVAL = dict(bleu_samples=0, exact_match=44, max_new_tokens=8, loss_samples=8)
RISE = 0.02  # "passed its best point": the last held-out output loss is at least this far above its minimum

CAVEATS = """\
What a run this small can and cannot show:
  - It CAN show the mechanics (same data, order and budget for every arm; {seeds} seeds per arm; one run directory
    each; a report whose numbers come from metrics.jsonl) and how each arm's held-out output loss moves as training
    goes on past its best point: the overfitting regime the IM paper describes.
  - It CANNOT show that one weighting is better in general: {n} synthetic training examples, {steps} optimizer
    steps, {seeds} seeds and a 135M-parameter model. The paper's results come from 7B/13B models on real
    instruction data and benchmarks. Treat the numbers as indicative; for evidence run `imtune compare` on your
    data, with more --seeds, on a GPU (README: "Compare loss modes")."""


def add_arguments(p) -> None:
    p.add_argument("--out", default="runs/demo", help="demo directory (the comparison lives here)")
    p.add_argument("--model", default="default",
                   help="model to fine-tune (default: the embedded SmolLM2-135M-Instruct; random:tiny for a smoke "
                        "test)")
    p.add_argument("--arms", action=CommaList, default="it,im", help="arms to compare (see imtune compare --arms)")
    p.add_argument("--fresh", action="store_true", help="delete a previous demo directory first")
    g = p.add_argument_group("recipe (the defaults are what the timing in BENCHMARKS.md was measured with)")
    g.add_argument("--family", default=DATA["family"], help="imtune.data.synth family (see imtune data synth)")
    g.add_argument("--n", type=int, default=DATA["n"], help="training examples")
    g.add_argument("--ratio", type=float, default=DATA["ratio"], help="instruction/output ratio in words")
    g.add_argument("--epochs", type=float, default=TRAIN["epochs"])
    g.add_argument("--lr", type=float, default=TRAIN["lr"])
    g.add_argument("--eval-every", type=int, default=TRAIN["eval_every"])
    g.add_argument("--max-steps", type=int, default=None,
                   help="stop every run after this many optimizer steps (default: the recipe's epochs; smoke tests)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="runs trained side by side (imtune compare --jobs). Default 1: on the 2-core build machine "
                        "the demo took 399 s one run after another against 424 s two side by side (2026-12-02)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def pick_threads() -> int | None:
    """Torch threads for a CPU run: all cores when the machine is idle, fewer when other processes already use some.
    Two OpenMP threads on a 2-core CPU where another process holds a core ran ~5x slower than one thread (25-40 vs
    ~95 tokens/s training SmolLM2-135M, measured on the build machine), so never ask for more cores than are free."""
    import torch

    if torch.cuda.is_available():
        return None
    cores, busy = os.cpu_count() or 1, cores_busy()
    return None if busy < 0.75 else max(1, cores - math.ceil(busy - 0.25))


def cores_busy(seconds: float = 1.0) -> float:
    """Cores' worth of CPU time other processes use now: /proc/stat sampled `seconds` apart (Linux). The load average
    is no substitute: its 1-minute average still counts a job that has just finished. Elsewhere: the load average."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v[:8]), v[3] + v[4]  # total jiffies (without guest time, counted in user), idle + iowait

    try:
        t0, i0 = sample()
        time.sleep(seconds)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0]
    return (os.cpu_count() or 1) * (1 - (i1 - i0) / max(1, t1 - t0))


def equivalent_command(args, data_cfg: dict, train_cfg: dict, data: Path, held: Path, out: Path,
                       jobs: int = 1) -> str:
    def flag(k: str, v) -> str:
        if isinstance(v, bool):
            return f"--{'' if v else 'no-'}{k.replace('_', '-')}"
        return f"--{k.replace('_', '-')} {v:g}" if isinstance(v, float) else f"--{k.replace('_', '-')} {v}"

    flags = [flag(k, v) for k, v in {**train_cfg, **EVAL}.items() if v is not None]
    synth = (f"imtune data synth --family {data_cfg['family']} --n {data_cfg['n']} --ratio {data_cfg['ratio']:g} "
             f"--seed {data_cfg['seed']} --heldout {data_cfg['heldout']} --out {data}")
    cmp = f"imtune compare --data {data} --eval-data {held} --arms {args.arms} --model {args.model} " + " ".join(flags)
    return f"{synth}\n  {cmp} --seeds {','.join(map(str, SEEDS))}{f' --jobs {jobs}' if jobs > 1 else ''} --out {out}"


def run_compare(out: Path, base, arms: list, jobs: int = 1) -> list[Path]:
    """Every arm with every seed in SEEDS, in one comparison (intervals over seeds and examples)."""
    from imtune.experiments.arms import CompareSettings
    from imtune.experiments.compare import compare

    # No Ctrl-C checkpoints: one of the 135M model (weights and AdamW state) took ~8 s to write on the 2-core build
    # machine (2026-12); 3 evaluation points x 4 runs would add ~1.5 min to a ~6-minute demo. Ctrl-C restarts a run.
    # No measured plan: the recipe is fixed and its cost stated (BENCHMARKS.md); measuring it (a second model load and
    # two training steps) was 11% of the demo's time (2026-12-07).
    return [compare(CompareSettings(out=out, base=base, arms=arms, seeds=list(SEEDS), jobs=jobs, checkpoints=False,
                                    plan=False, **EVAL))]


def held_out_curves(out: Path) -> list[dict]:
    """Per run directory under `out` (every arm x seed): its held-out output loss at each evaluation
    (RUN/metrics.jsonl "eval" lines), the minimum, the last value and how far the last is above the minimum."""
    from imtune.config import read_yaml
    from imtune.rundir.read import metrics as read_metrics

    rows = []
    for cfg_path in sorted(out.rglob("config.yaml")):
        run_dir = cfg_path.parent
        evals = [(r["step"], r["eval_output_loss"]) for r in read_metrics(run_dir, "eval")
                 if r.get("eval_output_loss") is not None]
        if not evals:
            continue
        cfg = read_yaml(cfg_path)
        arm = cfg["loss"] if cfg.get("prompt_weight") is None else f"{cfg['loss']}:{cfg['prompt_weight']:g}"
        lo_step, lo = min(evals, key=lambda e: e[1])
        last = evals[-1][1]
        rows.append({"arm": arm, "seed": cfg["seed"], "dir": str(run_dir), "curve": evals, "min": lo,
                     "min_step": lo_step, "final": last, "rise": last / lo - 1})
    return sorted(rows, key=lambda r: (r["arm"], r["seed"]))


def regime_text(rows: list[dict]) -> str:
    """Whether the overfitting regime was reached, arm by arm and seed by seed, from the held-out curves."""
    lines = [f"Overfitting regime (held-out output loss ending >= {RISE:.0%} above its minimum):"]
    for r in rows:
        curve = " ".join(f"{v:.3f}" for _, v in r["curve"])
        passed = "PASSED its best point" if r["rise"] >= RISE else "did not pass its best point"
        lines.append(f"  {r['arm']:>4} seed {r['seed']}: min {r['min']:.4f} at step {r['min_step']}, final "
                     f"{r['final']:.4f} ({r['rise']:+.1%}): {passed}   [{curve}]")
    arms = sorted({r["arm"] for r in rows})
    every = [a for a in arms if all(r["rise"] >= RISE for r in rows if r["arm"] == a)]
    some = [a for a in arms if a not in every and any(r["rise"] >= RISE for r in rows if r["arm"] == a)]
    if every or some:
        lines.append("  -> regime reached: " + "; ".join([f"{a} with every seed" for a in every]
                                                          + [f"{a} with some seeds" for a in some])
                     + ". Compare each arm's best point with its last (the report's curves): what a fixed budget "
                       "decides, early stopping may not.")
    else:
        lines.append("  -> regime NOT reached: every arm's held-out loss ended within "
                     f"{RISE:.0%} of its minimum; a longer budget (--epochs) would be needed to see overfitting.")
    return "\n".join(lines)


def remove_demo_dir(out: Path) -> None:
    """--fresh: delete `out` only when the demo made it (its imtune.files marker, or an older demo's .imtune-demo) and
    it is not the working directory, an ancestor of it, the home directory or the root; anything else is refused,
    saying what was found."""
    from imtune import files
    from imtune.types import UsageError

    try:
        files.remove_owned(out, "demo")
    except UsageError as e:
        raise UsageError(f"--fresh: {e}") from None



def verdict_text(summary) -> str:
    """IM − IT (or the arms given) of held-out output loss, final and best, with intervals, in words; a tie is said as
    plainly as a win, with what it means for a run this small."""
    ev = summary.evidence  # imtune.results.CompareResult
    ref = ev.reference
    lines = ["Verdict (held-out output loss, lower is better; 95% intervals over seeds and examples):"]
    undecided = []
    for key, name in (("heldout_loss", "final models"), ("best_heldout_loss", "best checkpoints")):
        m = ev.measures.get(key)
        if m is None:
            continue
        for arm, d in m.differences.items():
            if arm == ref:
                continue
            base = m.values[ref].value
            pct = f" ({d.value / base:+.1%} of {ref}'s)" if base else ""
            if d.high < 0:
                said = f"{arm} lower: {arm} wins"
            elif d.low > 0:
                said = f"{ref} lower: {ref} wins"
            else:
                said = "the interval includes zero: a tie"
                undecided.append(name)
            lines.append(f"  {name}: {arm} − {ref} = {d.value:+.4f}{pct} [{d.low:+.4f}, {d.high:+.4f}] — "
                         f"{said}")
    if undecided:
        lines.append(f"  A tie ({' and '.join(undecided)}) is a finding, not a failure: with {ev.n_seeds} seeds and "
                     f"{ev.n_examples['heldout']} held-out examples per seed, the difference between the arms is "
                     "smaller than the spread between seeds and examples. Here every answer can be read from its own "
                     "instruction, so training on instructions (IM) gives no information that IT lacks; any gain has "
                     "to come from overfitting less (the paper's mechanism), and a run this small may not show it. "
                     "More seeds, more held-out examples or a real data set would decide it (README: \"Compare loss "
                     "modes\").")
    return "\n".join(lines)


def run(args) -> int:
    from imtune import files
    from imtune.commands.compare import show
    from imtune.config import TrainConfig
    from imtune.data.synth import FAMILIES, family, synthesize, write_jsonl
    from imtune.experiments.arms import parse_arms
    from imtune.report.runs import read_summary
    from imtune.types import UsageError

    t0 = time.perf_counter()
    out = Path(args.out)
    if not family(args.family).fair:
        raise UsageError(f"--family {args.family}: an illustration whose held-out answers only the training "
                         "instructions state (IM wins by construction), not a fair comparison; the demo uses fair "
                         "families only: " + ", ".join(k for k, f in FAMILIES.items() if f.fair))
    d = {**DATA, "family": args.family, "n": args.n, "ratio": args.ratio}
    t = {**TRAIN, "epochs": args.epochs, "lr": args.lr, "eval_every": args.eval_every, "max_steps": args.max_steps}
    arms = parse_arms(args.arms)  # every argument is checked before anything is deleted or written
    TrainConfig(model=args.model, data="synthetic", **t).check()
    if args.n < 1 or args.jobs < 1:
        raise UsageError("--n and --jobs must be >= 1")
    if args.fresh and (out.exists() or out.is_symlink()):
        remove_demo_dir(out)
    try:
        files.check_claim(out, "demo")
    except UsageError as e:
        raise UsageError(f"--out: {e} (not made by `imtune demo`)") from None
    files.claim(out, "demo")
    jobs = args.jobs
    threads = None if jobs > 1 else pick_threads()
    if threads:
        t["threads"] = threads
        say(f"imtune demo: the CPU is busy (other processes use ~{cores_busy(0.2):.1f} of {os.cpu_count()} cores): "
            f"training with {threads} torch thread(s), not {os.cpu_count()}; this run will be slower than on an "
            "idle machine")
    say(f"imtune demo: {args.arms.replace(',', ' vs ')} on {args.model}, seeds {', '.join(map(str, SEEDS))}, "
        f"offline.\n"
        f"  data: imtune.data.synth '{d['family']}' ({family(d['family']).about}), {d['n']} training and "
        f"{d['heldout']} held-out examples (every answer in its own instruction; none shared with training), "
        f"instruction/output ratio ~{d['ratio']:g} in words\n"
        f"  training (every arm and seed alike): {t['epochs']:g} epochs, lr {t['lr']:g}, template {t['template']}, "
        f"max length {t['max_length']}, {t['batch_size']} "
        f"{'packed rows' if t.get('packing', True) else 'example(s)'} per step, {t.get('lr_schedule', 'linear')} lr, "
        f"held-out evaluation every "
        f"{t['eval_every']} steps; {jobs} run(s) side by side\n"
        f"  then per run: output-token loss on training and held-out data, and exact match of greedy answers to "
        f"{EVAL['exact_match']} held-out questions (no BLEU: 1-3 word answers are below its 4-gram order)\n"
        f"  -> {out}")
    train, heldout = synthesize(d["family"], d["n"], d["ratio"], d["seed"], d["heldout"])
    data = write_jsonl(out / "synth" / f"{d['family']}.jsonl", train, d["family"], d["seed"], "train", out)
    held = write_jsonl(out / "synth" / f"{d['family']}.heldout.jsonl", heldout, d["family"], d["seed"], "heldout", out)
    base = TrainConfig(model=args.model, data=str(data), eval_data=str(held), progress=args.progress, **t)
    dirs = run_compare(out, base, arms, jobs)

    summary = read_summary(dirs[0])  # read once: the verdict and the steps below
    for cdir in dirs:
        print(f"\n== {cdir}")
        show(cdir)
    print()
    print(regime_text(held_out_curves(out)))
    print()
    print(verdict_text(summary))
    print()
    print(CAVEATS.format(n=len(train), steps=summary.data["steps"], seeds=len(SEEDS)))
    print("\nThe same comparison by hand:\n  " + equivalent_command(args, d, t, data, held, out, jobs))
    print(f"\nimtune demo: done in {time.perf_counter() - t0:.0f}s wall time")
    return 0
