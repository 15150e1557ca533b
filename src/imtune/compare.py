"""`compare(settings) -> COMPARE_DIR`: train several loss arms on the same data, evaluate each, write a report.

    data (imtune.compare_data) ─▶ arms ─▶ one run directory each (imtune.train: same model, data, order, budget
         and seed) ─▶ final evaluation (imtune.compare_eval) ─▶ compare.json ─▶ report.md / report.html (imtune.report)

An arm is a loss mode plus optional regularisers (ARM_FORMS): `it`, `im`, `all`, `weighted:0.1`, `im+neftune:5`,
`it+kl:1`. Everything else (model, data, epochs, lr, ...) comes from one TrainConfig shared by every arm; every arm
is trained once per seed (--seeds; default the one --seed).

    COMPARE_DIR/
      .imtune             the marker: imtune made this directory (imtune.files.claim); any other is refused
      compare.json        settings, command lines, data stats + recommendation, per-arm results (mean over seeds,
                          spread, per-seed runs), intervals against the reference arm (imtune.aggregate), the verdict,
                          versions (imtune, torch, transformers, python, model fingerprint: imtune.provenance),
                          where the time and memory went per phase ("time", "memory": imtune.clock)
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
an unfinished run continues from its newest checkpoint. Without --save-every every run writes a checkpoint at each
evaluation point (only the newest kept, removed once the run is done), so Ctrl-C loses at most one evaluation
interval; it raises types.Interrupted with what was kept (`kept`), which imtune.cli prints with the command that
continues. An arm trained with other settings is never mixed in: the
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

from . import files
from .config import TrainConfig
from .runlog import is_main_process, say
from .types import Interrupted, UsageError

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
    spec = spec.strip().lower()  # IM, Weighted:0.1: arms are case-insensitive
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
    dry_run: bool = False  # print the plan and its estimated cost, train nothing
    ray: object = None  # imtune.ray_jobs.RayPlan: train the grid on a Ray cluster (--executor ray)
    max_new_tokens: int = 128
    bench: list[tuple[str, str]] = field(default_factory=list)  # (benchmark, data path)
    bench_limit: int | None = None
    # LLM judge of the judged benchmarks (alpacaeval, mtbench): judge_url, judge_model, judge_api_key_env, judge_cache.
    # One judge for every arm of a comparison: scores under different judges are never compared.
    judge: dict = field(default_factory=dict)
    bench_max_new_tokens: int | None = None  # answer length for benchmarks (None: each benchmark's own)
    device: str = "auto"
    jobs: int = 1  # runs trained side by side (imtune.schedule); 1: one after another in this process
    keep: str = "both"  # which models of each run stay on disk after its evaluation (KEEP)
    checkpoints: bool = True  # without --save-every: a checkpoint at each evaluation point, for Ctrl-C (demo: off)
    plan: bool = True  # print the measured plan before the first step (demo: off, its fixed cost is stated instead)
    planned: object = None  # --dry-run: the imtune.cost.Cost it printed (sweep and study add up their grid's)
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
    """Every argument is checked before anything is written; COMPARE_DIR is claimed (imtune.files: created and
    marked, or refused when it is somebody else's) and removed again when the comparison fails before training."""
    check_settings(s)
    files.check_claim(s.out, "compare")
    with files.protecting(s.base.data, s.base.eval_data, s.val_data), \
            files.claiming(s.out, "compare", unused=nothing_trained):
        try:
            return run_comparison(s)
        except KeyboardInterrupt:  # Ctrl-C (children stopped by imtune.schedule): what was kept, what resumes
            lines = kept(s)
            for a in s.arms:  # the runs that never started: their claimed, empty directories go
                for seed in s.seed_list():
                    files.unclaim(Path(s.out) / "arms" / a.name / f"seed-{seed}", Path(s.out) / "arms" / a.name)
            raise Interrupted(lines) from None


def nothing_trained(out: Path) -> bool:
    """No run of the comparison in `out` began training (none has a metrics.jsonl) and it has no results: what a
    comparison that failed before training leaves (a data split, empty run directories) is worth nothing."""
    return not (Path(out) / "compare.json").exists() and not any(Path(out).glob("arms/*/*/metrics.jsonl"))


def check_settings(s: CompareSettings) -> None:
    """The arguments of a comparison that can be judged without reading data (UsageError for the first bad one);
    sweep and study call it too, before they claim their own directory."""
    seeds = s.seed_list()
    s.reference_arm()
    if s.keep not in KEEP:
        raise UsageError(f"--keep {s.keep!r}: valid: {', '.join(KEEP)}")
    if s.jobs < 1:
        raise UsageError(f"--jobs must be >= 1, not {s.jobs}")
    if len(set(seeds)) < len(seeds):
        raise UsageError(f"--seeds {','.join(map(str, seeds))} names a seed twice")
    if not 0 <= s.val_fraction < 1:
        raise UsageError(f"--val-fraction must be >= 0 and < 1, not {s.val_fraction}")
    if not s.base.eval_data and not 0 < s.heldout_fraction < 1:
        raise UsageError(f"--heldout-fraction must be between 0 and 1, not {s.heldout_fraction}")
    for arm in s.arms:
        s.base.replace(**arm.overrides).check()


def run_comparison(s: CompareSettings) -> Path:
    from . import checkpoint as ckpt, report
    from .aggregate import aggregate
    from .clock import Clock, of_comparison
    from .compare_data import materialise_data
    from .compare_eval import evaluate_arm
    from .provenance import versions
    from .schedule import Job, train_all

    out, clock = Path(s.out), Clock()  # where the time goes: compare.json "time" and "memory" (imtune.clock)
    with clock.phase("startup"):
        import torch  # noqa: F401  (imported here, their cost shows as start-up)
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
    old = read_json(out / "compare.json")
    seeds, ref = s.seed_list(), s.reference_arm()
    with clock.phase("data"):
        data = materialise_data(s, out)
    if not s.dry_run:  # a dry run makes no run directories
        files.make_dirs(out / "arms", out)
    base = s.base.replace(data=str(data["train_path"]), eval_data=str(data["test_path"]), format="messages",
                          fields={}, limit=None, val_data=data["val_path"], keep_best=data["val_path"] is not None)
    if s.max_steps_cap and data["steps"] > s.max_steps_cap:
        base = base.replace(max_steps=s.max_steps_cap)
        data["steps"] = s.max_steps_cap
    if base.eval_every is None:
        base = base.replace(eval_every=default_eval_every(data["steps"]))
    if base.save_every is None and s.checkpoints:
        # Ctrl-C costs at most one evaluation interval: a checkpoint at each evaluation point, only the newest kept,
        # removed once the run is done (tidy)
        base = base.replace(save_every=base.eval_every, keep_checkpoints=1)
    elif base.save_every is None:
        say("compare: no checkpoints (--save-every not given): a run in progress at Ctrl-C starts over")
    runs = [(arm, seed, arm_config(base, arm, out, seed)) for arm in s.arms for seed in seeds]
    for _, _, cfg in runs:  # every run is checked before any trains: a mistake costs no training time
        check_same_training(Path(cfg.output_dir), cfg.check())

    todo = []  # 1. train every arm x seed not yet trained (every process, under accelerate)
    for i, (arm, seed, cfg) in enumerate(runs, 1):
        run_dir, what = Path(cfg.output_dir), f"[{i}/{len(runs)}] arm {arm.spec} seed {seed}"
        if is_trained(run_dir):
            say(f"{what}: already trained ({run_dir}/DONE); skipping training")
            continue
        todo.append(Job(what, cfg.replace(resume="auto") if ckpt.latest_checkpoint(run_dir) is not None else cfg))
    if ((todo and s.plan) or s.dry_run) and is_main_process():  # the cost before the first step (imtune.cost)
        from .cost import estimate

        with clock.phase("estimate"):
            s.planned = estimate(s, data, base, len(todo))
            say(s.planned.text())
    if s.dry_run:
        say(f"--dry-run: nothing trained (the data split is written under {out / 'data'})")
        return out
    with clock.phase(None):  # every run times itself (metrics.jsonl's "timing" line)
        train_all(todo, s.jobs, say, s.ray)
        free_memory()
    if not is_main_process():
        return out

    results = {}
    # 2. evaluate final/ and best/ of each run (rank 0 only), one after another in this process whatever --jobs says:
    # side by side, each child imports torch and transformers again, and on the 2-core build machine two demo
    # evaluations took 45 s per pair against ~10 s each here (2026-12-01).
    for i, (arm, seed, cfg) in enumerate(runs, 1):
        with clock.phase(None):  # the evaluation times itself (results["time"])
            check_models(s, Path(cfg.output_dir))
            results[arm.name, seed] = evaluate_arm(s, arm, cfg, data, f"[{i}/{len(runs)}] arm {arm.spec} seed {seed}")
            tidy(s, Path(cfg.output_dir))
            free_memory()
    with clock.phase("report"):  # 3. intervals, verdict, compare.json, report.md/html
        commands = (old or {}).get("commands", [])
        commands.append({"argv": s.argv, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "cwd": os.getcwd()})
        arms = [{"spec": a.spec, "name": a.name, "dir": str(Path("arms") / a.name), "overrides": a.overrides,
                 "runs": [{"seed": seed, "dir": str(Path("arms") / a.name / f"seed-{seed}"),
                           "results": results[a.name, seed]} for seed in seeds]} for a in s.arms]
        evidence = aggregate(arms, ref.name)  # per-arm means, spreads and intervals; strips per-example lists
        summary = {
            "version": 2, "dir": str(out), "commands": commands,
            "settings": {"base_config": base.to_dict(), "eval": s.eval_settings(),
                         "heldout_fraction": s.heldout_fraction, "seeds": seeds, "reference": ref.spec,
                         "val_fraction": s.val_fraction},
            "data": {k: v for k, v in data.items() if k not in ("train", "heldout", "val", "test")},
            "arms": arms, "evidence": evidence, "versions": versions(base.model),
        }
        summary["verdict"] = report.verdict(summary, out)
        files.write_json(out / "compare.json", summary, root=out)
        report.write_report(out)
    trained = {c.cfg.output_dir for c in todo}
    summary["time"], summary["memory"], spent = of_comparison(
        clock, [(cfg.output_dir, cfg.output_dir in trained) for _, _, cfg in runs],
        [results[arm.name, seed].get("time") for arm, seed, _ in runs])
    files.write_json(out / "compare.json", summary, root=out)  # again, with the report's own time
    say(f"compare: {len(s.arms)} arms x {len(seeds)} seeds; {spent}")
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


KEEP = ("final", "best", "both", "none")  # --keep: which models of each run stay on disk after its evaluation


def is_trained(run_dir: Path) -> bool:
    """The run finished training (RUN/DONE is written last), whether or not --keep removed its models since."""
    from . import checkpoint as ckpt

    return ckpt.is_finished(run_dir) or (Path(run_dir) / ckpt.DONE).is_file()


def check_models(s: CompareSettings, run_dir: Path) -> None:
    """A run whose final/ --keep removed is evaluated from its cache only (RUN/eval/compare.json, same settings): say
    so rather than fail to load a model that is not there."""
    if not is_trained(run_dir) or (run_dir / "final").is_dir():
        return
    cached = read_json(run_dir / "eval" / "compare.json") or {}
    if cached.get("settings") != s.eval_settings():
        raise UsageError(f"{run_dir}/final was removed after its evaluation (--keep), and this comparison evaluates "
                         "with other settings: re-run with the evaluation flags it was scored with, or train again "
                         "into another --out")


def tidy(s: CompareSettings, run_dir: Path) -> None:
    """After a run's evaluation: remove the checkpoints compare had it write for Ctrl-C (no --save-every given: a
    finished run never resumes), and the models --keep does not keep (--keep best keeps final/ when there is no best/
    or best/ is final/'s model).
    Only directories imtune wrote inside its own run directory, through imtune.files (a link is refused): each is
    renamed out of the way first, so a half-deleted model is never taken for a model."""
    from .rundir import best_model

    drop = ["checkpoints"] if s.base.save_every is None or s.keep == "none" else []
    if s.keep == "none" or s.keep == "best" and best_model(run_dir) == run_dir / "best":  # best/ has its weights
        drop.append("final")
    if s.keep in ("final", "none"):
        drop.append("best")
    for name in drop:
        if (run_dir / name).exists():
            gone = run_dir / f".old-{name}"
            files.remove(gone, run_dir)
            files.rename(run_dir / name, gone, run_dir)
            files.remove(gone, run_dir)


def kept(s: CompareSettings) -> list[str]:
    """What an interrupted comparison leaves, in words: runs trained (and evaluated), each run in progress (the step it
    reached and the checkpoint it resumes from), the runs not started."""
    from .integrity import latest_checkpoint
    from .rundir import metrics

    out = Path(s.out)
    runs = [(f"arm {a.spec} seed {seed}", out / "arms" / a.name / f"seed-{seed}") for a in s.arms
            for seed in s.seed_list()]
    done = [d for _, d in runs if is_trained(d)]
    scored = [d for d in done if (d / "eval" / "compare.json").is_file()]
    lines = [f"kept in {out}: {len(done)} of {len(runs)} runs trained, {len(scored)} evaluated"]
    waiting = 0
    for what, d in runs:
        steps = [] if is_trained(d) or not (d / "metrics.jsonl").is_file() else metrics(d, "train")
        if not steps:
            waiting += not is_trained(d)
            continue
        stats = read_json(d / "data_stats.json") or {}
        total = f" of {stats['total_steps']}" if stats.get("total_steps") else ""
        last = latest_checkpoint(d)
        resumes = (f"resumes from its checkpoint at step {last.name.removeprefix('step-')} ({last})" if last else
                   "no checkpoint yet: starts over")
        lines.append(f"  {what}: stopped at step {steps[-1]['step']}{total}; {resumes}")
    if waiting:
        lines.append(f"  {waiting} run(s) not started")
    if not done and len(lines) == 1 + (waiting > 0):
        lines[0] = f"nothing was trained yet in {out}"
    return lines


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
# Small helpers
def fmt(x, digits: int = 4) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def read_json(path: Path) -> dict | None:
    """A JSON object imtune wrote (None when absent or unreadable); a symbolic link is refused, never followed."""
    if Path(path).is_symlink():
        raise UsageError(f"{path} is a symbolic link: imtune reads its own files only as they are")
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
