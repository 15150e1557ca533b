"""Train a list of runs (compare's arms x seeds): one after another in this process, or several side by side.

Why side by side: where one run cannot use every core (many cores, a small model). On the 2-core AMD EPYC build
machine, SmolLM2-135M (make demo, 2026-12-01): two 1-thread runs of 24 steps side by side took 166 s per pair, and the
same runs one after another with 2 threads ~205 s per pair (small matmuls do not use 2 threads well). Evaluations are
not run this way (imtune.experiments.compare runs them in its own process: side by side, every child imports torch and
transformers again and they were slower). Measure before relying on it. `jobs` > 1 starts each run in its own process
(spawn, so no forked torch state) with cores // jobs torch threads unless --threads says otherwise; its output goes to
RUN/train.log, and this process prints one line when each run starts and ends. A run that fails stops the others and
names its log. Under `accelerate launch` (several processes per run) runs go one at a time.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path

from imtune import files
from imtune.config import TrainConfig
from imtune.experiments.ray_jobs import train_on_ray
from imtune.train.loop import train
from imtune.types import UsageError


@dataclass(frozen=True)
class Job:
    label: str  # e.g. "[2/4] arm im seed 0"
    cfg: TrainConfig


@dataclass(frozen=True)
class Task:
    """One call run in a child process: `target(*args)`, its output (Python and native) appended to `log`."""
    label: str
    target: Callable
    args: tuple
    log: Path
    threads: int  # torch threads in the child
    done: str = "done"  # the verb of the line printed when it ends ("trained", "evaluated")


def train_all(jobs: list[Job], parallel: int, say, ray=None) -> None:
    """Train every job's config to its end (finished runs are the caller's to skip): on a Ray cluster when `ray` (an
    imtune.experiments.ray_jobs.RayPlan) is given, else here."""
    for job in jobs:  # claimed here (imtune.files), before a train.log is opened in it
        files.claim(job.cfg.output_dir, "run")
    if ray is not None and jobs:
        return train_on_ray(jobs, ray, say)
    if not side_by_side_ok(parallel, len(jobs)):
        for job in jobs:
            say(f"{job.label}: training -> {job.cfg.output_dir}")
            train(job.cfg)
        return
    threads = max(1, (os.cpu_count() or 1) // parallel)
    tasks = []
    for job in jobs:
        cfg = job.cfg.replace(progress=False, threads=job.cfg.threads or threads)
        tasks.append(Task(job.label, train, (cfg,), Path(cfg.output_dir) / "train.log", cfg.threads, "trained"))
    side_by_side(tasks, parallel, say, gpu_groups(visible_gpus(), parallel))


def visible_gpus() -> list[str]:
    """The GPUs this process may use (CUDA_VISIBLE_DEVICES as given, else 0..count-1); none without CUDA."""
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [d for d in given.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def gpu_groups(gpus: list[str], parallel: int) -> list[str | None]:
    """One CUDA_VISIBLE_DEVICES value per concurrent slot: the GPUs dealt out so that runs side by side never share
    one (8 GPUs, --jobs 4: "0,1", "2,3", ...). Fewer GPUs than slots: the runs share them round robin (said by the
    caller); no GPUs: None (CPU runs)."""
    if not gpus:
        return [None] * parallel
    if len(gpus) < parallel:
        return [gpus[i % len(gpus)] for i in range(parallel)]
    per = len(gpus) // parallel
    return [",".join(gpus[i * per:(i + 1) * per]) for i in range(parallel)]


def side_by_side_ok(parallel: int, n: int) -> bool:
    """Several at once only when asked, worth it, and not under `accelerate launch` (there each run uses every
    process)."""
    return parallel > 1 and n > 1 and int(os.environ.get("WORLD_SIZE", "1")) <= 1


def side_by_side(tasks: list[Task], parallel: int, say, slots: list[str | None] | None = None) -> None:
    """Run the tasks, at most `parallel` at a time, each in a spawned process (slot i's CUDA_VISIBLE_DEVICES, see
    gpu_groups); a failure stops the others and raises a UsageError naming the failed task's log."""
    ctx, waiting, running = mp.get_context("spawn"), list(tasks), {}
    free = list(slots or [None] * parallel)
    t0 = time.perf_counter()
    try:
        while waiting or running:
            while waiting and len(running) < parallel:
                task, slot = waiting.pop(0), free.pop(0)
                files.make_dirs(task.log.parent)
                p = ctx.Process(target=_child, args=(task.target, task.args, str(task.log), task.threads, slot),
                                name=task.label)
                with sigint_ignored():  # inherited: the child starts deaf to Ctrl-C until _child listens (no
                    p.start()  # traceback of a half-started interpreter on the terminal)
                running[p.sentinel] = (p, task, time.perf_counter(), slot)
                gpu = f", GPU {slot}" if slot is not None else ""
                say(f"{task.label}: started ({task.threads} thread(s){gpu}, side by side with up to {parallel - 1} "
                    f"other(s); log {task.log})")
            for sentinel in wait(list(running)):
                p, task, started, slot = running.pop(sentinel)
                free.append(slot)
                p.join()
                if p.exitcode in (130, -signal.SIGINT):  # stopped by the Ctrl-C this process is about to hear too
                    raise KeyboardInterrupt
                if p.exitcode != 0:
                    raise UsageError(f"{task.label} failed (exit {p.exitcode}); its log {task.log} ends:\n"
                                     + _tail(task.log))
                say(f"{task.label}: {task.done} in {time.perf_counter() - started:.0f}s "
                    f"(elapsed {time.perf_counter() - t0:.0f}s)")
    except KeyboardInterrupt:  # Ctrl-C: each child stops as at a Ctrl-C of its own (it got one when the whole
        stop([p for p, *_ in running.values()], signal.SIGINT)  # terminal's group did), leaving a checkpoint to resume
        running.clear()
        raise
    finally:
        stop([p for p, *_ in running.values()], signal.SIGTERM)  # a failure: stop the others (checkpoints resume)


