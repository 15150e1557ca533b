"""Checkpoints: atomic publication, resume only from complete ones, and exact resume — for real: `imtune train`
as a subprocess, killed with SIGKILL once a checkpoint exists, resumed, and compared bit for bit with an
uninterrupted run."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import metrics, tiny, write_conversations
from imtune import files
from imtune.rundir import checkpoint as ckpt


def test_save_is_atomic_and_resume_trusts_only_complete_checkpoints(tmp_path):
    from imtune.model.models import load_model
    from imtune.types import UsageError

    model = load_model("random:tiny", dtype=torch.float32, seed=0)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, model, None, opt, sched, {"step": step}, keep=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-2", "step-3"]  # pruned, no temporary left behind
    # A crash mid-write leaves a temp dir (ignored) or a dir without COMPLETE (ignored, refused when named).
    (root / ".tmp-step-4").mkdir()
    (root / "step-5").mkdir()
    (root / "step-5" / "model.safetensors").write_bytes(b"partial")
    assert ckpt.latest_checkpoint(tmp_path) == root / "step-3"
    with pytest.raises(UsageError, match="not a complete checkpoint"):
        ckpt.read_trainer_state(root / "step-5")
    # Weights come back exactly, tied embedding included.
    other = load_model("random:tiny", dtype=torch.float32, seed=1)
    ckpt.load_weights(other, root / "step-3", lora=False)
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k
    assert other.lm_head.weight.data_ptr() == other.model.embed_tokens.weight.data_ptr()


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "imtune.cli", "train", *args]


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path):
    data = write_conversations(tmp_path / "d.jsonl", 24)
    common = ["--model", "random:tiny", "--data", data, "--loss", "weighted", "--prompt-weight", "0.3",
              "--max-length", "128", "--batch-size", "2", "--grad-accum", "2", "--max-steps", "8", "--lr", "1e-3",
              "--save-every", "2", "--threads", "1", "--neftune-alpha", "5", "--no-progress", "--seed", "3"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(_cli(*common, "--output-dir", str(whole)), env=env, check=True, capture_output=True)
    log = open(tmp_path / "victim.log", "w")
    victim = subprocess.Popen(_cli(*common, "--output-dir", str(killed)), env=env, stdout=log, stderr=log)

    deadline = time.time() + 300
    while ckpt.latest_checkpoint(killed) is None and victim.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    log.close()
    assert victim.returncode == -signal.SIGKILL, (tmp_path / "victim.log").read_text()[-2000:]
    at = ckpt.latest_checkpoint(killed)
    assert at is not None and not (killed / "DONE").exists() and not (killed / "final").exists()

    resumed = subprocess.run(_cli(*common, "--output-dir", str(killed), "--resume"), env=env, capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {killed / 'checkpoints'}" in resumed.stderr
    a = load_file(whole / "final" / "model.safetensors")
    b = load_file(killed / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "time")} for r in rows]  # noqa
    assert strip(metrics(killed)) == strip(metrics(whole))  # every step's loss, lr, grad norm; no duplicates
    print(f"killed after {at.name}; resumed; final weights bit-identical ({len(a)} tensors)")


@pytest.mark.parametrize("cap", ["auto", "48"])  # 48: micro-batches run as passes of one row (--micro-batch-tokens)
def test_lora_resume_from_a_named_checkpoint_is_bit_identical(tmp_path, cap):
    from imtune.train.loop import train

    data = write_conversations(tmp_path / "d.jsonl", 8)
    cfg = tiny(data, tmp_path / "whole", lora=True, lora_r=4, lora_dropout=0.1, batch_size=2, max_steps=3,
               save_every=1, keep_checkpoints=0, kl_coef=0.1, micro_batch_tokens=cap)
    whole = train(cfg)
    again = train(cfg.replace(output_dir=str(tmp_path / "again"), resume=str(whole / "checkpoints" / "step-1")))
    state = json.loads((whole / "checkpoints" / "step-1" / "trainer_state.json").read_text())
    assert state["step"] == 1 and state["data_fingerprint"]
    a = load_file(whole / "final" / "adapter_model.safetensors")
    b = load_file(again / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in metrics(again)] == [r["loss"] for r in metrics(whole)][1:]


def test_resume_refuses_other_data(tmp_path):
    from imtune.train.loop import train
    from imtune.types import UsageError

    run = train(tiny(write_conversations(tmp_path / "d.jsonl", 4), tmp_path / "run", batch_size=2, max_steps=1,
                     save_every=1))
    (run / "DONE").unlink()
    write_conversations(tmp_path / "d.jsonl", 4, seed=9)  # same file name, other records: only the fingerprint sees it
    with pytest.raises(UsageError, match="data_fingerprint"):
        train(tiny(tmp_path / "d.jsonl", run, batch_size=2, max_steps=1, save_every=1, resume="auto"))
    assert Path(run / "checkpoints" / "step-1" / "COMPLETE").exists()


# -- integrity: a checkpoint is trusted only when its manifest (sizes + sha256 of every file) still holds ----------
@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A finished 8-step run with checkpoints at steps 4 and 8 (the reference), built once for the damage tests."""
    from imtune.train.loop import train

    d = tmp_path_factory.mktemp("ckpt")
    data = write_conversations(d / "d.jsonl", 8)
    cfg = tiny(data, d / "whole", batch_size=2, max_steps=8, save_every=4, keep_checkpoints=0)
    return cfg, train(cfg)


