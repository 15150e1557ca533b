"""`imtune demo` (what `make demo` runs): the whole flow, offline, in a few minutes on a laptop CPU.

Synthetic data whose instructions are long and whose answers are short and checkable (imtune.synth), IT and IM
trained alike on the embedded SmolLM2-135M-Instruct (`imtune compare`), then the comparison table and a report
(plots, verdict, commands). The same comparison at scale is one `imtune compare` command (README: "Compare loss
modes"). Re-running reuses finished arms; --fresh starts over."""
from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path

from .common import say

# The demo's recipe: few examples with long instructions and short answers, several epochs (the regime where the IM
# paper finds IM helps), small enough that both arms + evaluation take ~3 min on an idle 2-core CPU and ~5 min on a
# busy one (see BENCHMARKS.md). Measured outcome at this budget: IT reaches the lower held-out loss; the report says so.
DATA = dict(family="rule", n=24, heldout=24, ratio=10.0, seed=0)
TRAIN = dict(epochs=4.0, lr=5e-5, max_length=256, batch_size=4, eval_every=6, eval_train_sample=8, seed=0)
# No memorisation BLEU: the answers are 1-3 words, below BLEU's 4-gram order (it would be 0 for any answer).
EVAL = dict(bleu_samples=0, exact_match=24, max_new_tokens=12)

CAVEATS = """\
What a run this small can and cannot show:
  - It CAN show the mechanics (same data, order, budget and seed for both arms; per-arm run directories; a report
    whose numbers come from metrics.jsonl) and, on this data, whether IT's held-out output loss drifts above IM's
    while its training output loss falls lower: the overfitting signature the IM paper describes.
  - It CANNOT show that IM is better in general: one seed, {n} synthetic training examples, {steps} optimizer steps
    and a 135M-parameter model. The paper's results come from 7B/13B models on real instruction data and
    benchmarks. Treat the numbers as indicative; for evidence run `imtune compare` on your data, with several
    --seed values, on a GPU (README: "Compare loss modes")."""


def add_arguments(p) -> None:
    p.add_argument("--out", default="runs/demo", help="demo directory (the comparison lives here)")
    p.add_argument("--model", default="default",
                   help="model to fine-tune (default: the embedded SmolLM2-135M-Instruct; random:tiny for a smoke "
                        "test)")
    p.add_argument("--arms", default="it,im", help="arms to compare (see imtune compare --arms)")
    p.add_argument("--fresh", action="store_true", help="delete a previous demo directory first")
    g = p.add_argument_group("recipe (the defaults are what the timing in BENCHMARKS.md was measured with)")
    g.add_argument("--family", default=DATA["family"], help="imtune.synth family (see imtune data synth)")
    g.add_argument("--n", type=int, default=DATA["n"], help="training examples")
    g.add_argument("--ratio", type=float, default=DATA["ratio"], help="instruction/output ratio in words")
    g.add_argument("--epochs", type=float, default=TRAIN["epochs"])
    g.add_argument("--lr", type=float, default=TRAIN["lr"])
    g.add_argument("--eval-every", type=int, default=TRAIN["eval_every"])
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


def equivalent_command(args, data_cfg: dict, train_cfg: dict, data: Path, held: Path, out: Path) -> str:
    def flag(k: str, v) -> str:
        return f"--{k.replace('_', '-')} {v:g}" if isinstance(v, float) else f"--{k.replace('_', '-')} {v}"

    return " ".join([f"imtune data synth --family {data_cfg['family']} --n {data_cfg['n']} --ratio "
                     f"{data_cfg['ratio']:g} --seed {data_cfg['seed']} --heldout {data_cfg['heldout']} --out {data}\n  "
                     f"imtune compare --data {data} --eval-data {held} --arms {args.arms} --model {args.model}",
                     *(flag(k, v) for k, v in {**train_cfg, **EVAL}.items()), f"--out {out}"])


def run(args) -> int:
    import json

    from ..compare import CompareSettings, compare, parse_arms
    from ..config import TrainConfig
    from ..synth import family, synthesize, write_jsonl
    from .compare import show

    t0 = time.perf_counter()
    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    d = {**DATA, "family": args.family, "n": args.n, "ratio": args.ratio}
    t = {**TRAIN, "epochs": args.epochs, "lr": args.lr, "eval_every": args.eval_every}
    threads = pick_threads()
    if threads:
        t["threads"] = threads
        say(f"imtune demo: the CPU is busy (other processes use ~{cores_busy(0.2):.1f} of {os.cpu_count()} cores): "
            f"training with {threads} torch thread(s), not {os.cpu_count()}; this run will be slower than on an "
            "idle machine")
    say(f"imtune demo: {args.arms.replace(',', ' vs ')} on {args.model}, offline.\n"
        f"  data: imtune.synth '{d['family']}' ({family(d['family']).about}), {d['n']} training and "
        f"{d['heldout']} held-out examples, instruction/output ratio ~{d['ratio']:g} in words\n"
        f"  training (every arm alike): {t['epochs']:g} epochs, lr {t['lr']:g}, max length {t['max_length']}, "
        f"{t['batch_size']} packed rows per step, seed {t['seed']}, evaluation every {t['eval_every']} steps\n"
        f"  then per arm: output-token loss on the training and held-out data, and exact match of greedy answers "
        f"to {EVAL['exact_match']} held-out questions (no BLEU: 1-3 word answers are below its 4-gram order)\n"
        f"  -> {out}")
    train, heldout = synthesize(d["family"], d["n"], d["ratio"], d["seed"], d["heldout"])
    data = write_jsonl(out / "synth" / f"{d['family']}.jsonl", train, d["family"], d["seed"], "train")
    held = write_jsonl(out / "synth" / f"{d['family']}.heldout.jsonl", heldout, d["family"], d["seed"], "heldout")
    base = TrainConfig(model=args.model, data=str(data), eval_data=str(held), progress=args.progress, **t)
    compare(CompareSettings(out=out, base=base, arms=parse_arms(args.arms), **EVAL))

    steps = json.loads((out / "compare.json").read_text(encoding="utf-8"))["data"]["steps"]
    print()
    show(out)
    print()
    print(CAVEATS.format(n=d["n"], steps=steps))
    print("\nThe same comparison by hand:\n  " + equivalent_command(args, d, t, data, held, out))
    print(f"\nimtune demo: done in {time.perf_counter() - t0:.0f}s wall time")
    return 0
