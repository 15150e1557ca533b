"""GSM8K: answer extraction, prompts, references score 100% and wrong answers 0%, a generation run end to end."""
from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from imtune.cli import main
from imtune.tasks import gsm8k, score_samples
from imtune.types import DataError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TEST = DATA / "eval" / "gsm8k_test.jsonl"
needs_data = pytest.mark.skipif(not TEST.exists(), reason=f"{TEST} not found (../shared/data is absent)")


@pytest.mark.parametrize("completion, expected", [
    ("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18", "18"),
    ("So the total is 3 + 4 = 7. The answer is 7.", "7"),
    ("The answer is $1,200.", "1200"),
    ("The answer is: **-3**", "-3"),
    ("It costs 12.50 dollars.", "12.5"),
    ("First 5, then 6, finally 18.00.", "18"),
    ("The answer is 42. Then 7 more people came.", "42"),  # the marker wins over the last number
    ("The answer is 5.\n\nQ: Another question with 99 apples?\nA: The answer is 99.", "5"),  # cut at a new Q:
    ("I do not know.", None),
])
def test_extract_answer(completion, expected):
    assert gsm8k.extract_answer(completion) == expected


def test_prompts_have_the_requested_exemplars():
    eight = gsm8k.prompt("How many?", 8)
    assert len(eight) == 17 and eight[0].content.startswith("Q: There are 15 trees in the grove.")
    assert [m.role for m in eight[:2]] == ["user", "assistant"] and eight[-1].content == "Q: How many?"
    assert all(m.content.endswith(f"The answer is {gsm8k.normalize(m.content.split()[-1])}.")
               for m in eight[1:16:2])
    assert len(gsm8k.prompt("How many?", 3)) == 7
    [zero] = gsm8k.prompt("How many?", 0)
    assert zero.role == "user" and zero.content.endswith("How many?") and "The answer is N" in zero.content


def _samples(tmp_path: Path, rows) -> str:
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@needs_data
def test_references_score_100_and_wrong_answers_0(tmp_path):
    answers = [json.loads(line)["answer"] for line in TEST.read_text(encoding="utf-8").splitlines()]
    right = score_samples("gsm8k", _samples(tmp_path, [{"index": i, "completion": a} for i, a in enumerate(answers)]),
                          str(TEST))
    assert right["n"] == 1319 and right["accuracy"] == 1.0 and right["correct"] == 1319
    wrong = []
    for i, a in enumerate(answers):
        solution, final = a.rsplit("####", 1)
        wrong.append({"index": i, "completion": f"{solution}#### {Decimal(gsm8k.normalize(final)) + 1}"})
    result = score_samples("gsm8k", _samples(tmp_path, wrong), str(TEST))
    assert result["n"] == 1319 and result["accuracy"] == 0.0


@needs_data
def test_samples_errors_name_the_row(tmp_path, capsys):
    rows = [{"index": 0, "completion": "#### 18"}, {"index": 99999, "completion": "1"}, {"completion": "2"}]
    code = main(["bench", "gsm8k", "--samples", _samples(tmp_path, rows), "--data", str(TEST)])
    err = capsys.readouterr().err
    assert code == 2 and "samples.jsonl:2: no example {'index': 99999}" in err and "samples.jsonl:3: index:" in err
    assert "Traceback" not in err


def test_a_reference_without_final_answer_is_a_data_error(tmp_path):
    data = tmp_path / "gsm.jsonl"
    data.write_text(json.dumps({"question": "q", "answer": "#### 3"}) + "\n"
                    + json.dumps({"question": "q", "answer": "no marker"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"gsm.jsonl:2: answer: no final answer"):
        gsm8k.load(str(data), None, gsm8k.Options())


@needs_data
def test_generation_run_end_to_end(tmp_path, capsys):
    out, js = tmp_path / "out", tmp_path / "result.json"
    code = main(["bench", "gsm8k", "--model", "random:tiny", "--data", str(TEST), "--limit", "3",
                 "--max-new-tokens", "8", "--out", str(out), "--json", str(js)])
    assert code == 0
    result = json.loads(js.read_text())
    assert result["benchmark"] == "gsm8k" and result["n"] == 3 and 0.0 <= result["accuracy"] <= 1.0
    assert result["options"] == {"shots": 8} and result["generation"]["max_new_tokens"] == 8
    rows = [json.loads(line) for line in (out / "gsm8k-8shot.samples.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert all({"prompt", "completion", "reference", "correct"} <= set(r) for r in rows)
    assert "There are 15 trees in the grove" in rows[0]["prompt"]
    assert "| gsm8k-8shot | random:tiny | 3 |" in (out / "gsm8k-8shot.md").read_text()
    assert "gsm8k-8shot: accuracy" in capsys.readouterr().out
    # what a run writes can be scored again as samples
    again = score_samples("gsm8k", str(out / "gsm8k-8shot.samples.jsonl"), str(TEST), limit=3)
    assert again["accuracy"] == result["accuracy"] and again["n"] == 3
