"""Where the time of a comparison goes: wall seconds and peak memory per named phase.

    clock = Clock()
    with clock.phase("final_scoring"): ...        a phase inside another stops the outer one's clock meanwhile
    with clock.phase(None): ...                   time another clock measures (a run trained in this process)
    clock.record() -> {"seconds": {phase: s}, "peak_rss_mb": {phase: MB}}         what runs and evaluations store
    total(records) -> the same, summed (seconds) and maxed (memory) over several
    of_comparison(clock, runs, evaluations) -> compare.json's "time" and "memory", and the line compare prints

Time is exclusive: every second between two phase changes goes to the phase running then (the innermost), never to
two. Memory is the peak resident set size of the process while the phase ran: on Linux VmHWM of /proc/self/status,
reset to the current RSS at every phase change by writing "5" to /proc/self/clear_refs (a kernel control, not a
file); where the kernel refuses that, VmHWM is the peak of the whole process so far (an upper bound). Elsewhere
resource.getrusage's ru_maxrss, also the peak so far.

The phases of `imtune compare` (PHASES, in the order they happen): `startup` (importing torch and transformers, each
run's setup: model load and tokenising its data; loading final/ and best/ for evaluation), `data` (materialise_data),
`estimate` (imtune.train.cost's estimate before training, which measures this machine),
`train_steps` (forward, backward, optimizer step), `train_eval` (step 0's and the in-training evaluations),
`saving` (checkpoints, best/, final/), `final_scoring` (loss of final/ and best/), `generation` (BLEU, exact match,
benchmarks), `cleanup` (removing the checkpoints and models a run no longer needs, collecting the garbage a model leaves
between runs: ~0.15 s a time with torch loaded), `report` (intervals, verdict, compare.json, report.md/html, plots),
and `other`: what this invocation spent between them (claiming directories, cache keys, checks), its wall time less
everything measured."""
from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from imtune.rundir.read import metrics as read_metrics

# phase -> how the one-line summary names it
PHASES = {"startup": "start-up", "data": "data", "estimate": "cost estimate", "train_steps": "optimizer steps",
          "train_eval": "in-training evaluation", "saving": "saving", "final_scoring": "final scoring",
          "generation": "generation", "cleanup": "clean-up", "report": "report", "other": "other"}


def peak_rss_mb() -> float:
    """The process's peak resident set size since the last reset_peak() (or since it started), in MiB (2**20 bytes:
    the "mb" of peak_rss_mb and of compare.json's "memory")."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux, bytes on macOS
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def reset_peak() -> bool:
    """Start the peak RSS again from the current RSS (Linux, when permitted); False where it keeps running."""
    try:
        fd = os.open("/proc/self/clear_refs", os.O_WRONLY)
    except OSError:
        return False
    try:
        return os.write(fd, b"5") == 1
    except OSError:
        return False
    finally:
        os.close(fd)


class Clock:
    """Seconds and peak RSS per phase (module docstring). One per process at a time measures memory right: a
    phase change resets the process's peak, so an enclosing clock gives that time to phase None."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.peak_mb: dict[str, float] = {}
        self._running: list[str | None] = []
        self.started = self._since = time.perf_counter()
        reset_peak()

    def _lap(self) -> None:
        """Give the time and the peak since the last phase change to the phase running now."""
        now = time.perf_counter()
        name = self._running[-1] if self._running else None
        if name is not None:
            self.seconds[name] = self.seconds.get(name, 0.0) + now - self._since
            self.peak_mb[name] = max(self.peak_mb.get(name, 0.0), peak_rss_mb())
        self._since = now
        reset_peak()

    @contextmanager
    def phase(self, name: str | None) -> Iterator[None]:
        self._lap()
        self._running.append(name)
        try:
            yield
        finally:
            self._lap()
            self._running.pop()

    def record(self) -> dict:
        return {"seconds": {k: round(v, 3) for k, v in self.seconds.items()},
                "peak_rss_mb": {k: round(v, 1) for k, v in self.peak_mb.items()}}


