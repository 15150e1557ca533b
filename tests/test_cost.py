"""imtune.train.cost: the plan `compare` prints before its first step (and alone with --dry-run) counts what the real
run then does: examples, optimizer steps, evaluation points and held-out examples per point."""
from __future__ import annotations

import json
import re

from imtune.cli import main
from imtune.data.synth import synthesize, write_jsonl
from imtune.rundir.read import metrics as read_metrics


def test_the_plan_counts_what_the_run_then_does(tmp_path, capsys):
    train, held = synthesize("lookup", 12, 8.0, seed=0, heldout=10)
    data = write_jsonl(tmp_path / "d.jsonl", train, "lookup", 0, "train")
    heldout = write_jsonl(tmp_path / "h.jsonl", held, "lookup", 0, "heldout")
    out = tmp_path / "cmp"
    argv = ["compare", str(data), "--eval-data", str(heldout), "--model", "random:tiny", "--arms", "it,im",
            "--seeds", "0", "--epochs", "2", "--batch-size", "2", "--no-packing", "--eval-every", "3",
            "--eval-train-sample", "4", "--max-length", "512", "--bleu-samples", "0", "--exact-match", "3",
            "--no-progress", "--threads", "1", "--out", str(out)]
    assert main([*argv, "--dry-run"]) == 0
    err = capsys.readouterr().err
    plan = re.search(r"plan: (\d+) run\(s\) to train; each ([\d,]+) examples, ([\d,]+) training tokens in ([\d,]+) "
                     r"optimizer steps; (\d+) evaluation points × ([\d,]+) examples; (\d+) greedy answers", err)
    assert plan, err
    runs, examples, _, steps, evals, per_eval, gens = (int(x.replace(",", "")) for x in plan.groups())
    assert "estimated: ~" in err and "B of disk" in err and "--dry-run: nothing trained" in err
    assert not list(out.glob("arms/*/seed-*/metrics.jsonl"))  # nothing trained
    assert main(argv) == 0
    capsys.readouterr()
    summary = json.loads((out / "compare.json").read_text())
    assert runs == 2 and examples == summary["data"]["n_train"] == 12 and gens == 3
    for run in out.glob("arms/*/seed-0"):
        evals_done = [e for e in read_metrics(run, "eval") if e.get("eval_output_loss") is not None]
        assert max(e["step"] for e in read_metrics(run, "train")) == steps
        assert len(evals_done) == evals
    assert per_eval == summary["data"]["n_val"] + summary["data"]["n_test"] + 4
    assert main(argv) == 0  # all trained: no plan, nothing to estimate
    assert "plan:" not in capsys.readouterr().err


def test_train_prints_its_plan_and_dry_run_makes_no_directory(tmp_path, capsys):
    """`imtune train --dry-run` prints the plan and nothing else happens; the real run prints the same plan before its
    first step and then takes the steps and evaluations the plan said."""
    train, held = synthesize("lookup", 12, 8.0, seed=0, heldout=6)
    data = write_jsonl(tmp_path / "d.jsonl", train, "lookup", 0, "train")
    heldout = write_jsonl(tmp_path / "h.jsonl", held, "lookup", 0, "heldout")
    run = tmp_path / "run"
    argv = ["train", str(data), "--eval-data", str(heldout), "--model", "random:tiny", "--epochs", "2",
            "--batch-size", "2", "--no-packing", "--eval-every", "2", "--eval-train-sample", "4",
            "--max-length", "512", "--no-progress", "--threads", "1", "--output-dir", str(run)]
    assert main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr()
    pattern = (r"plan: ([\d,]+) examples, ([\d,]+) training tokens in ([\d,]+) optimizer steps \(([\d.]+) epochs\); "
               r"(\d+) evaluation points × ([\d,]+) examples\n  estimated: ~\d+ min on this machine")
    plan = re.search(pattern, out.err)
    assert plan, out.err
    assert "--dry-run: nothing trained" in out.err and not out.out and not run.exists()
    examples, tokens, steps, epochs, evals, per_eval = (float(x.replace(",", "")) for x in plan.groups())
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert re.search(pattern, err).groups() == plan.groups()  # the same plan, before the first step
    assert err.index("plan:") < err.index("eval @ step 0")
    steps_done = [r["step"] for r in read_metrics(run, "train")]
    assert steps_done == list(range(1, int(steps) + 1)) and examples == 12 and epochs == 2
    assert len(read_metrics(run, "eval")) == evals and per_eval == 4 + 6
    assert tokens == read_metrics(run, "train")[-1]["tokens"]  # whole epochs: exact


def test_a_long_plan_offers_the_quick_preset_only_to_a_run_not_already_using_it():
    from imtune.train.cost import SLOW, Cost

    long = dict(runs=6, examples=229, tokens=81_920, steps=40, evals=5, eval_examples=42, generations=16,
                max_new_tokens=128, train_tokens_per_s=63.0, gen_tokens_per_s=4.4, disk_bytes=0, seconds=SLOW * 7)
    assert "--preset cpu-quick" in Cost(**long).text()
    quick = Cost(**long, preset="cpu-quick").text()
    assert "brings it to about a quarter" in quick and "--preset cpu-quick" not in quick


def test_the_measured_rates_are_kept_a_day_and_never_trusted_blindly(tmp_path, monkeypatch):
    """A repeated plan does not load the model again: the rates of (model fingerprint, row, threads, torch, CPU) are
    kept MEASURE_HOURS in the cache directory (this test's own). A stale, damaged or linked entry, or
    IMTUNE_NO_CACHE=1, measures again."""
    import os
    import time

    from imtune.train import cost

    monkeypatch.setenv("IMTUNE_CACHE", str(tmp_path))
    monkeypatch.delenv("IMTUNE_NO_CACHE", raising=False)
    monkeypatch.delenv("IMTUNE_MEASURE_HOURS")  # the suite's own setting (conftest): measure every time
    calls = []
    monkeypatch.setattr(cost, "_measure_now", lambda spec, n: calls.append((spec, n)) or (100.0, 5.0, 1234))

    def rates():
        cost._measure.cache_clear()  # a new process
        return cost._measure("random:tiny", 64)

    assert rates() == (100.0, 5.0, 1234) and rates() == (100.0, 5.0, 1234) and len(calls) == 1
    (entry,) = (tmp_path / "measure").glob("*.json")
    old = time.time() - 3600 * (cost.MEASURE_HOURS + 1)
    os.utime(entry, (old, old))
    assert rates() and len(calls) == 2  # stale: measured again, and kept again
    for bad in ('{"rates": [-1, 5, 1234]}', '{"rates": [1e999, 5, 1234]}', "not json", '{"rates": [1, 2]}'):
        entry.write_text(bad)
        assert rates() == (100.0, 5.0, 1234)
    assert len(calls) == 6
    entry.unlink()
    (tmp_path / "elsewhere.json").write_text('{"rates": [1.0, 1.0, 1]}')
    entry.symlink_to(tmp_path / "elsewhere.json")
    assert rates() == (100.0, 5.0, 1234) and len(calls) == 7  # a link is not read (and is not written through)
    assert (tmp_path / "elsewhere.json").read_text() == '{"rates": [1.0, 1.0, 1]}'
    monkeypatch.setenv("IMTUNE_NO_CACHE", "1")
    rates()
    rates()
    assert len(calls) == 9
    monkeypatch.delenv("IMTUNE_NO_CACHE")
    monkeypatch.setenv("IMTUNE_MEASURE_HOURS", "0")
    rates()
    rates()
    assert len(calls) == 11
