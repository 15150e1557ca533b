"""Time to an answer: a small IT-vs-IM comparison (2 arms x 2 seeds, 4 optimizer steps each, on the first 200 records
of code_alpaca_2k), done two ways in one run, one after the other on the same machine:

  imtune       `python -m imtune compare ... --arms it,im --seeds 0,1` in a subprocess (the command is in the JSON
               as "command"); wall time measured around it (time.perf_counter), its own per-phase time and peak
               memory read from OUT/imtune/compare.json (its peak: the largest phase's), and each arm's held-out
               (test.jsonl) output loss as imtune reports it.
  trl_by_hand  the same arms, data split and budget the way a user would write them with TRL's SFTTrainer and
               transformers, in this process after the subprocess has finished: the split imtune wrote
               (OUT/imtune/data/{train,val,test}.jsonl, so both sides train and score identical records), imtune's
               default model and tokenizer, imtune's default optimizer settings, packing 4 rows of <= 512 tokens
               per micro-batch, an evaluation of test, val and a fixed sample of 16 training records before training
               and every 2 steps, then greedy answers to a few training prompts scored with BLEU against their
               outputs. Timed per phase (startup = imports, load, data = SFTTrainer's tokenisation and packing,
               train_steps = trainer.train() minus its evaluations, train_eval = every evaluation, final_scoring,
               generation, cleanup), summed over the four runs.

Arm "it": assistant_only_loss with the default template marked by {% generation %} (common.GENERATION_TEMPLATE,
same rendered text). Arm "im": TRL's nearest, loss on every token (template and system prompt included; TRL has no
"prompt but not template" mask). What the two sides cannot match is listed in the JSON ("notes").

    python benchmarks/bench_answer.py [--data F] [--out DIR] [--json benchmarks/results-answer.json] [--smoke]

--smoke: imtune's tiny random llama (random:tiny), 24 records, 2 steps, one seed, 2 BLEU prompts of 4 new tokens:
the whole script in well under a minute (checks the plumbing, not the figures).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import GENERATION_TEMPLATE, PY, ROOT, SHARED, fresh_tokenizer, machine  # noqa: E402

# = Path(__file__).resolve().parents[2] / "shared/data/train/code_alpaca_2k.json" unless IMTUNE_SHARED_DATA is set
DATA = SHARED / "train" / "code_alpaca_2k.json"
ARMS = ("it", "im")
FULL = {"model": "default", "limit": 200, "max_steps": 4, "seeds": [0, 1], "bleu_samples": 4, "max_new_tokens": 64}
SMOKE = {"model": "random:tiny", "limit": 24, "max_steps": 2, "seeds": [0], "bleu_samples": 2, "max_new_tokens": 4}
# Shared by both sides (imtune: these flags, or its defaults; TRL: the SFTConfig below).
MAX_LENGTH, EVAL_EVERY, EVAL_TRAIN_SAMPLE, THREADS, BATCH, EVAL_BATCH = 512, 2, 16, 2, 4, 8
PHASES = ("startup", "load", "data", "train_steps", "train_eval", "final_scoring", "generation", "cleanup")
NOTES = [
    "im arm: TRL trains (and scores) every token, chat template and system prompt included, with "
    "assistant_only_loss=False and completion_only_loss=False; imtune's im weighs prompt and output but not the "
    "template tokens. TRL has no 'prompt but not template' mask.",
    "held-out loss: imtune reports the output-token loss (assistant content + end of turn) on test.jsonl; TRL's "
    "eval_test_loss is its model loss over the trained labels: the same tokens for it (assistant_only_loss), every "
    "token for im (not comparable to imtune's im figure), and a mean over eval batches, not over tokens.",
    "final scoring: the step-4 evaluation (eval_steps=2) already scored the final model on test, so neither side "
    "scores it again; imtune reuses its in-training score too (scored_in_training), the by-hand side reads the last "
    "evaluation's metrics (a user who re-ran trainer.evaluate would pay one more evaluation).",
    "step-0 evaluation: imtune scores the untouched model once per comparison (its seeds and arms share it) and "
    "keeps it in $IMTUNE_CACHE/eval0 across invocations, so a repeated run of this benchmark may reuse it; the "
    "by-hand side evaluates before every trainer.train().",
    "lr schedule: both linear with warm-up ceil(0.03 x steps) = 1 step, but transformers' first step has lr 0 "
    "(step / warmup) while imtune's has half the peak ((step + 1) / (warmup + 1)); later steps agree.",
    "order and packing: the same records, but each side shuffles and packs them its own way (TRL: bfd packing, "
    "padding-free rows; its eval sets packed too, 8 rows per eval batch; imtune: 4 packed rows per batch).",
    "imtune's extra work, absent by hand: the data statistics, the cost estimate, the precision probe "
    "(--precision auto), best/ selection on val, the report (report.md/html, plots), per-example losses.",
]


def imtune_command(data: str, out: Path, w: dict) -> list[str]:
    return [PY, "-m", "imtune", "compare", "--data", data, "--on-invalid", "skip", "--model", w["model"],
            "--limit", str(w["limit"]), "--max-steps", str(w["max_steps"]),
            "--seeds", ",".join(map(str, w["seeds"])), "--max-length", str(MAX_LENGTH),
            "--eval-every", str(EVAL_EVERY), "--eval-train-sample", str(EVAL_TRAIN_SAMPLE),
            "--bleu-samples", str(w["bleu_samples"]), "--max-new-tokens", str(w["max_new_tokens"]),
            "--keep", "none", "--threads", str(THREADS), "--no-progress", "--arms", ",".join(ARMS),
            "--out", str(out / "imtune")]


def run_imtune(cmd: list[str], out: Path) -> dict:
    """The compare subprocess, timed; its output goes to OUT/imtune.log (its tail is shown when it fails)."""
    log = out / "imtune.log"
    with open(log, "w", encoding="utf-8") as f:
        t = time.perf_counter()
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
        wall = time.perf_counter() - t
    if rc != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-4000:]
        raise SystemExit(f"imtune compare failed ({rc}):\n{tail}")
    figures = imtune_figures(out / "imtune")
    # the process's peak is the largest of its phases' (compare.json "memory"); getrusage(RUSAGE_CHILDREN) cannot say
    # it: imtune's clock resets the kernel's high-water mark at every phase (/proc/self/clear_refs), and ru_maxrss is
    # that mark, so it would give the last phase's peak only
    return {"wall_s": wall, "peak_rss_mib": max((figures.get("memory") or {}).values(), default=None),
            "log": str(log), **figures}


def imtune_figures(cmp_dir: Path) -> dict:
    """compare.json's "time" and "memory" (phase -> seconds / MB), each arm's held-out output loss (mean over seeds,
    and per seed), memorisation BLEU, and the precision `--precision auto` chose (each run's data_stats.json)."""
    with open(cmp_dir / "compare.json", encoding="utf-8") as f:
        summary = json.load(f)
    heldout, per_seed, bleu = {}, {}, {}
    for arm in summary["arms"]:
        res = arm.get("results") or {}
        heldout[arm["name"]] = (res.get("heldout") or {}).get("output_loss")
        bleu[arm["name"]] = (res.get("bleu") or {}).get("corpus_bleu")
        per_seed[arm["name"]] = {str(r["seed"]): ((r.get("results") or {}).get("heldout") or {}).get("output_loss")
                                 for r in arm.get("runs", [])}
    precision = set()
    for stats in sorted(cmp_dir.glob("arms/*/seed-*/data_stats.json")):
        with open(stats, encoding="utf-8") as f:
            precision.add((json.load(f).get("precision") or {}).get("used"))
    return {"time": summary.get("time"), "memory": summary.get("memory"), "heldout": heldout,
            "heldout_per_seed": per_seed, "bleu": bleu, "precision": sorted(map(str, precision))}


# ----------------------------------------------------------------------------------------------------------------
# By hand: TRL + transformers
@contextlib.contextmanager
def phase(phases: dict, name: str):
    t = time.perf_counter()
    try:
        yield
    finally:
        phases[name] += time.perf_counter() - t


class EvalTimer:
    """Wraps trainer.evaluate (the method the Trainer calls during training too): seconds spent in evaluations and the
    metrics of the last one. A dict of eval sets makes evaluate call itself per set; only the outer call counts."""

    def __init__(self, trainer):
        self.seconds, self.depth, self.last, inner = 0.0, 0, None, trainer.evaluate

        def timed(*args, **kwargs):
            self.depth += 1
            t = time.perf_counter()
            try:
                out = inner(*args, **kwargs)
            finally:
                self.depth -= 1
            if self.depth == 0:
                self.seconds += time.perf_counter() - t
                self.last = out
            return out

        trainer.evaluate = timed


def read_split(cmp_dir: Path) -> dict:
    """The records imtune trained and scored on: name -> list of {"messages": [...]} (other keys dropped)."""
    out = {}
    for name in ("train", "val", "test"):
        path = cmp_dir / "data" / f"{name}.jsonl"
        if path.is_file():
            with open(path, encoding="utf-8") as f:
                out[name] = [{"messages": json.loads(line)["messages"]} for line in f if line.strip()]
    return out


def imtune_defaults() -> dict:
    """imtune's optimizer defaults (TrainConfig), so the by-hand side trains with the same ones."""
    from imtune.config import TrainConfig

    d = TrainConfig()
    # lr is None by default: TrainConfig.peak_lr resolves it (2e-5 for full fine-tuning, 2e-4 with LoRA)
    return {"lr": d.peak_lr, "warmup_ratio": d.warmup_ratio, "weight_decay": d.weight_decay,
            "max_grad_norm": d.max_grad_norm, "lr_schedule": d.lr_schedule}


def sft_args(arm: str, seed: int, w: dict, out: Path, d: dict):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(out / "trl" / f"{arm}-seed-{seed}"), max_steps=w["max_steps"],
        per_device_train_batch_size=BATCH, gradient_accumulation_steps=1, max_length=MAX_LENGTH, packing=True,
        assistant_only_loss=arm == "it", completion_only_loss=False, learning_rate=d["lr"],
        lr_scheduler_type=d["lr_schedule"],
        warmup_steps=d["warmup_ratio"],  # this transformers has no warmup_ratio: a float < 1 is the ratio
        weight_decay=d["weight_decay"], max_grad_norm=d["max_grad_norm"], seed=seed, eval_strategy="steps",
        eval_steps=EVAL_EVERY, per_device_eval_batch_size=EVAL_BATCH, save_strategy="no", report_to=[],
        logging_steps=1, use_cpu=True, dataloader_num_workers=0, bf16=False, fp16=False, disable_tqdm=True)


