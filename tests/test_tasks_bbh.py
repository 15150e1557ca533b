"""BBH: prompt files, answer matching, targets score 100%, a CoT generation run end to end."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from imtune.cli import main
from imtune.tasks import bbh, score_samples

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BBH = DATA / "eval" / "bbh"
needs_data = pytest.mark.skipif(not BBH.is_dir(), reason=f"{BBH} not found (../shared/data is absent)")


@pytest.mark.parametrize("answer, target, ok", [
    ("(A)", "(A)", True), ("A", "(A)", True), ("A)", "(A)", True), ("(B) 12/25/1937", "(B)", True),
    ("(B)", "(A)", False), ("Because", "(B)", False), ("", "(A)", False),
    ("true", "True", True), ("] ]  )", "] ] )", True), ("Monsters, Inc", "Monsters, Inc", True),
    ("valid", "invalid", False), ("-50", "-50", True),
])
def test_matches(answer, target, ok):
    assert bbh.matches(answer, target) is ok


@pytest.mark.parametrize("completion, cot, expected", [
    ("Let's think step by step.\nA is B.\nSo the answer is (B).", True, "(B)"),
    ("So the answer is **True**.", True, "True"),
    ("the answer is: ] } ].", True, "] } ]"),
    ("Step one.\nFalse", True, "False"),  # no marker: the last line for CoT
    ("(C)\nbecause reasons", False, "(C)"),  # no marker: the first line answer-only
    ("A: No.\n\nQ: next question? So the answer is Yes.", False, "No"),  # cut at a new Q:
])
def test_extract_answer(completion, cot, expected):
    assert bbh.extract_answer(completion, cot) == expected


@needs_data
def test_every_prompt_file_has_three_exemplars_in_the_targets_form():
    for task in bbh.TASKS:
        shots = bbh.read_shots(BBH / "cot-prompts" / f"{task}.txt")
        assert shots.description and len(shots.exemplars) == 3, task
        targets = [e["target"] for e in json.loads((BBH / f"{task}.json").read_text())["examples"]]
        multiple_choice = bbh.CHOICE.fullmatch(targets[0]) is not None
        for _question, chain, answer in shots.exemplars:
            assert chain.startswith("Let's think step by step.") and "So the answer is" in chain
            assert (bbh.CHOICE.fullmatch(answer) is not None) == multiple_choice, (task, answer)
    cot = bbh.prompt("Is it?", bbh.read_shots(BBH / "cot-prompts" / "navigate.txt"), cot=True)
    plain = bbh.prompt("Is it?", bbh.read_shots(BBH / "cot-prompts" / "navigate.txt"), cot=False)
    assert len(cot) == len(plain) == 7 and cot[0].content.startswith("Given a series of navigation instructions")
    assert cot[1].content.startswith("Let's think step by step.") and plain[1].content in ("Yes", "No")
    assert cot[-1].content == plain[-1].content == "Q: Is it?"


def _target_samples(tmp_path: Path, wrong: bool = False) -> str:
    rows = []
    for task in bbh.TASKS:
        examples = json.loads((BBH / f"{task}.json").read_text())["examples"]
        other = {e["target"] for e in examples}
        for i, e in enumerate(examples):
            completion = e["target"]
            if wrong:  # a different target of the same task (every task has at least two)
                completion = sorted(other - {e["target"]})[0]
            rows.append({"task": task, "index": i, "completion": completion})
    path = tmp_path / ("wrong.jsonl" if wrong else "targets.jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@needs_data
@pytest.mark.parametrize("cot", [False, True])
def test_targets_score_100(tmp_path, cot):
    result = score_samples("bbh", _target_samples(tmp_path), str(BBH), cot=cot)
    assert result["n"] == 6511 and len(result["tasks"]) == 27
    assert result["accuracy"] == 1.0 and result["task_average"] == 1.0


@needs_data
def test_wrong_targets_score_0_and_selection_ignores_the_rest(tmp_path):
    assert score_samples("bbh", _target_samples(tmp_path, wrong=True), str(BBH))["accuracy"] == 0.0
    one = score_samples("bbh", _target_samples(tmp_path), str(BBH), limit=5, tasks=["snarks"])
    assert one["n"] == 5 and list(one["tasks"]) == ["snarks"] and one["ignored"] == 6511 - 5
    # one task: the samples may leave "task" out
    path = tmp_path / "snarks.jsonl"
    path.write_text("".join(json.dumps({"index": i, "completion": "(A)"}) + "\n" for i in range(4)))
    assert score_samples("bbh", str(path), str(BBH / "snarks.json"))["n"] == 4


@needs_data
def test_unknown_task_lists_the_valid_ones(capsys):
    assert main(["bench", "bbh", "--samples", "x.jsonl", "--data", str(BBH), "--tasks", "nope"]) == 2
    err = capsys.readouterr().err
    assert "no task nope" in err and "boolean_expressions" in err


@needs_data
def test_cot_generation_run_end_to_end(tmp_path, capsys):
    out, js = tmp_path / "out", tmp_path / "result.json"
    code = main(["bench", "bbh", "--model", "random:tiny", "--data", str(BBH), "--tasks",
                 "boolean_expressions,date_understanding", "--limit", "2", "--cot", "--max-new-tokens", "8",
                 "--template", "tulu", "--out", str(out), "--json", str(js)])
    assert code == 0
    result = json.loads(js.read_text())
    assert result["n"] == 4 and set(result["tasks"]) == {"boolean_expressions", "date_understanding"}
    assert result["label"] == "bbh-cot" and result["generation"]["template"] == "tulu"
    rows = [json.loads(line) for line in (out / "bbh-cot.samples.jsonl").read_text().splitlines()]
    assert [(r["task"], r["index"]) for r in rows] == [("boolean_expressions", 0), ("boolean_expressions", 1),
                                                       ("date_understanding", 0), ("date_understanding", 1)]
    assert rows[0]["prompt"].startswith("<|user|>\nEvaluate the result of a random Boolean expression.")
    assert rows[0]["prompt"].endswith("<|assistant|>\n")
    assert "| date_understanding | 2 |" in (out / "bbh-cot.md").read_text()
    assert "bbh-cot: accuracy" in capsys.readouterr().out
