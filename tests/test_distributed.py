"""Two processes on CPU (torchrun, gloo): 2 ranks × accumulation 2 × batch 2 make the same optimizer steps as one
process × accumulation 4 × batch 2 — including a short last step where one rank only runs a zero-weight stand-in —
and only rank 0 writes the run directory."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers import launched, metrics, tiny, write_conversations


@pytest.mark.slow
def test_two_processes_equal_one_process_with_accumulation(tmp_path):
    from imtune.train.loop import train

    # 10 examples, padded batches of 2 -> 5 micro-batches an epoch: a step of 4, then a step of 1 (rank 1: stand-in)
    data = write_conversations(tmp_path / "d.jsonl", 10)
    shared = dict(batch_size=2, epochs=1.0, packing=False, max_grad_norm=0.0, loss="weighted", prompt_weight=0.5)
    one = train(tiny(data, tmp_path / "one", grad_accum=4, **shared))

    args = ["--model", "random:tiny", "--data", data, "--loss", "weighted", "--prompt-weight", "0.5",
            "--max-length", "128", "--lr", "1e-3", "--warmup-ratio", "0", "--batch-size", "2", "--grad-accum", "2",
            "--epochs", "1", "--no-packing", "--max-grad-norm", "0", "--threads", "1", "--no-progress",
            "--output-dir", str(tmp_path / "two")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "imtune.cli", "train", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    res = launched(cmd, env, fresh=tmp_path / "two")
    assert res.returncode == 0, res.stderr[-4000:]
    two = tmp_path / "two"

    m1, m2 = metrics(one), metrics(two)
    assert [r["step"] for r in m2] == [1, 2]  # one line per step: only rank 0 writes
    for a, b in zip(m1, m2):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
        assert b["tokens"] == a["tokens"] and b["lr"] == a["lr"]
    w1, w2 = load_file(one / "final" / "model.safetensors"), load_file(two / "final" / "model.safetensors")
    for k in w1:
        # AdamW's early steps are ~lr·sign(g): coordinates with |g| near eps can differ by up to ~lr; all others
        # agree to float rounding. Bound the difference by a fraction of lr, and the typical one much tighter.
        diff = (w1[k] - w2[k]).abs()
        assert diff.max() <= 2e-3 * 1e-3 + 1e-6 and diff.mean() <= 1e-7, k
    assert '"processes": 2' in (two / "data_stats.json").read_text()
    assert (two / "DONE").exists()


@pytest.mark.slow
def test_fsdp_two_cpu_processes_equal_one_process_and_resume_exactly(tmp_path):
    """FSDP2 (configs/accelerate/fsdp-cpu.yaml: 2 CPU processes, gloo) makes the same optimizer steps as one process
    with the same global batch; and a resume from a mid-run checkpoint (full weights + the gathered AdamW state,
    re-sharded) ends bit-identical to the uninterrupted sharded run — restarted moments would not."""
    import shutil

    from imtune.train.loop import train

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    data = write_conversations(tmp_path / "d.jsonl", 10)
    shared = dict(batch_size=2, epochs=1.0, packing=False, max_grad_norm=0.0, loss="weighted", prompt_weight=0.5)
    one = train(tiny(data, tmp_path / "one", grad_accum=4, **shared))

    def launch(out, *extra):
        args = ["--model", "random:tiny", "--data", data, "--loss", "weighted", "--prompt-weight", "0.5",
                "--max-length", "128", "--lr", "1e-3", "--warmup-ratio", "0", "--batch-size", "2", "--grad-accum",
                "2", "--epochs", "1", "--no-packing", "--max-grad-norm", "0", "--threads", "1", "--no-progress",
                "--save-every", "1", "--keep-checkpoints", "0", "--output-dir", str(out), *extra]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               os.path.join(root, "configs", "accelerate", "fsdp-cpu.yaml"), "-m", "imtune.cli", "train", *args]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
        res = launched(cmd, env, fresh=None if "--resume" in extra else out)
        assert res.returncode == 0, res.stderr[-4000:]
        return res

    two = tmp_path / "fsdp"
    launch(two)
    assert json.loads((two / "data_stats.json").read_text())["distributed"] == "FSDP"
    m1, m2 = metrics(one), metrics(two)
    assert [r["step"] for r in m2] == [1, 2]
    for a, b in zip(m1, m2):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
        # FSDP reduce-scatters gradient shards and sums shard norms: other summation orders than one process
        # (measured: 2.3e-5 relative at step 2, after one AdamW update amplified rounding-level differences)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["tokens"] == a["tokens"] and b["lr"] == a["lr"]
    w1, w2 = load_file(one / "final" / "model.safetensors"), load_file(two / "final" / "model.safetensors")
    assert w1.keys() == w2.keys()
    for k in w1:
        diff = (w1[k] - w2[k]).abs()
        assert diff.max() <= 2e-3 * 1e-3 + 1e-6 and diff.mean() <= 1e-7, k

    # Resume: the run as it stood after step 1 (its step-1 checkpoint), continued by a fresh launch
    opt = torch.load(two / "checkpoints" / "step-1" / "optimizer.pt", weights_only=True)
    assert opt["state"] and all(torch.count_nonzero(v["exp_avg_sq"]) for v in opt["state"].values())
    again = tmp_path / "resumed"
    shutil.copytree(two, again, ignore=shutil.ignore_patterns("final", "DONE", "step-2", "metrics.jsonl", ".lock"))
    res = launch(again, "--resume")
    assert "step 1" in res.stderr, res.stderr[-2000:]
    w3 = load_file(again / "final" / "model.safetensors")
    assert all(torch.equal(w2[k], w3[k]) for k in w2), "resumed FSDP run differs from the uninterrupted one"


@pytest.mark.slow
def test_sweep_and_its_compare_under_accelerate_launch_on_two_cpu_processes(tmp_path):
    """`accelerate launch --config_file configs/accelerate/ddp-cpu.yaml -m imtune.cli sweep ...`: every arm trains on
    both processes (data_stats: 2 processes, MULTI_CPU), rank 0 alone evaluates and writes compare.json, sweep.json
    and the reports (printed once), and the held-out losses equal one process with the same global batch."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    data = write_conversations(tmp_path / "d.jsonl", 12)
    common = ["sweep", "--data", data, "--prompt-weights", "0,1", "--model", "random:tiny", "--max-steps", "2",
              "--batch-size", "2", "--max-length", "128", "--lr", "1e-3", "--warmup-ratio", "0", "--no-packing",
              "--max-grad-norm", "0", "--threads", "1", "--no-progress", "--eval-every", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              os.path.join(root, "configs", "accelerate", "ddp-cpu.yaml"), "-m", "imtune.cli"]
    two = launched([*launch, *common, "--out", str(tmp_path / "two")], env, timeout=900, fresh=tmp_path / "two")
    assert two.returncode == 0, two.stderr[-4000:]
    one = subprocess.run([sys.executable, "-m", "imtune.cli", *common, "--grad-accum", "2", "--out",
                          str(tmp_path / "one")], env=env, capture_output=True, text=True, timeout=900)
    assert one.returncode == 0, one.stderr[-4000:]

    said = [x for x in two.stdout.splitlines() if x.startswith(("Recommended: λ", "No λ recommended"))]
    assert len(said) == 1 and two.stdout.count("report: ") == 1  # one voice: rank 0
    assert two.stderr.count("compare: 2 arms x 1 seeds") == 1
    for arm in ("weighted-0", "weighted-1"):
        stats = json.loads((tmp_path / "two" / "compare" / "arms" / arm / "seed-42" / "data_stats.json").read_text())
        assert stats["processes"] == 2 and stats["distributed"] == "MULTI_CPU", arm
    for name in ("sweep.json", "report.md", "report.html", "compare/compare.json", "compare/report.html"):
        assert (tmp_path / "two" / name).exists(), name
    a, b = (json.loads((tmp_path / d / "sweep.json").read_text()) for d in ("one", "two"))
    for r1, r2 in zip(a["prompt_weights"], b["prompt_weights"]):
        assert r2["final"]["value"] == pytest.approx(r1["final"]["value"], rel=1e-5), r1["prompt_weight"]
    assert a["recommendation"]["prompt_weight"] == b["recommendation"]["prompt_weight"]


