"""One writer per run directory (a real second `imtune train` is refused while the first holds the lock, and writes
nothing) and one set of settings per run (changed settings refused, listed; deliberate ones allowed and recorded)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import metrics, tiny, write_conversations
from imtune.config import TrainConfig
from imtune.rundir import guard
from imtune.types import UsageError

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "imtune.cli", "train", *args]


def _snapshot(d: Path) -> dict:
    """Every file under d (but the lock's own note) with its bytes."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and p.name != ".lock"}


def _wait_for_lock_note(run: Path, pid: int, proc) -> None:
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads((run / ".lock").read_text())["pid"] == pid:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    raise AssertionError(f"the first run never took the lock (exit {proc.poll()})")


def test_a_second_writer_is_refused_and_writes_nothing(tmp_path):
    """Two real `imtune train` processes into one directory: the first is paused (SIGSTOP) while it holds the lock
    in the middle of its run; the second, with other settings, must be refused naming the holder and change no file;
    the first then finishes normally."""
    data = write_conversations(tmp_path / "d.jsonl", 8)
    run = tmp_path / "run"
    common = ["--model", "random:tiny", "--data", data, "--max-length", "128", "--batch-size", "2", "--threads", "1",
              "--no-progress", "--output-dir", str(run), "--save-every", "2"]
    first = subprocess.Popen(_cli(*common, "--max-steps", "6"), env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_lock_note(run, first.pid, first)
        deadline = time.time() + 120  # let it write its config and its first metrics, then freeze it
        while not (run / "metrics.jsonl").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        os.kill(first.pid, signal.SIGSTOP)
        before = _snapshot(run)
        second = subprocess.run(_cli(*common, "--max-steps", "3", "--lr", "1e-3"), env=ENV, capture_output=True,
                                text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"is in use by another imtune run (pid {first.pid} on " in second.stderr
        assert "Traceback" not in second.stderr
        assert _snapshot(run) == before  # config.yaml, metrics.jsonl, checkpoints: untouched
    finally:
        os.kill(first.pid, signal.SIGCONT)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4, 5, 6]
    assert TrainConfig.from_yaml(run / "config.yaml").max_steps == 6
    # The lock died with its holder: the directory is free again (a finished run with the same settings).
    again = subprocess.run(_cli(*common, "--max-steps", "6"), env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "already finished" in again.stderr, again.stderr[-2000:]


def test_a_foreign_directory_gets_no_lock_file(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match=r"was not made by imtune \(no \.imtune marker; it holds notes.txt\)"):
        guard.lock(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.slow
def test_under_two_processes_only_rank_0_locks_and_a_refusal_stops_both(tmp_path):
    """Rank 0 alone takes the lock (a normal 2-process run is covered by test_distributed); when it is refused, both
    ranks exit with the message instead of rank 1 waiting forever."""
    data = write_conversations(tmp_path / "d.jsonl", 4)
    run = tmp_path / "run"
    guard.lock(run)  # this test process holds it
    try:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "imtune.cli", "train", "--model", "random:tiny", "--data", data, "--max-steps", "1", "--threads", "1",
               "--no-progress", "--output-dir", str(run)]
        res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    finally:
        guard.release()
    assert res.returncode != 0
    assert res.stderr.count(f"is in use by another imtune run (pid {os.getpid()} on ") == 2, res.stderr[-3000:]
    assert not (run / "config.yaml").exists()


# -- settings --------------------------------------------------------------------------------------------------------
def test_changed_settings_are_refused_listed_or_allowed_and_recorded(tmp_path):
    from imtune.train.loop import train

    data = write_conversations(tmp_path / "d.jsonl", 8)
    cfg = tiny(data, tmp_path / "run", batch_size=2, max_steps=4, save_every=2, keep_checkpoints=0)
    run = train(cfg)
    final = _snapshot(run / "final")

    # A finished run is "already finished" only for its own settings (harmless ones aside).
    assert train(cfg.replace(threads=2, progress=True, save_every=1)) == run
    with pytest.raises(UsageError, match=r"already finished with other settings \(--lr 0.001 -> 0.002\)"):
        train(cfg.replace(lr=2e-3))
    assert _snapshot(run / "final") == final

    import shutil

    shutil.rmtree(run / "final")
    (run / "DONE").unlink()  # as if killed after its last checkpoint
    config = (run / "config.yaml").read_bytes()
    with pytest.raises(UsageError, match=r"--max-length 128 -> 64, --lr 0.001 -> 0.002.*--allow-change max_length,lr"):
        train(cfg.replace(resume="auto", lr=2e-3, max_length=64))
    with pytest.raises(UsageError, match=r"--resume cannot change --model 'random:tiny' -> 'random:small': "):
        train(cfg.replace(resume="auto", model="random:small"))
    with pytest.raises(UsageError, match="--allow-change model: a checkpoint holds the weights of one model"):
        train(cfg.replace(resume="auto", model="random:small", allow_change="model"))
    with pytest.raises(UsageError, match="--allow-change max_stepz: not a setting"):
        train(cfg.replace(resume="auto", max_steps=6, allow_change="max_stepz"))
    with pytest.raises(UsageError, match=r"--max-steps 4 -> 6.*--allow-change max_steps"):
        train(cfg.replace(resume="auto", max_steps=6, neftune_alpha=0.0))
    assert (run / "config.yaml").read_bytes() == config  # refusals rewrite nothing

    # A deliberate change: allowed by name, recorded in changes.jsonl and config.yaml's header.
    train(cfg.replace(resume="auto", max_steps=6, allow_change="max-steps", threads=2))
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4, 5, 6]
    entry = json.loads((run / "changes.jsonl").read_text())
    assert entry["step"] == 4 and entry["changes"] == {"max_steps": [4, 6]}
    text = (run / "config.yaml").read_text()
    assert text.startswith("# changed at step 4 (") and "--allow-change): --max-steps 4 -> 6" in text
    saved = TrainConfig.from_yaml(run / "config.yaml")
    assert saved.max_steps == 6 and saved.allow_change is None  # a permission for one resume only


def test_compare_judges_an_existing_arm_by_guards_one_comparison(tmp_path):
    """compare.check_same_training is guard.config_changes: harmless settings may differ, others are named."""
    from imtune.experiments.compare import check_same_training

    cfg = TrainConfig(model="random:tiny", data="d.jsonl", output_dir=str(tmp_path), lr=1e-3)
    check_same_training(tmp_path, cfg)  # no config.yaml yet: a new arm
    (tmp_path / "config.yaml").write_text(cfg.to_yaml())
    check_same_training(tmp_path, cfg.replace(chunk_size=64, progress=False, attn_implementation="sdpa"))
    with pytest.raises(UsageError, match=r"other settings \(lr: 0.001 -> 0.002\); re-run with the same flags.*--out"):
        check_same_training(tmp_path, cfg.replace(lr=2e-3, progress=False))
