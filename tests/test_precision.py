"""--precision auto: decided on a CPU from timed training steps, recorded in the run directory.

This machine (AMD EPYC, no AMX: `grep amx_bf16 /proc/cpuinfo` is empty) runs bf16 ~70× slower than fp32, so a real
probe here only ever shows the fp32 side of the decision. The decision logic is therefore tested with stubbed
timings (precision.step_speeds and precision.matmul_speeds monkeypatched, or IMTUNE_CPU_PROBE): bf16 faster by
≥ 1.3× -> bf16; slower, or faster by less -> fp32; several ranks agree on rank 0's. One test runs the real probe
functions on a tiny shape, to check they measure both precisions at all."""
from __future__ import annotations

import json

import pytest

from imtune.model import precision


@pytest.fixture
def measured(monkeypatch):
    """auto as a user gets it: no IMTUNE_CPU_PRECISION, one process, nothing measured yet in this process."""
    monkeypatch.delenv("IMTUNE_CPU_PRECISION", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    precision._probe.cache_clear()
    yield
    precision._probe.cache_clear()


def _stub(monkeypatch, steps, matmul=(80.0, 70.0)):
    """Stubbed timings; returns the calls of the step probe: (shape, n, layers, vocab)."""
    calls = []

    def step_speeds(shape, n, layers, vocab):
        calls.append((shape, n, layers, vocab))
        return steps

    monkeypatch.setattr(precision, "step_speeds", step_speeds)
    monkeypatch.setattr(precision, "matmul_speeds", lambda: matmul)
    return calls


@pytest.mark.parametrize("fp32,bf16,used", [(900.0, 3600.0, "bf16"),  # bf16 4× faster end to end (AMX-like)
                                            (900.0, 1170.0, "bf16"),  # exactly the 1.3× margin
                                            (900.0, 60.0, "fp32"),  # bf16 slower (this machine: ~0.07×)
                                            (900.0, 1080.0, "fp32")])  # 1.2×: faster, not enough to choose it
def test_auto_on_cpu_follows_the_timed_training_step(measured, monkeypatch, fp32, bf16, used):
    """Stubbed step timings (this CPU cannot show bf16 winning): the decision and the ratio it prints and records."""
    _stub(monkeypatch, (fp32, bf16))
    p = precision.resolve("auto", "random:tiny", 128)
    assert p.used == used
    assert f"{bf16 / fp32:.2f}×" in p.why and "training step" in p.why and f"{bf16:,.0f}" in p.why
    rec = p.to_dict()
    assert rec["fp32_tokens_per_s"] == fp32 and rec["bf16_tokens_per_s"] == bf16
    assert rec["bf16_speedup"] == round(bf16 / fp32, 3) and "layers shaped like the model" in rec["probe"]


def test_a_hopeless_bf16_product_skips_the_step_probe(measured, monkeypatch):
    """Where a bf16 product is ≥ 4× slower (this machine: ~1.5 vs ~78 GFLOP/s on one thread), no step can make it
    up: fp32 at once, without the seconds that timing bf16 steps would cost here."""
    monkeypatch.setattr(precision, "step_speeds", lambda *a: pytest.fail("the steps must not be timed"))
    monkeypatch.setattr(precision, "matmul_speeds", lambda: (78.0, 1.5))
    p = precision.resolve("auto", "random:tiny", 128)
    assert p.used == "fp32" and "steps not timed" in p.why and "0.02×" in p.why
    rec = p.to_dict()
    assert rec["bf16_tokens_per_s"] is None and rec["bf16_gflops"] == 1.5 and rec["bf16_speedup"] == 0.019


def test_the_probe_is_shaped_like_the_model_and_measured_once(measured, monkeypatch):
    """The probe trains PROBE_LAYERS layers of the model's own sizes with the same share of its vocabulary head, on
    min(max_length, 256) tokens; once per process for each (shape, row length)."""
    calls = _stub(monkeypatch, (900.0, 60.0))
    precision.resolve("auto", "random:smollm2-135m", 1024)
    precision.resolve("auto", "random:smollm2-135m", 2048)  # the same row of 256 tokens: not measured again
    ((shape, n, layers, vocab),) = calls
    assert (shape.hidden, shape.intermediate, shape.heads, shape.kv_heads, shape.layers) == (576, 1536, 9, 3, 30)
    assert n == 256 and layers == 2 and vocab == round(49152 * 2 / 30)
    precision.resolve("auto", "random:smollm2-135m", 64)  # a shorter row is another probe
    precision.resolve("auto", "random:tiny", 64)  # a 2-layer model: its whole head
    assert [c[1:] for c in calls[1:]] == [(64, 2, 3277), (64, 2, 49152)]


def test_the_probe_functions_measure_both_precisions():
    """The real timings, on a tiny shape and a short row (bf16 is slow here: the bf16 steps take ~1 s)."""
    from imtune.model.models import model_shape

    fp32, bf16 = precision.step_speeds(model_shape("random:tiny"), 16, 1, 512, steps=1)
    assert fp32 > 0 and bf16 > 0
    fp32, bf16 = precision.matmul_speeds()
    assert fp32 > 0 and bf16 > 0


def test_explicit_choice_and_env_skip_the_probe(measured, monkeypatch):
    monkeypatch.setattr(precision, "probe", lambda *a: pytest.fail("probe must not run"))
    assert precision.resolve("bf16").used == "bf16" and precision.resolve("fp32").used == "fp32"
    monkeypatch.setenv("IMTUNE_CPU_PRECISION", "bf16")
    assert precision.resolve("auto").used == "bf16"


def test_the_choice_is_recorded_in_the_run_directory(tmp_path, measured, monkeypatch, capsys):
    from helpers import tiny, write_conversations
    from imtune.train.loop import train

    _stub(monkeypatch, (900.0, 450.0))
    run = train(tiny(write_conversations(tmp_path / "d.jsonl", 4), tmp_path / "run", max_steps=1))
    rec = json.loads((run / "data_stats.json").read_text())["precision"]
    assert rec["asked"] == "auto" and rec["used"] == "fp32" and rec["bf16_tokens_per_s"] == 450.0
    assert rec["bf16_speedup"] == 0.5
    assert "precision: fp32 (CPU training step: bf16 450 vs fp32 900 tokens/s (0.50×" in capsys.readouterr().err


def test_a_stubbed_probe_decides_as_a_measured_one(measured, monkeypatch):
    for name in ("step_speeds", "matmul_speeds"):
        monkeypatch.setattr(precision, name, lambda *a: pytest.fail("IMTUNE_CPU_PROBE stands in for the probe"))
    monkeypatch.setenv("IMTUNE_CPU_PROBE", "347,2537")
    assert precision.resolve("auto", "random:tiny").used == "bf16"
    monkeypatch.setenv("IMTUNE_CPU_PROBE", "900,450")
    assert precision.resolve("auto", "random:tiny").used == "fp32"


AGREE = """
import os, sys
os.environ["IMTUNE_CPU_PROBE"] = "100,500" if os.environ["RANK"] == "0" else "500,100"  # the ranks would disagree
from imtune.model import precision
p = precision.resolve("auto", "random:tiny")
with open(sys.argv[1] + "." + os.environ["RANK"], "w") as f:  # one file each: two ranks' stdout can interleave
    f.write(f"{os.environ['RANK']} {p.used} {p.why}")
import torch.distributed as dist
dist.destroy_process_group()  # a gloo group left to interpreter exit can abort the process
"""


def test_several_processes_use_rank_0s_measurement(tmp_path):
    """Two processes (torchrun, gloo) whose own (stubbed) probes would disagree both train in what rank 0 measured."""
    import os
    import sys

    script = tmp_path / "agree.py"
    script.write_text(AGREE)
    env = {k: v for k, v in os.environ.items() if k != "IMTUNE_CPU_PRECISION"}
    from helpers import launched

    res = launched([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(script), str(tmp_path / "out")], {**env, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [(tmp_path / f"out.{rank}").read_text() for rank in (0, 1)]
    assert [x.split()[:2] for x in lines] == [["0", "bf16"], ["1", "bf16"]], lines
    assert all("measured on rank 0 for all 2 processes" in x for x in lines)
