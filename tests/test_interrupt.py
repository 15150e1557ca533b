"""Ctrl-C in `imtune compare` (issue 26), with a real SIGINT to the whole process group as a terminal sends it: the
command exits 130, says what was kept (runs trained, the run in progress and the checkpoint it resumes from) and
prints the command that continues; running that command resumes the interrupted run from its checkpoint (the log says
so) and finishes it with the same steps as an uninterrupted run. Once, with --jobs 2, the runs train in child
processes: they stop too, and the parent alone reports."""
from __future__ import annotations

import glob
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

from helpers import metrics, word_data

STEPS = 40


def start(argv: list[str], cwd) -> subprocess.Popen:
    """`imtune ARGV` in its own process group, listening to SIGINT whatever the test runner's own disposition (a shell
    starts background jobs with SIGINT ignored, and an ignored signal stays ignored across exec)."""
    return subprocess.Popen([sys.executable, "-m", "imtune.cli", *argv], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def interrupt_after_a_checkpoint(proc: subprocess.Popen, pattern: str, timeout: float = 600) -> str:
    """Wait until a checkpoint matching `pattern` is complete, press Ctrl-C (SIGINT to the process group), return
    everything the command printed."""
    t0 = time.monotonic()
    while not glob.glob(pattern):
        assert proc.poll() is None, f"ended before a checkpoint was written:\n{proc.communicate()[0][-3000:]}"
        assert time.monotonic() - t0 < timeout, "no checkpoint written in time"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return out


def argv_for(data: str, out: str, *extra: str) -> list[str]:
    # --save-every-minutes 0.01: compare's Ctrl-C checkpoints, after 0.6 s of a run's training instead of 10 minutes
    return ["compare", data, "--model", "random:tiny", "--arms", "it,im", "--max-steps", str(STEPS), "--eval-every",
            "5", "--batch-size", "2", "--bleu-samples", "0", "--no-progress", "--threads", "1",
            "--save-every-minutes", "0.01", "--out", out, *extra]


def check_interrupted(out: str, rc: int, argv: list[str], cwd) -> list[tuple[str, int, int]]:
    """The report of an interruption; returns (arm, step reached, checkpoint step) of each run in progress."""
    assert rc == 130, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert out.count("imtune: interrupted") == 1 and out.count("to continue") == 1, out[-3000:]
    assert re.search(r"kept in \S+: \d of 2 runs trained, \d evaluated", out), out[-3000:]
    assert f"run the same command again (in {cwd}):\n  {shlex.join(['imtune', *argv])}\n" in out
    stopped = [(arm, int(k), int(c)) for arm, k, c in re.findall(
        rf"arm (\w+) seed 42: stopped at step (\d+) of {STEPS}; resumes from its checkpoint at step (\d+)", out)]
    assert stopped, out[-3000:]
    for _, k, c in stopped:
        assert 1 <= c <= k < STEPS  # time-based: after any step
    return stopped


def check_resumed(out: str, rc: int, cwd, stopped: list[tuple[str, int, int]]) -> None:
    assert rc == 0, out[-3000:]
    for arm, _, c in stopped:
        assert f"resuming from cmp/arms/{arm}/seed-42/checkpoints/step-{c} (step {c})" in out, out[-3000:]
        # Trained to the end with every step once (the steps after the checkpoint were trained again, and logged once)
        steps = [r["step"] for r in metrics(cwd / "cmp" / "arms" / arm / "seed-42")]
        assert steps == list(range(1, STEPS + 1)), (arm, steps)
    for arm in ("it", "im"):
        run = cwd / "cmp" / "arms" / arm / "seed-42"
        assert json.loads((run / "DONE").read_text())["steps"] == STEPS
        assert (run / "final").is_dir() and (run / "eval" / "compare.json").is_file()
        assert not (run / "checkpoints").exists()  # compare's own Ctrl-C checkpoints go once the run is done
    assert (cwd / "cmp" / "compare.json").is_file()


@pytest.mark.slow
def test_ctrl_c_in_compare_keeps_the_runs_and_the_same_command_resumes(tmp_path):
    data = word_data(tmp_path / "d.jsonl", 40)
    argv = argv_for(data, "cmp")
    proc = start(argv, tmp_path)
    out = interrupt_after_a_checkpoint(proc, str(tmp_path / "cmp/arms/it/seed-42/checkpoints/step-*/COMPLETE"))
    stopped = check_interrupted(out, proc.returncode, argv, tmp_path)
    assert [arm for arm, *_ in stopped] == ["it"] and "1 run(s) not started" in out
    assert not (tmp_path / "cmp" / "arms" / "im").exists()  # the run not started leaves no empty folder
    again = subprocess.run([sys.executable, "-m", "imtune.cli", *argv], cwd=tmp_path, capture_output=True, text=True,
                           timeout=900)
    check_resumed(again.stdout + again.stderr, again.returncode, tmp_path, stopped)


@pytest.mark.slow
def test_ctrl_c_with_runs_in_child_processes(tmp_path):
    """--jobs 2: both runs train in spawned children; Ctrl-C reaches them too. They stop (no traceback on the
    terminal, their locks released: the re-run can take them), and the parent alone reports."""
    data = word_data(tmp_path / "d.jsonl", 40)
    argv = argv_for(data, "cmp", "--jobs", "2")
    proc = start(argv, tmp_path)
    out = interrupt_after_a_checkpoint(proc, str(tmp_path / "cmp/arms/*/seed-42/checkpoints/step-*/COMPLETE"))
    stopped = check_interrupted(out, proc.returncode, argv, tmp_path)
    for arm, *_ in stopped:
        log = (tmp_path / "cmp" / "arms" / arm / "seed-42" / "train.log").read_text()
        assert "Traceback" not in log and "interrupted" in log, log[-2000:]
    again = subprocess.run([sys.executable, "-m", "imtune.cli", *argv], cwd=tmp_path, capture_output=True, text=True,
                           timeout=900)
    out2 = again.stdout + again.stderr
    assert again.returncode == 0, out2[-3000:]
    for arm, _, c in stopped:  # the children's output goes to each run's train.log
        log = (tmp_path / "cmp" / "arms" / arm / "seed-42" / "train.log").read_text()
        assert f"resuming from cmp/arms/{arm}/seed-42/checkpoints/step-{c} (step {c})" in log, log[-3000:]
        assert [r["step"] for r in metrics(tmp_path / "cmp" / "arms" / arm / "seed-42")] == list(range(1, STEPS + 1))
