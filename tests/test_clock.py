"""imtune.train.clock: where a comparison's time and memory go. The Clock itself (exclusive seconds per phase, peak RSS
per phase), a compare on random:tiny that records every phase in compare.json (and counts reused runs on a re-run), and
the memory guards: a compare never holds two models at once (a finished run's model does not outlive train(), an
evaluation's model goes before the next is loaded), and the loss holds one chunk of logits at a time."""
from __future__ import annotations

import json
import re
import time

import pytest

from helpers import patch_everywhere, tiny, write_conversations
from imtune.train import clock
from imtune.train.clock import PHASES, Clock


def test_every_second_goes_to_the_innermost_phase_and_each_phase_has_its_own_peak():
    import numpy as np

    c = Clock()
    with c.phase("outer"):
        time.sleep(0.05)
        with c.phase("inner"):
            time.sleep(0.1)
            big = np.ones(300 * 2**20, dtype=np.uint8)  # 300 MB, every page touched
            del big
        with c.phase(None):  # measured elsewhere: counted nowhere
            time.sleep(0.1)
        time.sleep(0.05)
    assert set(c.seconds) == {"outer", "inner"}
    assert 0.09 <= c.seconds["inner"] < 5  # 0.1 s, and touching 300 MB on a busy machine
    assert 0.09 <= c.seconds["outer"] < 0.5  # the inner phase's and the uncounted time are not the outer's
    if not clock.reset_peak():
        pytest.skip("the kernel does not let this process reset its peak RSS (/proc/self/clear_refs)")
    assert c.peak_mb["inner"] - c.peak_mb["outer"] > 250  # the peak is the phase's own, not the process's so far


def test_records_add_up_and_the_line_names_the_phases_by_share():
    a = {"seconds": {"train_steps": 60.0, "saving": 4.0}, "peak_rss_mb": {"train_steps": 2100.0, "saving": 900.0}}
    b = {"seconds": {"train_steps": 20.0, "generation": 16.0}, "peak_rss_mb": {"train_steps": 1500.0,
                                                                                "generation": 1200.0}}
    t, m = clock.summary(clock.total([a, b]))
    assert t == {"train_steps": 80.0, "saving": 4.0, "generation": 16.0, "total": 100.0, "train_steps_share": 0.8}
    assert m == {"train_steps": 2100.0, "saving": 900.0, "generation": 1200.0}
    assert list(t)[:3] == ["train_steps", "saving", "generation"]  # the order they happen in (PHASES)
    assert clock.line(t, m, "1 training(s) and 0 evaluation(s) of it measured by earlier runs") == (
        "time: 100 s (1 training(s) and 0 evaluation(s) of it measured by earlier runs) — optimizer steps 80%, "
        "generation 16%, saving 4%; peak memory 2.05 GiB (optimizer steps)")


def _phase_sum(t: dict) -> float:
    return sum(v for k, v in t.items() if k in PHASES)


