"""imtune study on random:tiny end to end: --factor ratio (synthetic family) and --factor n (nested subsets)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from imtune.cli import main
from imtune.results import StudyResult

COMMON = ["--model", "random:tiny", "--arms", "it,im", "--budget", "2", "--eval-every", "2", "--eval-train-sample", "4",
          "--batch-size", "4", "--max-length", "1024", "--lr", "1e-3", "--no-progress", "--threads", "1"]


def _check(out: Path, values: list[float]) -> dict:
    result = json.loads((out / "study.json").read_text())
    assert StudyResult.from_json(result).to_json() == result  # the typed record reads it back unchanged
    assert [r["value"] for r in result["rows"]] == values and result["difference"] == "im − it"
    for r in result["rows"]:
        cmp = json.loads((out / r["compare_dir"] / "compare.json").read_text())
        m = cmp["evidence"]["measures"]
        for key, name in (("heldout_loss", "final"), ("best_heldout_loss", "best")):
            assert r[name]["value"] == pytest.approx(m[key]["differences"]["im"]["value"])
            assert r[name]["low"] <= r[name]["value"] <= r[name]["high"]
        assert r["steps"] <= 2
    assert set(result["trend"]) == {"final", "best"}
    assert (out / "plots" / "study.png").read_bytes()[:4] == b"\x89PNG"
    assert "im − it" in (out / "report.md").read_text()
    return result


def test_study_ratio_on_synthetic_data(tmp_path, capsys):
    out = tmp_path / "ratio"
    argv = ["study", "--factor", "ratio", "--values", "60,20", "--family", "rule", "--n", "6", "--heldout", "4",
            *COMMON, "--out", str(out)]
    assert main(argv) == 0
    assert "trend (final)" in capsys.readouterr().out
    result = _check(out, [20.0, 60.0])
    ratios = [r["ratio_measured"] for r in result["rows"]]
    assert ratios[0] < ratios[1]  # the data really follows the factor
    assert main(argv) == 0  # resumable: nothing is trained again
    assert capsys.readouterr().err.count("already trained") == 4


def test_study_n_takes_nested_subsets_with_one_heldout_set(tmp_path, capsys):
    from imtune.data.synth import synthesize, write_jsonl

    train, held = synthesize("lookup", 8, 4.0, seed=0, heldout=4)
    data = write_jsonl(tmp_path / "d.jsonl", train, "lookup", 0, "train")
    heldout = write_jsonl(tmp_path / "h.jsonl", held, "lookup", 0, "heldout")
    out = tmp_path / "n"
    assert main(["study", "--factor", "n", "--values", "4,8", "--data", str(data), "--eval-data", str(heldout),
                 "--seeds", "0", *COMMON, "--out", str(out)]) == 0
    capsys.readouterr()
    result = _check(out, [4.0, 8.0])
    read = lambda p: [json.dumps(json.loads(x)["messages"]) for x in Path(p).read_text().splitlines()]  # noqa: E731
    small, large = read(out / "data" / "n-4.train.jsonl"), read(out / "data" / "n-8.train.jsonl")
    assert len(small) == 4 and len(large) == 8 and set(small) <= set(large)
    assert [r["n_train"] for r in result["rows"]] == [4, 8]
    tests = {r["n_test"] for r in result["rows"]}
    assert len(tests) == 1  # the same held-out (test) part for every value


def test_study_ratio_stratifies_a_real_data_file(tmp_path, capsys):
    """--factor ratio --data: equal-size bins of the examples' own instruction/output ratios (words), each with its
    own held-out part; the values are the ratios measured on each bin's training part, increasing."""
    import random

    rng = random.Random(0)
    vocab = "the a river town mayor reads writes small large old new green".split()
    lines = []
    for i in range(60):
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        lines.append(json.dumps({"messages": [
            {"role": "user", "content": f"q{i} " + " ".join(rng.choice(vocab) for _ in range(a))},
            {"role": "assistant", "content": " ".join(rng.choice(vocab) for _ in range(b))}]}))
    data = tmp_path / "real.jsonl"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "strata"
    argv = ["study", "--factor", "ratio", "--data", str(data), "--strata", "3", "--n", "6", "--heldout", "4",
            "--seeds", "0", *COMMON, "--out", str(out)]
    assert main(argv) == 0
    assert "stratum 3 of 3" in capsys.readouterr().out
    result = json.loads((out / "study.json").read_text())
    rows = result["rows"]
    assert result["strata"] == 3 and [r["stratum"] for r in rows] == [1, 2, 3]
    values = [r["value"] for r in rows]
    assert values == sorted(values) and len(set(values)) == 3 and result["values"] == values
    for lo, hi in zip(rows, rows[1:]):
        assert lo["ratio_high"] <= hi["ratio_low"]  # the bins do not overlap
    read = lambda p: [json.loads(x)["messages"][0]["content"] for x in Path(p).read_text().splitlines()]  # noqa: E731
    seen = set()
    for r in rows:
        train, held = read(out / "data" / f"stratum-{r['stratum']}.train.jsonl"), \
            read(out / "data" / f"stratum-{r['stratum']}.heldout.jsonl")
        assert len(train) == 6 and len(held) == 4 and not set(train) & set(held)
        assert not (set(train) | set(held)) & seen  # every example in one stratum only
        seen |= set(train) | set(held)
        assert r["n_train"] == 6 and r["ratio_low"] <= r["value"] <= r["ratio_high"]  # a weighted mean of its ratios
    assert "equal-size strata" in (out / "report.md").read_text()
    assert main([*argv[:-1], str(tmp_path / "x"), "--values", "1,2"]) == 2
    assert "--strata" in capsys.readouterr().err


def test_study_usage_errors(capsys):
    assert main(["study", "--factor", "ratio", "--values", "2,8"]) == 2
    assert "--family" in capsys.readouterr().err
    assert main(["study", "--factor", "n", "--values", "4", "--family", "rule"]) == 2
    assert "at least two" in capsys.readouterr().err


def test_study_dry_run_plans_every_value_and_their_sum_and_trains_nothing(tmp_path, capsys):
    out = tmp_path / "st"
    assert main(["study", "--factor", "ratio", "--values", "2,8", "--family", "rule", "--n", "8", "--heldout", "4",
                 "--seeds", "0,1", *COMMON, "--dry-run", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("plan: 4 run(s) to train") == 2  # one comparison per value: 2 arms x 2 seeds
    assert "study plan (2 values of ratio): 8 run(s) to train in 2 comparison(s); estimated ~" in err
    assert "--dry-run: nothing trained" in err
    assert not list(out.rglob("arms")) and not list(out.rglob("metrics.jsonl")) and not (out / "study.json").exists()
