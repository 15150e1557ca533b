"""--precision auto: measured on a CPU, recorded in the run directory."""
from __future__ import annotations

import json

import pytest

from imtune import precision


@pytest.fixture
def measured(monkeypatch):
    """auto as a user gets it: no IMTUNE_CPU_PRECISION, one process."""
    monkeypatch.delenv("IMTUNE_CPU_PRECISION", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


@pytest.mark.parametrize("fp32,bf16,used", [(347.0, 2537.0, "bf16"),  # the AMX Xeon of issue 16
                                            (900.0, 450.0, "fp32"),  # bf16 slower (AMD EPYC builds)
                                            (100.0, 120.0, "fp32")])  # faster, but not enough to pay for casts
def test_auto_on_cpu_follows_the_measurement(measured, monkeypatch, fp32, bf16, used):
    monkeypatch.setattr(precision, "probe", lambda: (fp32, bf16))
    p = precision.resolve("auto")
    assert p.used == used and p.fp32_gflops == fp32 and p.bf16_gflops == bf16
    assert f"{bf16:.0f}" in p.why and f"{fp32:.0f}" in p.why


def test_probe_measures_both_precisions():
    fp32, bf16 = precision.probe.__wrapped__(n=256, repeats=1)
    assert fp32 > 0 and bf16 > 0


def test_explicit_choice_and_env_skip_the_probe(measured, monkeypatch):
    monkeypatch.setattr(precision, "probe", lambda: pytest.fail("probe must not run"))
    assert precision.resolve("bf16").used == "bf16" and precision.resolve("fp32").used == "fp32"
    monkeypatch.setenv("IMTUNE_CPU_PRECISION", "bf16")
    assert precision.resolve("auto").used == "bf16"


def test_the_choice_is_recorded_in_the_run_directory(tmp_path, measured, monkeypatch):
    from helpers import tiny, write_conversations
    from imtune.train import train

    monkeypatch.setattr(precision, "probe", lambda: (100.0, 50.0))
    run = train(tiny(write_conversations(tmp_path / "d.jsonl", 4), tmp_path / "run", max_steps=1))
    rec = json.loads((run / "data_stats.json").read_text())["precision"]
    assert rec["asked"] == "auto" and rec["used"] == "fp32" and rec["bf16_gflops"] == 50.0


def test_probe_skips_the_large_bf16_products_when_bf16_is_far_slower(monkeypatch):
    """AMD EPYC: one 1024³ bf16 product took ~4 s (the probe 11.6 s of a 27 s one-step run); a small product that is
    4× slower than fp32 already decides it. Where bf16 is close or faster, the large products are measured."""
    import torch

    for small_bf16, want_calls in ((1.0, 2), (60.0, 3)):
        calls = []

        def fake(dtype, n, repeats, small_bf16=small_bf16, calls=calls):
            calls.append((dtype, n))
            return 66.0 if dtype == torch.float32 else (small_bf16 if n == 256 else 500.0)

        monkeypatch.setattr(precision, "_gflops", fake)
        fp32, bf16 = precision.probe.__wrapped__()
        assert len(calls) == want_calls and fp32 == 66.0
        assert bf16 == (small_bf16 if want_calls == 2 else 500.0)
        assert ((torch.bfloat16, 1024) in calls) == (want_calls == 3)


def test_a_stubbed_probe_decides_as_a_measured_one(measured, monkeypatch):
    precision.probe.cache_clear()
    monkeypatch.setenv("IMTUNE_CPU_PROBE", "347,2537")  # the AMX Xeon's figures
    try:
        assert precision.resolve("auto").used == "bf16"
        precision.probe.cache_clear()
        monkeypatch.setenv("IMTUNE_CPU_PROBE", "900,450")
        assert precision.resolve("auto").used == "fp32"
    finally:
        precision.probe.cache_clear()


AGREE = """
import os, sys
os.environ["IMTUNE_CPU_PROBE"] = "100,500" if os.environ["RANK"] == "0" else "500,100"  # the ranks would disagree
from imtune import precision
p = precision.resolve("auto")
print(os.environ["RANK"], p.used, p.why, flush=True)
import torch.distributed as dist
dist.destroy_process_group()  # a gloo group left to interpreter exit can abort the process
"""


def test_several_processes_use_rank_0s_measurement(tmp_path):
    """Two processes (torchrun, gloo) whose own probes would disagree both train in what rank 0 measured."""
    import os
    import subprocess
    import sys

    script = tmp_path / "agree.py"
    script.write_text(AGREE)
    env = {k: v for k, v in os.environ.items() if k != "IMTUNE_CPU_PRECISION"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script)], env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = sorted(x for x in res.stdout.splitlines() if x[:2] in ("0 ", "1 "))
    assert [x.split()[:2] for x in lines] == [["0", "bf16"], ["1", "bf16"]], res.stdout
    assert all("measured on rank 0 for all 2 processes" in x for x in lines)