@pytest.mark.slow
def test_compare_writes_where_its_time_and_memory_went_and_a_rerun_reuses_the_runs_records(tmp_path, capsys,
                                                                                           monkeypatch):
    import weakref

    from imtune.cli import main
    from imtune.model import models
    from imtune.rundir.read import metrics as read_metrics
    from imtune.train import cost

    # The cost estimate measures a model once per process: another test in this worker may have measured random:tiny
    # already, and then the estimate phase takes no time and loads no model.
    cost._measure.cache_clear()
    alive, overlaps, load = [], [], models.load_model

    def watched(spec, *args, **kwargs):  # every model compare makes: training's, the cost estimate's, evaluation's
        overlaps.extend(name for name, ref in alive if ref() is not None)
        model = load(spec, *args, **kwargs)
        alive.append((spec, weakref.ref(model)))
        return model

    patch_everywhere(monkeypatch, models, "load_model", watched)
    data = write_conversations(tmp_path / "d.jsonl", 24)
    argv = ["compare", "--data", data, "--model", "random:tiny", "--arms", "it,im", "--max-steps", "2",
            "--batch-size", "4", "--max-length", "128", "--bleu-samples", "2", "--max-new-tokens", "3",
            "--threads", "1", "--no-progress", "--out", str(tmp_path / "cmp")]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert len(alive) >= 4 and overlaps == []  # 2 trained, 2 evaluated: never two models in memory at once
    summary = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    t, memory = summary["time"], summary["memory"]
    measured = set(PHASES) - {"other"}  # other: the wall time between the measured phases
    assert measured <= set(t) and measured <= set(memory)  # every phase, the cost estimate's too
    # final scoring has nothing left to do here: the trainer scored final/ on the test part and on its train sample
    assert all(t[p] > 0 for p in measured - {"final_scoring"}) and all(memory[p] > 50 for p in measured)
    scored = [r["results"][part]["scored"] for a in summary["arms"] for r in a["runs"] for part in ("train", "heldout")]
    assert t["final_scoring"] < 0.5 and set(scored) == {"in training (step 2)"}
    assert t["total"] == pytest.approx(_phase_sum(t), abs=0.05)
    assert sum(t[p] / t["total"] for p in t if p in PHASES) == pytest.approx(1.0, abs=0.01)  # each rounded to 10 ms
    assert t["train_steps_share"] == pytest.approx(t["train_steps"] / t["total"], abs=1e-3)
    assert t["from_earlier_runs"] == {"trainings": 0, "evaluations": 0}
    assert t["total"] == pytest.approx(t["wall"], abs=0.1)  # every second of this invocation, once
    assert t.get("other", 0) < 0.2 * t["total"]  # and most of them in a named phase
    assert max(memory.values()) < 1500, memory  # random:tiny: torch, transformers, a 13 MB model and its logits
    line = next(x for x in err.splitlines() if x.startswith("compare: 2 arms x 1 seeds; time: "))
    assert re.search(r"time: \d+ s — (\w[\w -]* \d+%, )+\w[\w -]* \d+%; peak memory \d+\.\d\d GiB \(", line), line
    runs = [tmp_path / "cmp" / "arms" / a / "seed-42" for a in ("it", "im")]
    timing = [read_metrics(r, "timing") for r in runs]
    for run, (rec,) in zip(runs, timing):  # one line, the last one
        assert read_metrics(run, None)[-1] == rec and rec["step"] == 2
        assert set(rec["seconds"]) == {"startup", "train_steps", "train_eval", "saving"} == set(rec["peak_rss_mb"])
    assert t["train_steps"] == pytest.approx(sum(r[0]["seconds"]["train_steps"] for r in timing), abs=0.02)

    assert main(argv) == 0  # nothing trained or evaluated again: the runs' own records are counted
    err = capsys.readouterr().err
    again = json.loads((tmp_path / "cmp" / "compare.json").read_text())["time"]
    assert again["from_earlier_runs"] == {"trainings": 2, "evaluations": 2}
    for p in ("train_steps", "train_eval", "final_scoring", "generation"):
        assert again[p] == pytest.approx(t[p], abs=0.02), p
    assert "estimate" not in again and again["wall"] < again["total"]
    assert "2 training(s) and 2 evaluation(s) of it measured by earlier runs" in err


def test_a_finished_runs_model_does_not_outlive_train(tmp_path, monkeypatch):
    """Under bf16 accelerate wraps the model's forward in a bound method stored on the model: a reference cycle that
    kept each compare arm's weights alive, beside the next arm's, until Python's cycle collector ran."""
    import weakref

    from imtune.train import loop as training

    seen, real = [], training.build_training

    def spy(cfg, acc, model, ref, total_steps):
        seen.append(weakref.ref(model))
        return real(cfg, acc, model, ref, total_steps)

    monkeypatch.setattr(training, "build_training", spy)
    data = write_conversations(tmp_path / "d.jsonl", 8)
    training.train(tiny(data, tmp_path / "run", max_steps=1, batch_size=4, precision="bf16"))
    assert len(seen) == 1 and seen[0]() is None


@pytest.mark.parametrize("grad", [False, True])
def test_the_loss_holds_one_chunk_of_logits_at_a_time(grad):
    """Evaluation (every in-training evaluation and final scoring) and training turn hidden states into losses a
    [chunk, vocabulary] fp32 block of logits at a time, and hold one such block: 201 MB for the default chunk of 1024
    positions and a 49k vocabulary. cross_entropy on it would hold a second (its log-softmax) in evaluation."""
    import torch

    from imtune.model.loss import class_nll, weighted_nll

    if not clock.reset_peak():
        pytest.skip("the kernel does not let this process reset its peak RSS (/proc/self/clear_refs)")
    torch.manual_seed(0)
    hidden = torch.randn(8, 128, 64, requires_grad=grad)  # 1024 positions: one chunk
    head = torch.randn(49152, 64, requires_grad=grad) * 0.02
    labels = torch.randint(0, 49152, (8, 128))
    block = 1024 * 49152 * 4 / 2**20  # MB
    clock.reset_peak()
    before = clock.peak_rss_mb()
    if grad:
        weighted_nll(hidden, head, labels, torch.ones(8, 128)).nll_sum.backward()
    else:
        with torch.no_grad():
            cls, groups = torch.zeros(8, 128, dtype=torch.int8), torch.zeros(8, 128, dtype=torch.long)
            class_nll(hidden, head, labels, cls, groups, torch.ones(5, dtype=torch.bool))
    grown = clock.peak_rss_mb() - before
    assert 0.8 * block < grown < 1.5 * block, (grown, block)