def stop(procs: list, sig: int, wait_s: float = 30.0) -> None:
    """Send `sig` to the children still running, give them `wait_s` seconds to end (a SIGINT'ed trainer releases its
    run directory; a checkpoint being written is left as a temporary directory that the resume removes), then kill
    the rest."""
    for p in procs:
        if p.is_alive():
            os.kill(p.pid, sig)
    deadline = time.monotonic() + wait_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


@contextmanager
def sigint_ignored():
    """SIGINT ignored while the block runs (in the main thread; elsewhere nothing changes). A process started inside
    inherits the ignored SIGINT, and Python then installs no KeyboardInterrupt handler of its own."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


def _child(target: Callable, args: tuple, log: str, threads: int, gpus: str | None = None) -> None:
    """In the child: everything it prints (Python and native) goes to `log`; torch uses `threads` threads and sees
    only the GPUs of its slot (set before torch is imported here: spawn starts a fresh interpreter). Ctrl-C (the
    terminal's, which reaches the whole process group, or the parent's SIGINT) is heard from here on: the run stops
    as a Ctrl-C stops it, and the parent alone says what was kept."""
    if gpus is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus
    fd = files.open_fd(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, mode=0o644)  # O_NOFOLLOW
    sys.stdout.flush(), sys.stderr.flush()
    os.dup2(fd, 1), os.dup2(fd, 2)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # started ignoring it (sigint_ignored)
    import torch

    torch.set_num_threads(threads)
    try:
        target(*args)
    except UsageError as e:
        print(f"imtune: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: the parent alone reports it
        print("imtune: interrupted (the parent process says what was kept)", file=sys.stderr, flush=True)
        sys.exit(130)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join("  " + x for x in path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "  (no log)"
