"""imtune.experiments.ray_jobs and the GPU placement of imtune.experiments.jobs: a compare whose runs are Ray tasks on
a local Ray cluster
ends exactly where the sequential one ends (compare.json numbers equal, weights bit-identical); a run whose worker is
killed is reported with its log while the others finish, and the re-run trains only the missing run; concurrent local
runs never share a GPU (the assignment, on a fake device list)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from helpers import word_data
from imtune.cli import main
from imtune.experiments.jobs import gpu_groups

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'imtune[ray]')")


def test_concurrent_runs_get_their_own_gpus():
    eight = [str(i) for i in range(8)]
    assert gpu_groups(eight, 4) == ["0,1", "2,3", "4,5", "6,7"]
    assert gpu_groups(eight, 8) == eight and gpu_groups(eight, 3) == ["0,1", "2,3", "4,5"]
    assert gpu_groups(["3", "5"], 2) == ["3", "5"]  # CUDA_VISIBLE_DEVICES given: its ids, not 0..n
    assert gpu_groups(["0", "1"], 4) == ["0", "1", "0", "1"]  # more runs than GPUs: shared round robin
    assert gpu_groups([], 2) == [None, None]  # CPU


_data = word_data


def _argv(data: str, out, steps: int = 3) -> list[str]:
    """A sweep of two prompt weights × two seeds (four runs under OUT/compare/arms/)."""
    return ["sweep", "--data", data, "--model", "random:tiny", "--prompt-weights", "0,1", "--seeds", "0,1",
            "--max-steps", str(steps), "--batch-size", "2", "--max-length", "64", "--threads", "1",
            "--eval-every", str(steps), "--no-progress", "--out", str(out)]


@pytest.mark.slow
def test_a_sweep_on_ray_survives_a_killed_run_and_ends_where_the_sequential_one_ends(tmp_path, capsys):
    """One local Ray cluster (127.0.0.1, this machine's CPUs): a 2-λ × 2-seed sweep whose runs are Ray tasks;
    the worker of one run is killed mid-run (SIGKILL): it is reported with its log, the other three finish, and the
    re-run trains only that one. The result equals the same sweep run sequentially in this process: sweep.json
    equal, every run's weights bit-identical."""
    data = _data(tmp_path / "d.jsonl", 40)
    out = tmp_path / "ray"
    cmd = [sys.executable, "-m", "imtune.cli", *_argv(data, out, steps=100), "--executor", "ray"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim, deadline = None, time.time() + 300
    while victim is None and time.time() < deadline and proc.poll() is None:
        for lock in out.glob("compare/arms/*/seed-*/.lock"):
            try:
                pid = json.loads(lock.read_text())["pid"]
            except (OSError, ValueError, KeyError):
                continue
            if not (lock.parent / "DONE").exists():
                os.kill(pid, signal.SIGKILL)  # the Ray worker training this run dies mid-run
                victim = lock.parent
                break
        time.sleep(0.2)
    _, err = proc.communicate(timeout=900)
    assert victim is not None, err[-3000:]
    assert proc.returncode == 2, err[-3000:]
    assert "1 of 4 runs failed on Ray" in err and f"log {victim / 'train.log'}" in err
    done = sorted(p.parent for p in out.glob("compare/arms/*/seed-*/DONE"))
    assert len(done) == 3 and victim not in done  # the others finished
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("already trained") == 3 and again.stderr.count("submitted to Ray") == 1
    assert (victim / "train.log").read_text().count("final model:") == 1  # the task's output went to its log

    assert main(_argv(data, tmp_path / "seq", steps=100)) == 0
    capsys.readouterr()
    for arm in ("weighted-0", "weighted-1"):
        for seed in (0, 1):
            seq, on_ray = (tmp_path / d / "compare" / "arms" / arm / f"seed-{seed}" for d in ("seq", "ray"))
            a, b = load_file(seq / "final" / "model.safetensors"), load_file(on_ray / "final" / "model.safetensors")
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (arm, seed)
    def result(d):  # the next-step commands are built from each run's own command line (--executor ray, --out)
        r = json.loads((tmp_path / d / "sweep.json").read_text())
        r["recommendation"].pop("next", None)
        return r

    assert result("seq") == result("ray")
