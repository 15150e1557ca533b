"""The step-0 evaluation cache (imtune.train.baseline) does not trust its directory: an entry that is not exactly what
track.eval_losses returns — forged numbers, wrong types, lists that do not line up, extra metrics, broken JSON — is
a miss (recomputed by the caller) with a one-line note, never believed and never a traceback."""
from __future__ import annotations

import copy
import json

import pytest

from imtune.train import baseline

KEY = "ab" * 32
GOOD = {"key": KEY, "losses": {"eval_output_loss": 2.5, "eval_output_tokens": 12},
        "per_example": {"eval": {"source": ["d.jsonl:1", "d.jsonl:2"], "output_nll": [10.0, 20.0],
                                 "output_tokens": [4, 8]}},
        "first_run": "runs/a"}


@pytest.fixture
def entry(tmp_path, monkeypatch):
    monkeypatch.setenv("IMTUNE_CACHE", str(tmp_path))
    path = baseline.path_of(KEY)
    path.parent.mkdir(parents=True)
    return path


def forged(change) -> dict:
    e = copy.deepcopy(GOOD)
    change(e)
    return e


FORGERIES = {
    "another key": lambda e: e.update(key="cd" * 32),
    "losses a list": lambda e: e.update(losses=[2.5]),
    "an extra metric": lambda e: e["losses"].update(train_loss=0.0),
    "a loss as text": lambda e: e["losses"].update(eval_output_loss="2.5"),
    "a negative loss": lambda e: e["losses"].update(eval_output_loss=-1.0),
    "a token count as a fraction": lambda e: e["losses"].update(eval_output_tokens=3.5),
    "a token count as true": lambda e: e["losses"].update(eval_output_tokens=True),
    "a set missing from per_example": lambda e: e["per_example"].update(other=e["per_example"].pop("eval")),
    "lists of different lengths": lambda e: e["per_example"]["eval"]["output_nll"].append(5.0),
    "a source that is not text": lambda e: e["per_example"]["eval"]["source"].__setitem__(0, 7),
    "an nll as text": lambda e: e["per_example"]["eval"]["output_nll"].__setitem__(1, "20"),
    "a negative token count": lambda e: e["per_example"]["eval"]["output_tokens"].__setitem__(0, -4),
    "an extra per-example field": lambda e: e["per_example"]["eval"].update(note="x"),
    "per_example as a list": lambda e: e.update(per_example=[]),
}


def test_a_good_entry_is_read(entry, capsys):
    entry.write_text(json.dumps(GOOD))
    assert baseline.read(KEY) == (GOOD["losses"], GOOD["per_example"])
    assert baseline.read("cd" * 32) is None and capsys.readouterr().err == ""  # absent: a plain miss, no note


@pytest.mark.parametrize("name", FORGERIES)
def test_a_forged_entry_is_a_miss_with_a_note(entry, capsys, name):
    entry.write_text(json.dumps(forged(FORGERIES[name])))
    assert baseline.read(KEY) is None
    (note,) = capsys.readouterr().err.splitlines()
    assert note.startswith(f"imtune cache: ignored {entry} (") and note.endswith("evaluating step 0 again")


@pytest.mark.parametrize("text", [
    "{not json", "", json.dumps(GOOD)[:40], "[" * 100_000 + "]" * 100_000, "[1, 2]", "null",
    json.dumps(GOOD).replace("2.5", "NaN"), json.dumps(GOOD).replace("10.0", "Infinity"),
    json.dumps(GOOD).replace("12", "1" * 5000),
])
def test_a_broken_entry_is_a_miss_never_a_traceback(entry, capsys, text):
    entry.write_text(text)
    assert baseline.read(KEY) is None
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_bytes_that_are_not_utf8_are_a_miss(entry, capsys):
    entry.write_bytes(b"\xff\xfe{}")
    assert baseline.read(KEY) is None and "ignored" in capsys.readouterr().err
