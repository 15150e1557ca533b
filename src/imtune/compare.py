"""`compare(settings) -> COMPARE_DIR`: train several loss arms on the same data, evaluate each, write a report.

    arms ─▶ one run directory each (imtune.train: same model, data, order, budget and seed) ─▶ final evaluation
         ─▶ compare.json ─▶ report.md / report.html (imtune.report)

An arm is a loss mode plus optional regularisers (ARM_FORMS): `it`, `im`, `all`, `weighted:0.1`, `im+neftune:5`,
`it+kl:1`. Everything else (model, data, epochs, lr, ...) comes from one TrainConfig shared by every arm; every arm
is trained once per seed (--seeds; default the one --seed).

    COMPARE_DIR/
      compare.json        settings, command lines, data stats + recommendation, per-arm results (mean over seeds,
                          spread, per-seed runs), intervals against the reference arm (imtune.aggregate), the verdict,
                          versions (imtune, torch, transformers, python, model fingerprint: imtune.provenance)
      data/train.jsonl    what every arm trains on: F (or F minus the held-out split), in the `messages` format
      data/heldout.jsonl  held-out data: G, or a seeded split of F (--heldout-fraction)
      data/val.jsonl      the part of the held-out data that selects each run's best checkpoint (or --val-data)
      data/test.jsonl     the rest: every score is measured here, never on val.jsonl
      arms/<arm>/seed-<s>/  one imtune run directory per arm and seed; eval/compare.json its evaluation (final/ and
                          best/, with per-example losses)
      plots/*.png, report.md, report.html

Best vs final. Each run trains with val.jsonl as its validation set (--keep-best): the model of the evaluation point
with the lowest validation output loss is saved as RUN/best/. Both RUN/final and RUN/best are scored on test.jsonl,
which selection never sees.

Re-running the same command skips finished runs (RUN/DONE) and runs already evaluated with the same settings;
an unfinished run continues from its newest checkpoint. An arm trained with other settings is never mixed in: the
run stops and says which setting differs. The report reads only compare.json and the run directories, so
`imtune compare --report-only DIR` rebuilds it.
"""
from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import TrainConfig
from .runlog import is_main_process, say
from .types import Conversation, UsageError

ARM_FORMS = ("it, im, all or weighted:λ (λ >= 0), each optionally followed by +neftune:α and/or +kl:λ, "
             "e.g. it,im,weighted:0.1,im+neftune:5,it+kl:1")
BASE_MODES = ("it", "im", "all")
MODIFIERS = {"neftune": "neftune_alpha", "kl": "kl_coef"}  # +name:value -> TrainConfig field


@dataclass(frozen=True)
class Arm:
    spec: str  # as typed, e.g. "im+neftune:5"
    name: str  # directory name, e.g. "im+neftune-5"
    overrides: dict  # TrainConfig fields this arm sets


