"""`--keep final|best|both|none` (issue 26): what stays on disk of each run's models once compare has evaluated it,
and that a re-run neither retrains nor re-evaluates a run whose models are gone (the cached evaluation in
RUN/eval/compare.json keys on RUN/DONE, which stays). Compare's own Ctrl-C checkpoints go once a run is done; those
asked with --save-every stay (unless --keep none)."""
from __future__ import annotations

import json

import pytest

from helpers import word_data
from imtune.cli import main


def compare(data, out, *extra) -> list[str]:
    return ["compare", str(data), "--model", "random:tiny", "--arms", "it", "--max-steps", "4", "--eval-every", "2",
            "--batch-size", "2", "--bleu-samples", "2", "--max-new-tokens", "4", "--no-progress", "--threads", "1",
            "--out", str(out), *extra]


def stamps(run) -> dict:
    return {p.relative_to(run).as_posix(): p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_keep_none_leaves_metrics_and_evaluations_and_a_rerun_redoes_nothing(tmp_path, capsys):
    data = word_data(tmp_path / "d.jsonl", 30)
    out = tmp_path / "cmp"
    assert main(compare(data, out, "--keep", "none")) == 0
    run = out / "arms" / "it" / "seed-42"
    assert not any((run / d).exists() for d in ("final", "best", "checkpoints", ".old-final", ".old-best"))
    for f in ("DONE", "metrics.jsonl", "config.yaml", "eval/compare.json", "eval/compare-bleu.jsonl"):
        assert (run / f).is_file(), f
    first = capsys.readouterr()
    summary = json.loads((out / "compare.json").read_text())
    before = stamps(run)

    assert main(compare(data, out, "--keep", "none")) == 0
    again = capsys.readouterr()
    assert "already trained" in again.err and "already evaluated" in again.err
    assert "training ->" not in again.err and "evaluating" not in again.err
    assert stamps(run) == before  # nothing in the run was written again
    assert json.loads((out / "compare.json").read_text())["evidence"] == summary["evidence"]  # the same results
    assert first.out.splitlines()[0] == again.out.splitlines()[0]  # the same headline

    # Another evaluation cannot be made without the model: said in one line, nothing retrained.
    assert main(compare(data, out, "--keep", "none", "--bleu-samples", "3")) == 2
    err = capsys.readouterr().err
    assert "final was removed after its evaluation (--keep)" in err and "Traceback" not in err
    assert stamps(run) == before


@pytest.mark.slow
@pytest.mark.parametrize("keep, gone, stays, extra", [
    ("best", ["final", "checkpoints"], ["best"], ["--lr", "1e-1"]),  # held-out loss turns up: best is step 2 of 4
    ("best", ["checkpoints"], ["final", "best"], []),  # still falling: best/ is final/'s model (best.json alone)
    ("final", ["best", "checkpoints"], ["final"], []),
    ("both", ["checkpoints"], ["final", "best"], []),
])
def test_keep_one_model(tmp_path, capsys, keep, gone, stays, extra):
    data = word_data(tmp_path / "d.jsonl", 30)
    out = tmp_path / "cmp"
    assert main(compare(data, out, "--keep", keep, *extra)) == 0
    run = out / "arms" / "it" / "seed-42"
    assert [d for d in gone if (run / d).exists()] == [] and all((run / d).is_dir() for d in stays)
    if keep == "best":
        same = json.loads((run / "best" / "best.json").read_text()).get("same_as") == "final"
        assert same is ("final" in stays)  # final/ stays exactly when it is the best model
    capsys.readouterr()
    assert main(compare(data, out, "--keep", keep, *extra)) == 0
    err = capsys.readouterr().err
    assert "already trained" in err and "already evaluated" in err


@pytest.mark.slow
def test_checkpoints_asked_for_stay_and_keep_best_without_a_best_keeps_final(tmp_path):
    data = word_data(tmp_path / "d.jsonl", 30)
    out = tmp_path / "cmp"
    assert main(compare(data, out, "--keep", "best", "--save-every", "2", "--val-fraction", "0")) == 0
    run = out / "arms" / "it" / "seed-42"
    assert (run / "final").is_dir() and not (run / "best").exists()  # no validation part, no best/: final/ stays
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2", "step-4"]  # --save-every's own


def test_keep_is_checked_before_anything_is_written(tmp_path, capsys):
    for command in (compare(tmp_path / "d.jsonl", tmp_path / "cmp", "--keep", "some"),
                    ["sweep", "d.jsonl", "--keep", "some", "--out", str(tmp_path / "cmp")],
                    ["study", "--factor", "n", "--values", "4,8", "--keep", "some", "--out", str(tmp_path / "cmp")]):
        with pytest.raises(SystemExit) as e:
            main(command)
        assert e.value.code == 2
        assert "argument --keep: invalid choice: 'some'" in capsys.readouterr().err
        assert not (tmp_path / "cmp").exists()