@pytest.mark.slow
def test_two_processes_train_like_one_when_auto_picks_bf16(tmp_path):
    """--precision auto with a probe that favours bf16 (IMTUNE_CPU_PROBE, an AMX Xeon's figures): one process and two
    (torchrun, gloo) both train in bf16 — rank 0 decides for all — and end with the same weights (bf16 autocast
    rounds the same products the same way; the all-reduce sums fp32 gradients)."""
    data = write_conversations(tmp_path / "d.jsonl", 8)
    common = ["--model", "random:tiny", "--data", data, "--loss", "im", "--max-length", "128", "--lr", "1e-3",
              "--warmup-ratio", "0", "--batch-size", "2", "--epochs", "1", "--no-packing", "--max-grad-norm", "0",
              "--threads", "1", "--no-progress", "--precision", "auto"]
    env = {k: v for k, v in os.environ.items() if k != "IMTUNE_CPU_PRECISION"}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", IMTUNE_CPU_PROBE="347,2537")
    runs = {}
    for n, accum in ((1, "4"), (2, "2")):
        out = tmp_path / f"p{n}"
        launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if n == 2
                  else [sys.executable])
        res = launched([*launch, "-m", "imtune.cli", "train", *common, "--grad-accum", accum, "--output-dir", str(out)],
                       env, fresh=out)
        assert res.returncode == 0, res.stderr[-4000:]
        rec = json.loads((out / "data_stats.json").read_text())["precision"]
        assert rec["used"] == "bf16", rec
        runs[n] = load_file(out / "final" / "model.safetensors")
    for k in runs[1]:
        assert torch.allclose(runs[1][k], runs[2][k], atol=2e-3, rtol=0), k


@pytest.mark.slow
def test_checkpoints_by_minutes_agree_across_processes(tmp_path):
    """--save-every-minutes under two processes (torchrun, gloo): rank 0's clock decides and every rank saves with it
    (saving is a collective), so the run neither hangs nor writes a partial checkpoint."""
    data = write_conversations(tmp_path / "d.jsonl", 8)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "imtune.cli",
           "train", "--model", "random:tiny", "--data", data, "--max-length", "128", "--batch-size", "2",
           "--max-steps", "3", "--no-packing", "--threads", "1", "--no-progress", "--save-every-minutes", "0",
           "--keep-checkpoints", "0", "--output-dir", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    res = launched(cmd, env, timeout=300, fresh=out)
    assert res.returncode == 0, res.stderr[-4000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]
    assert all((out / "checkpoints" / s / "COMPLETE").exists() for s in ("step-1", "step-2"))