def _unfinished_copy(src: Path, dst: Path) -> Path:
    """The run as if killed right after its last checkpoint: no final/, no DONE."""
    import shutil

    shutil.copytree(src, dst)
    shutil.rmtree(dst / "final")
    (dst / "DONE").unlink()
    return dst


def _flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_manifest_detects_missing_truncated_and_flipped_files(two_checkpoints, tmp_path):
    from imtune.rundir.integrity import COMPLETE

    _, whole = two_checkpoints
    run = _unfinished_copy(whole, tmp_path / "run")
    step8 = run / "checkpoints" / "step-8"
    manifest = json.loads((step8 / COMPLETE).read_text())
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= set(manifest["files"])
    assert ckpt.verify(step8) is None and ckpt.last_good(run) == step8

    (step8 / "optimizer.pt").rename(tmp_path / "optimizer.pt")
    assert ckpt.verify(step8) == "optimizer.pt: missing"
    (tmp_path / "optimizer.pt").rename(step8 / "optimizer.pt")

    weights = step8 / "model.safetensors"
    original = weights.read_bytes()
    _flip_byte(weights, len(original) // 2)  # one bit in the middle of a tensor: same size, still loads
    assert "checksum mismatch" in ckpt.verify(step8)
    assert ckpt.last_good(run) == run / "checkpoints" / "step-4"
    weights.write_bytes(original[: len(original) // 3])
    assert "(truncated)" in ckpt.verify(step8)
    weights.write_bytes(original)
    assert ckpt.verify(step8) is None


def test_resume_falls_back_to_the_newest_intact_checkpoint(two_checkpoints, tmp_path, capsys):
    """optimizer.pt deleted from the newest checkpoint: resume says so, continues from step 4 (never "sharded run"
    from step 8 with fresh Adam moments) and ends with the reference's weights, bit for bit."""
    from imtune.train.loop import train
    from imtune.types import UsageError

    cfg, whole = two_checkpoints
    run = _unfinished_copy(whole, tmp_path / "run")
    (run / "checkpoints" / "step-8" / "optimizer.pt").unlink()
    train(cfg.replace(output_dir=str(run), resume="auto"))
    err = capsys.readouterr().err
    assert "imtune: checkpoints/step-8 is damaged (optimizer.pt: missing); resuming from checkpoints/step-4" in err
    assert "sharded" not in err and "(step 4)" in err
    a, b = load_file(whole / "final" / "model.safetensors"), load_file(run / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    # Named explicitly, a damaged checkpoint is refused with what is wrong (no traceback); so is a run with none intact.
    run2 = _unfinished_copy(whole, tmp_path / "run2")
    for step in (4, 8):
        w = run2 / "checkpoints" / f"step-{step}" / "model.safetensors"
        w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(UsageError, match=r"step-8 is damaged \(model.safetensors: 1,000 bytes, expected .*truncated"):
        train(cfg.replace(output_dir=str(tmp_path / "run3"), resume=str(run2 / "checkpoints" / "step-8")))
    with pytest.raises(UsageError, match="no intact checkpoint is left"):
        train(cfg.replace(output_dir=str(run2), resume="auto"))


def test_truncated_weights_give_a_message_not_a_traceback(two_checkpoints, tmp_path):
    """Even where no manifest can help (a copy whose COMPLETE was rewritten), reading broken weights is a UsageError."""
    from imtune.model.models import load_model
    from imtune.types import UsageError

    _, whole = two_checkpoints
    bad = tmp_path / "bad"
    bad.mkdir()
    src = whole / "checkpoints" / "step-4" / "model.safetensors"
    (bad / "model.safetensors").write_bytes(src.read_bytes()[:5000])
    with pytest.raises(UsageError, match="cannot read the weights"):
        ckpt.load_weights(load_model("random:tiny", dtype=torch.float32, seed=0), bad, lora=False)
    # Weights of another model: a message naming the mismatch, not transformers' size-mismatch traceback.
    with pytest.raises(UsageError, match="do not fit this model.*--model"):
        ckpt.load_weights(load_model("random:small", dtype=torch.float32, seed=0), src.parent, lora=False)


def test_pruning_never_leaves_a_half_deleted_checkpoint_listed(tmp_path, monkeypatch):
    """Deletion interrupted after one file (a crash, a full disk): the pruned checkpoint must not stay listed."""
    import shutil

    from imtune.model.models import load_model

    model = load_model("random:tiny", dtype=torch.float32, seed=0)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    real_rmtree = shutil.rmtree

    def interrupted(path, ignore_errors=False, **kw):  # deletes one file of a checkpoint, then "crashes"
        path = Path(path)
        if (path / "model.safetensors").exists():
            (path / "model.safetensors").unlink()
            return
        real_rmtree(path, ignore_errors=ignore_errors, **kw)

    ckpt.save_checkpoint(tmp_path, 1, model, None, opt, sched, {"step": 1}, keep=1)
    monkeypatch.setattr(files.shutil, "rmtree", interrupted)  # the one remover (imtune.files)
    ckpt.save_checkpoint(tmp_path, 2, model, None, opt, sched, {"step": 2}, keep=1)
    assert [p.name for _, p in ckpt.checkpoints(tmp_path)] == ["step-2"]
    assert ckpt.clean_partial(tmp_path)  # the next writer removes the leftovers
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-2"]


# -- a full disk: a message, no partial files, and the trained weights survive a failed final save ------------------
@contextlib.contextmanager
def small_disk(path: Path, mb: int):
    """A real filesystem of `mb` MB (tmpfs) at `path`: writes fail with ENOSPC as on a full disk. Needs root."""
    path.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mb}m", "tmpfs", str(path)], capture_output=True,
                         text=True)
    if res.returncode:
        pytest.skip(f"cannot mount a small tmpfs here ({res.stderr.strip()}); the disk-full tests need root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_mid_run_is_a_message_and_leaves_no_partial_checkpoint(tmp_path):
    from imtune.train.loop import train

    data = write_conversations(tmp_path / "d.jsonl", 8)
    with small_disk(tmp_path / "disk", 24) as disk:  # the weights (13 MB) fit, the optimizer state (26 MB) does not
        run = disk / "run"
        with pytest.raises(ckpt.WriteFailed, match=r"cannot write .*checkpoints/step-2: no space left on device "
                                                   r"\(\d+ MB free\); last good checkpoint: none"):
            train(tiny(data, run, batch_size=2, max_steps=4, save_every=2))
        assert list((run / "checkpoints").iterdir()) == []  # the partial .tmp-step-2 is gone
        assert ckpt._free_bytes(disk) > 20e6


def test_a_failed_final_save_keeps_the_trained_weights(tmp_path, monkeypatch):
    """No checkpoint, and final/ does not fit: the weights of the last step are saved where there is room (here the
    temporary directory, on another filesystem), the message says how to finish, and finishing gives the weights of
    an uninterrupted run, bit for bit."""
    import re
    import tempfile

    from imtune.train.loop import train

    data = write_conversations(tmp_path / "d.jsonl", 8)
    cfg = tiny(data, tmp_path / "ref", batch_size=2, max_steps=3)
    ref = train(cfg)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(elsewhere))
    with small_disk(tmp_path / "disk", 8) as disk:  # final/ needs ~16 MB
        run = disk / "run"
        with pytest.raises(ckpt.WriteFailed) as e:
            train(cfg.replace(output_dir=str(run)))
        msg = str(e.value)
        assert re.match(rf"cannot write {run}/final: no space left on device \(\d+ MB free\); the trained weights "
                        r"\(step 3\) were saved to ", msg), msg
        saved = Path(re.search(r"saved to (\S+) instead", msg).group(1))
        assert saved.is_relative_to(elsewhere) and ckpt.verify(saved) is None
        assert f"imtune train --output-dir {run} --resume {saved}" in msg
        assert not (run / ".tmp-final").exists() and not (run / "final").exists() and not (run / "DONE").exists()

        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)  # space freed
        train(cfg.replace(output_dir=str(run), resume=str(saved)))
        a, b = load_file(ref / "final" / "model.safetensors"), load_file(run / "final" / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert (run / "DONE").exists()
