"""`compare(settings) -> COMPARE_DIR`: train several loss arms on the same data, evaluate each, write a report.

    data (imtune.experiments.data) ─▶ arms ─▶ one run directory each (imtune.train.loop: same model, data, order, budget
         and seed) ─▶ final evaluation (imtune.experiments.score) ─▶ compare.json ─▶ report.md / report.html
         (imtune.report.write)

An arm is a loss mode plus optional regularisers (ARM_FORMS): `it`, `im`, `all`, `weighted:0.1`, `im+neftune:5`,
`it+kl:1`. Everything else (model, data, epochs, lr, ...) comes from one TrainConfig shared by every arm; every arm
is trained once per seed (--seeds; default the one --seed).

    COMPARE_DIR/
      .imtune             the marker: imtune made this directory (imtune.files.claim); any other is refused
      compare.json        settings, command lines, data stats + recommendation, per-arm results (mean over seeds,
                          spread, per-seed runs), intervals against the reference arm (imtune.experiments.aggregate),
                          the verdict, versions (imtune, torch, transformers, python, model fingerprint:
                          imtune.model.provenance),
                          where the time and memory went per phase ("time", "memory": imtune.train.clock)
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
an unfinished run continues from its newest checkpoint. Without --save-every(-minutes) every run writes a checkpoint
once CHECKPOINT_MINUTES of training have passed since its last one (only the newest kept, removed once the run is
done), so Ctrl-C loses at most that much training; it raises types.Interrupted with what was kept (`kept`), which
imtune.cli prints with the command that continues. An arm trained with other settings is never mixed in: the
run stops and says which setting differs. The report reads only compare.json and the run directories, so
`imtune compare --report-only DIR` rebuilds it.
"""
from __future__ import annotations

import gc
import os
import time
from pathlib import Path

from imtune import files
from imtune.config import TrainConfig
from imtune.console import is_main_process, say
from imtune.experiments.aggregate import aggregate
from imtune.experiments.arms import KEEP, Arm, CompareSettings, read_json
from imtune.experiments.data import materialise_data
from imtune.experiments.jobs import Job, train_all
from imtune.experiments.score import evaluate_arm
from imtune.model.memory import release
from imtune.model.provenance import versions
from imtune.report import write as report
from imtune.report.runs import read_summary
from imtune.results import VERSION, ArmResult, CompareResult, Evidence
from imtune.rundir import checkpoint as ckpt
from imtune.rundir.guard import config_changes
from imtune.rundir.integrity import latest_checkpoint
from imtune.rundir.read import best_model, metrics
from imtune.train.clock import Clock, of_comparison
from imtune.train.cost import estimate
from imtune.types import Interrupted, UsageError

CHECKPOINT_MINUTES = 10.0  # without --save-every(-minutes): Ctrl-C loses at most this much of a run's training


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
        except KeyboardInterrupt:  # Ctrl-C (children stopped by imtune.experiments.jobs): what was kept, what resumes
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
    out, clock = Path(s.out), Clock()  # where the time goes: compare.json "time" and "memory" (imtune.train.clock)
    with clock.phase("startup"):
        import torch  # noqa: F401  (imported here, their cost shows as start-up)
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
    seeds, ref = s.seed_list(), s.reference_arm()
    with clock.phase("data"):
        data = materialise_data(s, out)
    if not s.dry_run:  # a dry run makes no run directories
        files.make_dirs(out / "arms", out)
    base = base_config(s, data)
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
    if ((todo and s.plan) or s.dry_run) and is_main_process():  # the cost before the first step (imtune.train.cost)
        with clock.phase("estimate"):
            s.planned = estimate(s, data, base, len(todo))
            say(s.planned.text())
    if s.dry_run:
        say(f"--dry-run: nothing trained (the data split is written under {out / 'data'})")
        return out
    with clock.phase(None):  # every run times itself (metrics.jsonl's "timing" line)
        train_all(todo, s.jobs, say, s.ray)
    with clock.phase("cleanup"):
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
        with clock.phase("cleanup"):  # the models --keep does not keep; the memory of this evaluation's model
            tidy(s, Path(cfg.output_dir))
            free_memory()
    with clock.phase("report"):  # 3. intervals, verdict, compare.json, report.md/html
        commands = earlier_commands(out)
        commands.append({"argv": s.argv, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "cwd": os.getcwd()})
        arms = [{"spec": a.spec, "name": a.name, "dir": str(Path("arms") / a.name), "overrides": a.overrides,
                 "runs": [{"seed": seed, "dir": str(Path("arms") / a.name / f"seed-{seed}"),
                           "results": results[a.name, seed]} for seed in seeds]} for a in s.arms]
        evidence = aggregate(arms, ref.name)  # per-arm means, spreads and intervals; strips per-example lists
        summary = CompareResult(
            version=VERSION, dir=str(out), commands=commands,
            settings={"base_config": base.to_dict(), "eval": s.eval_settings(),
                      "heldout_fraction": s.heldout_fraction, "seeds": seeds, "reference": ref.spec,
                      "val_fraction": s.val_fraction},
            data={k: v for k, v in data.items() if k not in ("train", "heldout", "val", "test")},
            arms=tuple(ArmResult.from_json(a) for a in arms), evidence=Evidence.from_json(evidence),
            versions=versions(base.model))
        summary = summary.replace(verdict=report.verdict(summary, out))
        files.write_json(out / "compare.json", summary.to_json(), root=out)
        report.write_report(out)
    trained = {c.cfg.output_dir for c in todo}
    time_, memory, spent = of_comparison(clock, [(cfg.output_dir, cfg.output_dir in trained) for _, _, cfg in runs],
                                         [results[arm.name, seed].get("time") for arm, seed, _ in runs])
    summary = summary.replace(time=time_, memory=memory)
    files.write_json(out / "compare.json", summary.to_json(), root=out)  # again, with the report's own time
    say(f"compare: {len(s.arms)} arms x {len(seeds)} seeds; {spent}")
    return out


