"""Train a list of runs (compare's arms x seeds): one after another in this process, or several side by side.

Why side by side: a 135M model's matrices at ~120 tokens per step are too small for two CPU threads to share one
product well. On the 2-core AMD EPYC build machine, two 1-thread runs of SmolLM2-135M (12 steps each, batch 1) took
66 s together where one 2-thread run took 50 s for one: 1.5x the training throughput. `jobs` > 1 starts each run in
its own process (spawn, so no forked torch state) with cores // jobs torch threads unless --threads says otherwise;
its output goes to RUN/train.log, and this process prints one line when each run starts and ends. A run that fails
stops the others and names its log. Under `accelerate launch` (several processes per run) runs go one at a time.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path

from .config import TrainConfig
from .types import UsageError


@dataclass(frozen=True)
class Job:
    label: str  # e.g. "[2/4] arm im seed 0"
    cfg: TrainConfig


def train_all(jobs: list[Job], parallel: int, say) -> None:
    """Train every job's config to its end (finished runs are the caller's to skip)."""
    from .train import train

    if parallel <= 1 or len(jobs) <= 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        for job in jobs:
            say(f"{job.label}: training -> {job.cfg.output_dir}")
            train(job.cfg)
        return
    threads = max(1, (os.cpu_count() or 1) // parallel)
    ctx, waiting, running = mp.get_context("spawn"), list(jobs), {}
    t0 = time.perf_counter()
    try:
        while waiting or running:
            while waiting and len(running) < parallel:
                job = waiting.pop(0)
                cfg = job.cfg.replace(progress=False, threads=job.cfg.threads or threads)
                log = Path(cfg.output_dir) / "train.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                p = ctx.Process(target=_train_logged, args=(cfg, str(log)), name=job.label)
                p.start()
                running[p.sentinel] = (p, job, log, time.perf_counter())
                say(f"{job.label}: training -> {cfg.output_dir} ({cfg.threads} thread(s), side by side with up to "
                    f"{parallel - 1} other run(s); log {log})")
            for sentinel in wait(list(running)):
                p, job, log, started = running.pop(sentinel)
                p.join()
                if p.exitcode != 0:
                    raise UsageError(f"{job.label} failed (exit {p.exitcode}); its log {log} ends:\n"
                                     + _tail(log))
                say(f"{job.label}: trained in {time.perf_counter() - started:.0f}s "
                    f"(elapsed {time.perf_counter() - t0:.0f}s)")
    finally:
        for p, *_ in running.values():  # a failure or Ctrl-C: stop the others (their checkpoints resume)
            p.terminate()
            p.join()


def _train_logged(cfg: TrainConfig, log: str) -> None:
    """In the child: everything it prints (Python and native) goes to the run's train.log."""
    from .train import train

    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush(), sys.stderr.flush()
    os.dup2(fd, 1), os.dup2(fd, 2)
    try:
        train(cfg)
    except UsageError as e:
        print(f"imtune: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join("  " + x for x in path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "  (no log)"