def _number(text: str, what: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not (math.isfinite(v) and v >= 0):
        raise UsageError(f"arm {what!r}: {text!r} is not a number >= 0; valid arms: {ARM_FORMS}")
    return v


def parse_arm(spec: str) -> Arm:
    spec = spec.strip()
    head, *mods = spec.split("+")
    mode, _, value = head.partition(":")
    if mode in BASE_MODES and not value:
        over = {"loss": mode, "prompt_weight": None}
    elif mode == "weighted" and value:
        over = {"loss": "weighted", "prompt_weight": _number(value, spec)}
    else:
        raise UsageError(f"unknown arm {spec!r}; valid arms: {ARM_FORMS}")
    over.update(neftune_alpha=0.0, kl_coef=0.0)
    for m in mods:
        name, _, value = m.partition(":")
        if name not in MODIFIERS or not value:
            raise UsageError(f"unknown arm modifier {'+' + m!r} in {spec!r}; valid arms: {ARM_FORMS}")
        over[MODIFIERS[name]] = _number(value, spec)
    return Arm(spec, re.sub(r"[^A-Za-z0-9+._-]", "-", spec.replace(":", "-")), over)


def parse_arms(text: str) -> list[Arm]:
    arms = [parse_arm(s) for s in text.split(",") if s.strip()]
    if len(arms) < 1:
        raise UsageError(f"--arms: give at least one arm; valid arms: {ARM_FORMS}")
    names = [a.name for a in arms]
    if len(set(names)) < len(names):
        raise UsageError(f"--arms {text!r} names an arm twice")
    return arms


@dataclass
class CompareSettings:
    """What `imtune compare` was asked. `base` carries every training flag (shared by all arms)."""

    out: Path
    base: TrainConfig
    arms: list[Arm]
    seeds: list[int] | None = None  # every arm trains once per seed; None: [base.seed]
    reference: str | None = None  # arm spec or name the others are compared with; None: the first arm
    val_fraction: float = 0.3  # share of the held-out data that selects best checkpoints (0: no best/)
    val_data: str | None = None  # validation data for the selection instead of a split of the held-out data
    max_steps_cap: int | None = None  # at most this many optimizer steps per run (imtune study --budget)
    heldout_fraction: float = 0.1
    loss_samples: int | None = None  # training examples scored at the end (None: all)
    bleu_samples: int = 16  # training prompts answered greedily for memorisation BLEU
    exact_match: int = 0  # held-out prompts answered greedily and scored by exact match (short-answer data)
    max_new_tokens: int = 128
    bench: list[tuple[str, str]] = field(default_factory=list)  # (benchmark, data path)
    bench_limit: int | None = None
    # LLM judge of the judged benchmarks (alpacaeval, mtbench): judge_url, judge_model, judge_api_key_env, judge_cache.
    # One judge for every arm of a comparison: scores under different judges are never compared.
    judge: dict = field(default_factory=dict)
    bench_max_new_tokens: int | None = None  # answer length for benchmarks (None: each benchmark's own)
    device: str = "auto"
    jobs: int = 1  # runs trained side by side (imtune.schedule); 1: one after another in this process
    argv: list[str] = field(default_factory=lambda: list(sys.argv))

    def eval_settings(self) -> dict:
        return {"loss_samples": self.loss_samples, "bleu_samples": self.bleu_samples, "exact_match": self.exact_match,
                "max_new_tokens": self.max_new_tokens, "bench": [list(b) for b in self.bench],
                "bench_limit": self.bench_limit,
                "judge": {k: v for k, v in self.judge.items() if k in ("judge_url", "judge_model")},
                **({"judge_max_tokens": self.judge["judge_max_tokens"]} if self.judge.get("judge_max_tokens") else {}),
                **({"bench_max_new_tokens": self.bench_max_new_tokens} if self.bench_max_new_tokens else {})}

    def seed_list(self) -> list[int]:
        return list(self.seeds) if self.seeds else [self.base.seed]

    def reference_arm(self) -> Arm:
        if self.reference is None:
            return self.arms[0]
        for a in self.arms:
            if self.reference in (a.spec, a.name):
                return a
        arms = ", ".join(a.spec for a in self.arms)
        raise UsageError(f"--reference {self.reference!r} is not one of the arms ({arms})")


# ----------------------------------------------------------------------------------------------------------------
# The whole comparison, top to bottom
def compare(s: CompareSettings) -> Path:
    from . import checkpoint as ckpt, report
    from .aggregate import aggregate
    from .provenance import versions
    from .schedule import Job, train_all

    out = Path(s.out)
    (out / "arms").mkdir(parents=True, exist_ok=True)
    old = read_json(out / "compare.json")
    seeds, ref = s.seed_list(), s.reference_arm()
    if s.jobs < 1:
        raise UsageError(f"--jobs must be >= 1, not {s.jobs}")
    if len(set(seeds)) < len(seeds):
        raise UsageError(f"--seeds {','.join(map(str, seeds))} names a seed twice")
    data = materialise_data(s, out)
    base = s.base.replace(data=str(data["train_path"]), eval_data=str(data["test_path"]), format="messages",
                          fields={}, limit=None, val_data=data["val_path"], keep_best=data["val_path"] is not None)
    if s.max_steps_cap and data["steps"] > s.max_steps_cap:
        base = base.replace(max_steps=s.max_steps_cap)
        data["steps"] = s.max_steps_cap
    if base.eval_every is None:
        base = base.replace(eval_every=default_eval_every(data["steps"]))
    runs = [(arm, seed, arm_config(base, arm, out, seed)) for arm in s.arms for seed in seeds]
    for _, _, cfg in runs:  # every run is checked before any trains: a mistake costs no training time
        check_same_training(Path(cfg.output_dir), cfg.check())

    t0 = time.perf_counter()
    todo = []  # 1. train every arm x seed not yet trained (every process, under accelerate)
    for i, (arm, seed, cfg) in enumerate(runs, 1):
        run_dir, what = Path(cfg.output_dir), f"[{i}/{len(runs)}] arm {arm.spec} seed {seed}"
        if ckpt.is_finished(run_dir):
            say(f"{what}: already trained ({run_dir}/DONE); skipping training")
            continue
        todo.append(Job(what, cfg.replace(resume="auto") if ckpt.latest_checkpoint(run_dir) is not None else cfg))
    train_all(todo, s.jobs, say)
    free_memory()
    if not is_main_process():
        return out

    results = {}
    # 2. evaluate final/ and best/ of each run (rank 0 only), one after another in this process whatever --jobs says:
    # side by side, each child imports torch and transformers again, and on the 2-core build machine two demo
    # evaluations took 45 s per pair against ~10 s each here (2026-12-01).
    for i, (arm, seed, cfg) in enumerate(runs, 1):
        results[arm.name, seed] = evaluate_arm(s, arm, cfg, data, f"[{i}/{len(runs)}] arm {arm.spec} seed {seed}")
        free_memory()

    commands = (old or {}).get("commands", [])
    commands.append({"argv": s.argv, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "cwd": os.getcwd()})
    arms = [{"spec": a.spec, "name": a.name, "dir": str(Path("arms") / a.name), "overrides": a.overrides,
             "runs": [{"seed": seed, "dir": str(Path("arms") / a.name / f"seed-{seed}"),
                       "results": results[a.name, seed]} for seed in seeds]} for a in s.arms]
    evidence = aggregate(arms, ref.name)  # per-arm means, spreads and intervals; strips per-example lists
    summary = {
        "version": 2, "dir": str(out), "commands": commands,
        "settings": {"base_config": base.to_dict(), "eval": s.eval_settings(), "heldout_fraction": s.heldout_fraction,
                     "seeds": seeds, "reference": ref.spec, "val_fraction": s.val_fraction},
        "data": {k: v for k, v in data.items() if k not in ("train", "heldout", "val", "test")},
        "arms": arms, "evidence": evidence, "versions": versions(base.model),
    }
    summary["verdict"] = report.verdict(summary, out)
    write_json(out / "compare.json", summary)
    report.write_report(out)
    say(f"compare: {len(s.arms)} arms x {len(seeds)} seeds in {time.perf_counter() - t0:.0f}s")
    return out


def arm_config(base: TrainConfig, arm: Arm, out: Path, seed: int) -> TrainConfig:
    return base.replace(**arm.overrides, seed=seed, output_dir=str(out / "arms" / arm.name / f"seed-{seed}"))


def check_same_training(run_dir: Path, cfg: TrainConfig) -> None:
    """A run directory that exists must have been made by this very arm config (up to the settings that do not change
    what is trained: imtune.guard.HARMLESS); otherwise say what differs and what to do."""
    from .guard import config_changes

    diff = config_changes(run_dir, cfg)
    if diff:
        shown = ", ".join(f"{k}: {was!r} -> {now!r}" for k, (was, now) in list(diff.items())[:6]) + \
            (f" and {len(diff) - 6} more" if len(diff) > 6 else "")
        raise UsageError(f"{run_dir} was trained with other settings ({shown}); re-run with the same flags to "
                         f"resume, or give another --out (or delete {run_dir})")


def default_eval_every(steps: int) -> int:
    """About 8 evaluation points over the run (plus the one at step 0 and the one at the end)."""
    return max(1, round(steps / 8))


def free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


# ----------------------------------------------------------------------------------------------------------------
# Data: every arm trains on the same file and is evaluated on the same held-out file
def materialise_data(s: CompareSettings, out: Path) -> dict:
    """Load F (format, fields, limit as given), split off the held-out part unless G is given, and write both in the
    `messages` format to COMPARE_DIR/data/. Deterministic for a seed; refuses to overwrite different data that arms
    were trained on. Also measures F (imtune.stats) and estimates the optimizer steps (for the eval cadence)."""
    import numpy as np

    from .models import load_tokenizer
    from .prepare import load, prepare_examples
    from .stats import dataset_stats
    from .weights import loss_spec

    b = s.base
    if not b.data:
        raise UsageError("no training data: give --data FILE")
    convs, skipped = load(b.data, b.format, b.fields, b.on_invalid, b.limit, roles=b.roles)
    if skipped:
        say(f"compare: {len(skipped)} invalid records of {b.data} skipped (first: {skipped[0]})")
    if b.eval_data:
        train, heldout = convs, load(b.eval_data, b.format, b.fields, b.on_invalid, roles=b.roles)[0]
        split = {"kind": "given", "heldout_source": b.eval_data}
    else:
        if not 0 < s.heldout_fraction < 1:
            raise UsageError(f"--heldout-fraction must be between 0 and 1, not {s.heldout_fraction}")
        if len(convs) < 2:
            raise UsageError(f"{b.data}: {len(convs)} example(s): too few to split off held-out data; give --eval-data")
        k = min(len(convs) - 1, max(1, round(s.heldout_fraction * len(convs))))
        pick = set(np.random.default_rng([b.seed, 1717]).permutation(len(convs))[:k].tolist())
        train = [c for i, c in enumerate(convs) if i not in pick]
        heldout = [c for i, c in enumerate(convs) if i in pick]
        split = {"kind": "split", "heldout_fraction": s.heldout_fraction, "seed": b.seed}
    if not heldout:
        raise UsageError(f"{b.eval_data}: no held-out examples")
    tok = load_tokenizer(b.model)
    # Every arm must see the same examples: keep only those IT can train on (an output token within --max-length);
    # any other arm could train on them too. The trainer would drop the rest for IT alone.
    prep = prepare_examples(train, tok, loss_spec("it"), b.template, b.max_length, b.truncation, on_invalid="skip",
                            system_prompt=b.system_prompt, special_tokens_in_content=b.special_tokens_in_content)
    examples, renderer, report = prep.examples, prep.renderer, prep.report
    kept = set(examples.sources)
    dropped = [str(c.source) for c in train if c.source not in kept]
    train = [c for c in train if c.source in kept]
    if dropped:
        say(f"compare: {len(dropped)} training examples left out for every arm ({report.summary()})")
    if not train:
        raise UsageError(f"{b.data}: no training example has an output token within --max-length {b.max_length}")
    val, test, split["val"] = validation_split(s, heldout)
    paths = {}
    for name, part in (("train", train), ("heldout", heldout), ("val", val), ("test", test)):
        paths[name] = write_conversations(out / "data" / f"{name}.jsonl", part) if part else None
    stats = dataset_stats(convs, tok, renderer, "tokens", b.max_length)
    return {"source": b.data, "format": b.format, "limit": b.limit, "records": len(convs),
            "skipped": [str(p) for p in skipped], "split": split, "n_train": len(train), "n_heldout": len(heldout),
            "n_val": len(val), "n_test": len(test), "dropped_train": dropped, "train_path": str(paths["train"]),
            "heldout_path": str(paths["heldout"]), "test_path": str(paths["test"]),
            "val_path": str(paths["val"]) if paths["val"] else None,
            "stats": stats, "steps": estimate_steps(b, examples), "train": train, "heldout": heldout, "val": val,
            "test": test}


def validation_split(s: CompareSettings, heldout: list[Conversation]) -> tuple[list, list, dict]:
    """(val, test, how): the validation part selects each run's best checkpoint, the test part scores every run.
    They never share an example: --val-data that repeats a held-out example is refused."""
    import numpy as np

    from .prepare import load

    b = s.base
    key = lambda c: tuple((m.role, m.content) for m in c.messages)  # noqa: E731
    if s.val_data:
        val = load(s.val_data, b.format, b.fields, b.on_invalid, roles=b.roles)[0]
        both = {key(c) for c in val} & {key(c) for c in heldout}
        if both:
            raise UsageError(f"{s.val_data}: {len(both)} example(s) also in the held-out data; selection must never "
                             "see the data it is scored on: remove them or drop --val-data")
        return val, heldout, {"kind": "given", "source": s.val_data}
    if not 0 <= s.val_fraction < 1:
        raise UsageError(f"--val-fraction must be >= 0 and < 1, not {s.val_fraction}")
    if s.val_fraction == 0 or len(heldout) < 2:
        why = "--val-fraction 0" if s.val_fraction == 0 else "one held-out example: too few to split"
        return [], heldout, {"kind": "none", "why": why}
    k = min(len(heldout) - 1, max(1, round(s.val_fraction * len(heldout))))
    pick = set(np.random.default_rng([b.seed, 2929]).permutation(len(heldout))[:k].tolist())
    return ([c for i, c in enumerate(heldout) if i in pick], [c for i, c in enumerate(heldout) if i not in pick],
            {"kind": "split", "val_fraction": s.val_fraction, "seed": b.seed})


def write_conversations(path: Path, convs: list[Conversation]) -> Path:
    text = "".join(json.dumps({"source": str(c.source), "messages": [{"role": m.role, "content": m.content}
                                                                      for m in c.messages]}, ensure_ascii=False) + "\n"
                   for c in convs)
    if path.exists() and path.read_text(encoding="utf-8") != text:
        if any((path.parent.parent / "arms").glob("*/config.yaml")):
            raise UsageError(f"{path} holds other data than this command makes (another --data, --limit, "
                             "--heldout-fraction or --seed?), and arms were trained on it; give another --out")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")  # every process may write: same bytes, atomic rename
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def estimate_steps(b: TrainConfig, examples) -> int:
    """Optimizer steps the trainer will take on `examples` (for the eval cadence and the --budget cap): the trainer's
    own arithmetic (imtune.plan), on as many processes as this command runs in."""
    from .plan import micro_batches_per_epoch, schedule

    return schedule(b, micro_batches_per_epoch(b, examples), int(os.environ.get("WORLD_SIZE", "1"))).total_steps


def fixed_sample(items: list, n: int | None, seed: int, salt: int) -> list:
    """The same n items for every arm (sorted back into file order); all of them when n is None or >= len."""
    import numpy as np

    if n is None or n >= len(items):
        return list(items)
    pick = np.random.default_rng([seed, salt]).permutation(len(items))[:n]
    return [items[i] for i in sorted(pick.tolist())]


# ----------------------------------------------------------------------------------------------------------------
# Final evaluation of one arm
def evaluate_arm(s: CompareSettings, arm: Arm, cfg: TrainConfig, data: dict, what: str) -> dict:
    """Output-token loss on (a sample of) the training data and on the test data, their gap, memorisation BLEU,
    test exact match and benchmarks of RUN/final; the test output loss of RUN/best (when kept). Per-example output
    losses ride along (results["per_example"], for the intervals). Cached in RUN/eval/compare.json per settings.
    The losses are imtune.evaluate.run.evaluate_run's, scored as the run was trained (template, system prompt,
    max length, truncation: the run's own config.yaml)."""
    from .rundir import read_run

    run = read_run(cfg.output_dir)
    cache = run.path / "eval" / "compare.json"
    key = hashlib.sha256(json.dumps([s.eval_settings(), data["train_path"], data["test_path"],
                                     file_digest(data["train_path"]), file_digest(data["test_path"]),
                                     run.done_text()], sort_keys=True).encode()).hexdigest()[:16]
    cached = read_json(cache)
    if cached and cached.get("key") == key:
        say(f"{what}: already evaluated ({cache}); skipping")
        return cached["results"]

    import torch

    from .evaluate.run import DataSet, evaluate_run, scoring_as_trained
    from .models import load_model, load_tokenizer

    t0 = time.perf_counter()
    device = s.device if s.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    tok = load_tokenizer(str(run.final))
    model = load_model(str(run.final)).to(device)
    say(f"{what}: evaluating {run.final} on {device}")
    test = DataSet(tuple(data["test"]))
    steps = json.loads(run.done_text())["steps"]
    trained = scored_in_training(run, data, steps)  # the trainer scored final/ on test.jsonl already
    ev = evaluate_run(run, model, tok, train=DataSet(tuple(fixed_sample(data["train"], s.loss_samples, cfg.seed, 1))),
                      heldout=None if trained else test, per_example=True)
    res: dict = {"per_example": {}}
    res["train"], res["per_example"]["train"] = output_loss(ev.train.loss)
    res["heldout"], res["per_example"]["heldout"] = trained or output_loss(ev.heldout.loss)
    res["gap"] = ev.output_gap if not trained else res["heldout"]["output_loss"] - res["train"]["output_loss"]
    res.update(generation_scores(s, model, tok, scoring_as_trained(run).renderer(tok), run.path, cfg, data))
    del model
    best = run.path / "best"
    if (best / "best.json").exists():  # the checkpoint selected on val.jsonl, scored on test.jsonl like final/
        info = json.loads((best / "best.json").read_text(encoding="utf-8"))
        trained = scored_in_training(run, data, info["step"])
        if not trained:
            model = load_model(str(best)).to(device)
            scored = evaluate_run(run, model, tok, train=None, heldout=test, per_example=True)
            trained = output_loss(scored.heldout.loss)
            del model
        ho_best, res["per_example"]["best_heldout"] = trained
        res["best"] = {**info, "heldout": ho_best}
    res["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(cache, {"key": key, "settings": s.eval_settings(), "results": res})
    say(f"  train output loss {fmt(res['train']['output_loss'])}, test {fmt(res['heldout']['output_loss'])}, "
        f"gap {fmt(res['gap'])}"
        + (f", best checkpoint (step {res['best']['step']}) test {fmt(res['best']['heldout']['output_loss'])}"
           if "best" in res else "")
        + (f", BLEU-to-train {fmt(res['bleu']['corpus_bleu'], 2)}" if "bleu" in res else "")
        + (f", test exact match {res['exact_match']['accuracy']:.1%}" if "exact_match" in res else "")
        + f" ({res['seconds']:.0f}s)")
    return res


def generation_scores(s: CompareSettings, model, tok, renderer, run_dir: Path, cfg: TrainConfig, data: dict) -> dict:
    """Memorisation BLEU on a fixed sample of training prompts, test exact match, and the benchmarks of one model
    (answers greedily, rendered as the run was trained)."""
    from .evaluate.bleu import generation_rows, memorisation_bleu
    from .generate import GenerationConfig
    from .synth import exact_match

    res: dict = {}
    gen = GenerationConfig(max_new_tokens=s.max_new_tokens, batch_size=8)
    if s.bleu_samples:
        sample = fixed_sample(data["train"], s.bleu_samples, cfg.seed, 2)
        b = memorisation_bleu(model, tok, renderer, sample, gen_cfg=gen)
        words = [len(r["reference"].split()) for r in b["rows"]]
        res["bleu"] = {"n": b["n"], "corpus_bleu": b["corpus_bleu"], "sentence_bleu_mean": b["sentence_bleu_mean"],
                       "sentence_bleu": b["sentence_bleu"], "signature": b["signature"],
                       "reference_words_mean": sum(words) / max(len(words), 1)}
        write_jsonl(run_dir / "eval" / "compare-bleu.jsonl", b["rows"])
    if s.exact_match:
        rows = generation_rows(model, tok, renderer, data["test"], gen, limit=s.exact_match)
        correct = [bool(exact_match(r["output"], r["reference"])) for r in rows if r["reference"] is not None]
        res["exact_match"] = {"n": len(correct), "accuracy": sum(correct) / max(len(correct), 1),
                              "correct": correct}
        write_jsonl(run_dir / "eval" / "compare-exact-match.jsonl",
                    [{**r, "correct": exact_match(r["output"], r["reference"])} for r in rows])
    if s.bench:
        res["bench"] = benchmarks(s, model, tok, renderer, run_dir)
    return res


def benchmarks(s: CompareSettings, model, tok, renderer, run_dir: Path) -> dict:
    """label -> {benchmark, metric, value, n, standard_error, scale, judge} for each --bench of one model."""
    from .generate import GenerationConfig
    from .tasks import JUDGED, run_benchmark

    out = {}
    for name, path in s.bench:
        say(f"  benchmark {name} ({path}, limit {s.bench_limit or 'none'})")
        judged = name in JUDGED
        b = run_benchmark(name, model, tok, renderer, path, s.bench_limit, out_dir=run_dir / "eval" / "bench",
                          gen_cfg=GenerationConfig(max_new_tokens=s.bench_max_new_tokens)
                          if s.bench_max_new_tokens else None, **(s.judge if judged else {}))
        metric = next((m for m in ("accuracy", "task_average", "win_rate", "score") if m in b), None) or \
            next((m for m in b if m.startswith("pass@")), None)
        out[b.get("label", name)] = {
            "benchmark": name, "metric": metric, "value": b.get(metric) if metric else None, "n": b.get("n"),
            "standard_error": b.get("standard_error"), "scale": "1-10" if metric == "score" else "fraction",
            "judge": s.judge.get("judge_model") if judged else None}
    return out


def scored_in_training(run, data: dict, step: int) -> tuple[dict, dict] | None:
    """(summary, per-example output sums) of the model at `step` on the test data, as the trainer scored it
    (metrics.jsonl "eval_examples": its evaluation set `eval` is test.jsonl, read as training reads data), or None
    when the run did not score the test data at that step. The model evaluated then is the one saved as final/ (the
    last step) or best/ (its step), so scoring it again would repeat the same forward passes. Sources are named as
    evaluate_run names them (the held-out file's records that test.jsonl holds, line by line), so the intervals pair
    the same examples however each run was scored."""
    if run.config.eval_data != str(data["test_path"]):
        return None
    at = [r["sets"].get("eval") for r in run.metrics("eval_examples") if r["step"] == step]
    if not at or at[-1] is None:
        return None
    p, lines = dict(at[-1]), {f"{data['test_path']}:{i}": str(c.source) for i, c in enumerate(data["test"], 1)}
    if not all(x in lines for x in p["source"]):
        return None
    p["source"] = [lines[x] for x in p["source"]]
    tokens = sum(p["output_tokens"])
    return ({"n": len(p["source"]), "output_loss": math.fsum(p["output_nll"]) / tokens if tokens else None,
             "output_tokens": tokens, "instruction_loss": None, "scored": f"in training (step {step})"}, p)


def output_loss(r: dict) -> tuple[dict, dict]:
    """(summary, per-example output sums) of one evaluate_loss result (imtune.evaluate.loss, per_example=True)."""
    return ({"n": r["n"], "output_loss": r["output"]["nll"], "output_tokens": r["output"]["tokens"],
             "instruction_loss": r["instruction"]["nll"], "truncated": r["truncated"], "skipped": len(r["skipped"])},
            r["per_example"])


# ----------------------------------------------------------------------------------------------------------------
# Small helpers
def fmt(x, digits: int = 4) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