def train_sample(records: list) -> list:
    """imtune's fixed sample of training records scored at every evaluation (imtune.train.track.eval_sets)."""
    import numpy as np

    pick = np.random.default_rng(7).permutation(len(records))[:EVAL_TRAIN_SAMPLE]
    return [records[i] for i in sorted(pick.tolist())]


def generate_bleu(model, tok, records: list, seed: int, n: int, max_new_tokens: int) -> dict:
    """Memorisation BLEU as imtune's --bleu-samples: greedy answers to n fixed training prompts (the same pick as
    imtune.experiments.data.fixed_sample(train, n, seed, 2)) against their last assistant message."""
    import numpy as np
    import sacrebleu
    import torch

    pick = sorted(np.random.default_rng([seed, 2]).permutation(len(records))[:n].tolist())
    convs = [records[i]["messages"] for i in pick]
    prompts = [tok.apply_chat_template(m[:-1], add_generation_prompt=True, tokenize=False) for m in convs]
    refs = [m[-1]["content"] for m in convs]
    side, tok.padding_side = tok.padding_side, "left"
    try:
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tok.padding_side = side
    model.eval()
    with torch.no_grad():
        out = model.generate(**enc.to(model.device), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    hyps = [h.strip() for h in tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]
    return {"n": len(hyps), "corpus_bleu": sacrebleu.corpus_bleu(hyps, [refs]).score}


def one_run(arm: str, seed: int, split: dict, w: dict, out: Path, d: dict, phases: dict) -> dict:
    """One arm and seed by hand: load, build the trainer, evaluate at step 0, train (evaluating every EVAL_EVERY
    steps), read the final evaluation, generate; every phase timed into `phases`."""
    import torch
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import SFTTrainer

    from imtune.model.models import load_model

    with phase(phases, "load"):
        tok = fresh_tokenizer(GENERATION_TEMPLATE if arm == "it" else None)  # sets pad_token to eos when unset
        model = load_model(w["model"], dtype=torch.float32, seed=seed)
    with phase(phases, "data"):  # SFTTrainer tokenizes and packs every dataset in its constructor
        evals = {"test": split["test"], **({"val": split["val"]} if split.get("val") else {}),
                 "train": train_sample(split["train"])}
        trainer = SFTTrainer(model=model, args=sft_args(arm, seed, w, out, d),
                             train_dataset=Dataset.from_list(split["train"]),
                             eval_dataset={k: Dataset.from_list(v) for k, v in evals.items()}, processing_class=tok)
        trainer.remove_callback(PrinterCallback)  # the log dicts on stdout; nothing else changes
    timer = EvalTimer(trainer)
    with phase(phases, "train_eval"):
        step0 = trainer.evaluate()  # imtune evaluates at step 0 too
    before = timer.seconds
    t = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t
    phases["train_eval"] += timer.seconds - before
    phases["train_steps"] += total - (timer.seconds - before)
    with phase(phases, "final_scoring"):  # the last evaluation (at the last step) scored the final model already
        steps = trainer.state.global_step
        if steps != w["max_steps"] or steps % EVAL_EVERY:
            raise RuntimeError(f"{arm} seed {seed}: {steps} steps; the last evaluation is not the final model's")
        last = timer.last
    with phase(phases, "generation"):
        bleu = generate_bleu(trainer.model, tok, split["train"], seed, w["bleu_samples"], w["max_new_tokens"])
    with phase(phases, "cleanup"):
        del trainer, model, timer
        gc.collect()
    keep = lambda m: {k: v for k, v in m.items() if k.endswith("_loss")}  # noqa: E731
    return {"arm": arm, "seed": seed, "steps": steps, "step0": keep(step0), "last": keep(last), "bleu": bleu}


def trl_by_hand(out: Path, w: dict) -> dict:
    phases = dict.fromkeys(PHASES, 0.0)
    t0 = time.perf_counter()
    with phase(phases, "startup"):
        import datasets
        import torch
        import transformers  # noqa: F401
        import trl  # noqa: F401

        torch.set_num_threads(THREADS)
        datasets.disable_progress_bars()
        d = imtune_defaults()
    with phase(phases, "data"):
        split = read_split(out / "imtune")
    runs = [one_run(arm, seed, split, w, out, d, phases) for arm in ARMS for seed in w["seeds"]]
    wall = time.perf_counter() - t0
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    by_arm = {arm: [r for r in runs if r["arm"] == arm] for arm in ARMS}
    return {
        "wall_s": wall, "phases": phases, "train_steps_share": phases["train_steps"] / wall,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "heldout": {a: mean([r["last"]["eval_test_loss"] for r in rs]) for a, rs in by_arm.items()},
        "bleu": {a: mean([r["bleu"]["corpus_bleu"] for r in rs]) for a, rs in by_arm.items()},
        "runs": runs, "settings": {**d, "batch": BATCH, "max_length": MAX_LENGTH, "packing": True,
                                   "eval_every": EVAL_EVERY, "eval_batch": EVAL_BATCH, "threads": THREADS,
                                   "precision": "fp32", "sizes": {k: len(v) for k, v in split.items()}},
        "notes": NOTES,
    }


# ----------------------------------------------------------------------------------------------------------------
def table(result: dict) -> str:
    im, tr = result["imtune"], result["trl_by_hand"]
    im_share = ((im.get("time") or {}).get("train_steps") or 0) / im["wall_s"]
    rows = [("imtune compare", im["wall_s"], im_share, im["peak_rss_mib"]),
            ("TRL by hand", tr["wall_s"], tr["train_steps_share"], tr["peak_rss_mib"])]
    lines = ["| side | wall s | optimizer-step share | peak memory MiB |", "|---|---|---|---|"]
    for name, wall, share, rss in rows:
        lines.append(f"| {name} | {wall:.1f} | {share:.1%} | {rss:.0f} |" if rss is not None else
                     f"| {name} | {wall:.1f} | {share:.1%} | – |")
    losses = lambda d: ", ".join(f"{k} {v:.4f}" if v is not None else f"{k} –" for k, v in d.items())  # noqa: E731
    lines.append(f"\nTRL by hand / imtune wall: {result['ratio_wall_trl_over_imtune']:.2f}x; held-out loss: imtune "
                 f"{losses(im['heldout'])}; TRL {losses(tr['heldout'])} (im: not the same measure, see notes)")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DATA), help="training data (default: %(default)s)")
    p.add_argument("--out", default=None, help="working directory (default: a new temporary one)")
    p.add_argument("--json", default=None,
                   help="where the figures go (default: benchmarks/results-answer.json; with --smoke "
                        "OUT/bench-answer-smoke.json, OUT the --out folder or the temp folder)")
    p.add_argument("--smoke", action="store_true", help="tiny random model, 24 records, 2 steps, 1 seed")
    a = p.parse_args()
    if a.json is None:  # a smoke run never overwrites the real figures
        a.json = str(Path(a.out or tempfile.gettempdir()) / "bench-answer-smoke.json") if a.smoke else \
            str(ROOT / "benchmarks" / "results-answer.json")
    if not Path(a.data).is_file():
        reason = f"{a.data}: no such file (the shared data is not beside this checkout); nothing measured"
        print(reason)
        Path(a.json).write_text(json.dumps({"skipped": reason}, indent=1) + "\n", encoding="utf-8")
        sys.exit(0)
    out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="bench-answer-"))
    if (out / "imtune").exists() or (out / "trl").exists():
        raise SystemExit(f"{out} holds an earlier run (imtune/ or trl/): give a new --out (imtune would resume)")
    out.mkdir(parents=True, exist_ok=True)
    w = SMOKE if a.smoke else FULL
    cmd = imtune_command(a.data, out, w)
    result = {"command": " ".join(["python", *cmd[1:]]), "workload": {**w, "smoke": a.smoke, "out": str(out)},
              "load_start": os.getloadavg()}
    result["imtune"] = run_imtune(cmd, out)
    result["trl_by_hand"] = trl_by_hand(out, w)
    result["ratio_wall_trl_over_imtune"] = result["trl_by_hand"]["wall_s"] / result["imtune"]["wall_s"]
    result["machine"] = machine()
    result["load_end"] = os.getloadavg()
    with open(a.json, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(table(result))
    print(f"\nwrote {a.json}")


if __name__ == "__main__":
    main()