def total(records: list[dict]) -> dict:
    """Several record()s as one: seconds summed per phase, peak memory the largest."""
    seconds: dict[str, float] = {}
    peak: dict[str, float] = {}
    for r in records:
        for k, v in (r.get("seconds") or {}).items():
            seconds[k] = seconds.get(k, 0.0) + float(v)
        for k, v in (r.get("peak_rss_mb") or {}).items():
            peak[k] = max(peak.get(k, 0.0), float(v))
    return {"seconds": seconds, "peak_rss_mb": peak}


def summary(rec: dict) -> tuple[dict, dict]:
    """compare.json's ("time", "memory") of a total(): seconds per phase (PHASES order first), "total" and
    "train_steps_share" (the optimizer steps' share of the total); peak RSS in MB per phase (none for "other")."""
    seconds = rec["seconds"]
    names = [p for p in PHASES if p in seconds] + sorted(set(seconds) - set(PHASES))
    t = {p: round(seconds[p], 2) for p in names}
    whole = sum(seconds.values())
    t["total"] = round(whole, 2)
    t["train_steps_share"] = round(seconds.get("train_steps", 0.0) / whole, 4) if whole else None
    memory = {p: round(rec["peak_rss_mb"][p], 1) for p in names if p in rec["peak_rss_mb"]}
    return t, memory


NOT_PHASES = ("total", "train_steps_share", "wall", "from_earlier_runs", "unrecorded")


def of_comparison(clock: Clock, runs: list[tuple[str, bool]], evaluations: list[dict | None]) -> tuple[dict, dict, str]:
    """compare.json's "time" and "memory", and the line compare prints: the comparison's own phases (`clock`), the
    training of every run (its metrics.jsonl "timing" lines; `runs`: (run directory, trained by this invocation?))
    and every evaluation (its results["time"], "reused" when an earlier invocation measured it). "total" sums the
    phases, "other" included (this invocation's wall time less what it measured); "wall" is this invocation's own
    time: total less what earlier invocations measured (or less than that, for runs trained side by side)."""
    records, trainings, unrecorded, now_s = [clock.record()], 0, 0, sum(clock.seconds.values())
    for run_dir, now in runs:
        lines = read_metrics(run_dir, "timing")
        records += lines
        trainings += bool(lines) and not now
        unrecorded += not lines
        now_s += sum(v for r in lines for v in r["seconds"].values()) if now else 0.0
    for t in evaluations:
        records += [t] if t else []
        unrecorded += not t
        now_s += sum(t["seconds"].values()) if t and not t.get("reused") else 0.0
    evals = sum(bool(t and t.get("reused")) for t in evaluations)
    wall = time.perf_counter() - clock.started
    if wall > now_s:  # less where runs trained side by side
        records.append({"seconds": {"other": wall - now_s}})
    time_, memory = summary(total(records))
    time_["wall"] = round(wall, 2)
    time_["from_earlier_runs"] = {"trainings": trainings, "evaluations": evals}
    notes = [f"{trainings} training(s) and {evals} evaluation(s) of it measured by earlier runs"] \
        if trainings or evals else []
    if unrecorded:
        time_["unrecorded"] = unrecorded
        notes.append(f"{unrecorded} training(s) or evaluation(s) without a record of their time, not counted")
    if wall < 0.9 * now_s:
        notes.append(f"{wall:.0f} s wall clock: runs side by side")
    return time_, memory, line(time_, memory, "; ".join(notes))


def line(time_: dict, memory: dict, note: str = "") -> str:
    """`time: 412 s — optimizer steps 61%, ...; peak memory 2.09 GiB (optimizer steps)` for a summary(); `note` in
    brackets after the total (e.g. which parts were measured by earlier runs)."""
    whole = time_.get("total") or 0.0
    shares = sorted(((v / whole if whole else 0.0, k) for k, v in time_.items() if k not in NOT_PHASES),
                    reverse=True)
    parts = ", ".join(f"{PHASES.get(k, k)} {share:.0%}" for share, k in shares)
    text = f"time: {whole:.0f} s" + (f" ({note})" if note else "") + (f" — {parts}" if parts else "")
    if memory:
        top = max(memory, key=memory.get)
        text += f"; peak memory {memory[top] / 1024:.2f} GiB ({PHASES.get(top, top)})"
    return text