def earlier_commands(out: Path) -> list[dict]:
    """The command lines of the comparison already in `out` (compare.json "commands"; [] when there is none)."""
    try:
        return read_summary(out).commands
    except UsageError:
        return []


def base_config(s: CompareSettings, data: dict) -> TrainConfig:
    """The config every arm starts from: the materialised data files, the step cap, the evaluation cadence and the
    checkpoints that make Ctrl-C cheap. Caps data["steps"] as the runs will."""
    base = s.base.replace(data=str(data["train_path"]), eval_data=str(data["test_path"]), format="messages",
                          fields={}, limit=None, val_data=data["val_path"], keep_best=data["val_path"] is not None)
    if s.max_steps_cap and data["steps"] > s.max_steps_cap:
        base = base.replace(max_steps=s.max_steps_cap)
        data["steps"] = s.max_steps_cap
    if base.eval_every is None:
        base = base.replace(eval_every=default_eval_every(data["steps"]))
    if base.save_every is None and base.save_every_minutes is None and s.checkpoints:
        # Ctrl-C costs at most CHECKPOINT_MINUTES of training: a checkpoint once that long has passed since the last
        # one, only the newest kept, removed once the run is done (tidy). A checkpoint at every evaluation point, as
        # before, cost a fifth of a short default-model compare: weights and AdamW state are 1.6 GB to write (~6 s
        # here), and a run's last one, never used, was written too (2026-12-07: saving 19% of a 4-run compare's time).
        base = base.replace(save_every_minutes=CHECKPOINT_MINUTES, keep_checkpoints=1)
    elif base.save_every is None and base.save_every_minutes is None:
        say("compare: no checkpoints (--save-every not given): a run in progress at Ctrl-C starts over")
    return base


def arm_config(base: TrainConfig, arm: Arm, out: Path, seed: int) -> TrainConfig:
    return base.replace(**arm.overrides, seed=seed, output_dir=str(out / "arms" / arm.name / f"seed-{seed}"))


def check_same_training(run_dir: Path, cfg: TrainConfig) -> None:
    """A run directory that exists must have been made by this very arm config (up to the settings that do not change
    what is trained: imtune.rundir.guard.HARMLESS); otherwise say what differs and what to do."""
    diff = config_changes(run_dir, cfg)
    if diff:
        shown = ", ".join(f"{k}: {was!r} -> {now!r}" for k, (was, now) in list(diff.items())[:6]) + \
            (f" and {len(diff) - 6} more" if len(diff) > 6 else "")
        raise UsageError(f"{run_dir} was trained with other settings ({shown}); re-run with the same flags to "
                         f"resume, or give another --out (or delete {run_dir})")




def is_trained(run_dir: Path) -> bool:
    """The run finished training (RUN/DONE is written last), whether or not --keep removed its models since."""
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
    drop = ["checkpoints"] if s.base.save_every is None or s.keep == "none" else []  # time-based ones: for Ctrl-C
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
    """Between runs: the last run's model and optimizer, collected and given back to the system."""
    gc.collect()
    release()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass






