"""One reader for every JSON/JSONL input (imtune.data.records.read_records): judge outputs, bench samples and
references go through the same code as training data, so U+2028 inside a string survives and every record has its
own line."""
from __future__ import annotations

import gzip
import json

import pytest

from conftest import SHARED
from imtune.data.records import read_records
from imtune.evaluate.judge import read_outputs
from imtune.tasks import read_rows, score_samples
from imtune.types import DataError, Problem

ODD = "line one\u2028still one\u2029and \u0085 \x1c\x1d\x1e \r alone"  # every separator str.splitlines() splits on


def test_judge_outputs_with_u2028_round_trip(tmp_path):
    """Written exactly as `imtune judge --generate` writes them (ensure_ascii=False), read back unchanged."""
    path = tmp_path / "alpaca_eval-outputs.jsonl"
    rows = [{"instruction": "q0", "output": ODD, "generator": "m"}, {"instruction": "q1", "output": "plain",
                                                                     "generator": "m"}]
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    assert read_outputs(path) == rows


def test_bench_samples_json_array_reports_the_line_of_the_bad_element(tmp_path):
    path = tmp_path / "samples.json"
    path.write_text('[\n  {"index": 0, "completion": "#### 1"},\n\n  {"index": 1,\n   "completion": "#### 2"},\n'
                    '  7\n]\n', encoding="utf-8")
    with pytest.raises(DataError) as e:
        read_rows(str(path))
    assert [str(p) for p in e.value.problems] == [f"{path}:6: expected a JSON object"]
    path.write_text('[\n  {"index": 0, "completion": "#### 1"},\n  {"completion": "#### 2"}\n]\n', encoding="utf-8")
    assert [w.line for w, _ in read_rows(str(path))] == [2, 3]


def test_bench_samples_array_error_names_the_element_line(tmp_path):
    """End to end through score_samples: a sample without its key field is reported at its own line, not path:0."""
    data = SHARED / "eval" / "gsm8k_test.jsonl"
    if not data.exists():
        pytest.skip(f"{data} is absent")
    path = tmp_path / "samples.json"
    path.write_text('[{"index": 0, "completion": "#### 18"},\n {"completion": "2"}]', encoding="utf-8")
    with pytest.raises(DataError, match=r"samples\.json:2: index"):
        score_samples("gsm8k", str(path), str(data))


def test_object_with_a_list_field_keeps_element_lines(tmp_path):
    """BBH task files are {"canary": ..., "examples": [...]}: elements keep the line they start on."""
    path = tmp_path / "task.json"
    path.write_text('{"canary": "x [y] {z}",\n "examples": [\n  {"input": "a", "target": "b"},\n'
                    '  {"input": "c", "target": "d"}\n ]\n}\n', encoding="utf-8")
    _, items = read_records(str(path), list_key="examples")
    assert [(w.line, w.index, v) for w, v in items] == [(3, 0, {"input": "a", "target": "b"}),
                                                        (4, 1, {"input": "c", "target": "d"})]
    with pytest.raises(DataError, match="one JSON object"):
        read_records(str(path))


def test_gzip_jsonl_and_bad_lines_are_problems_at_their_line(tmp_path):
    path = tmp_path / "refs.jsonl.gz"
    path.write_bytes(gzip.compress(("\n" + json.dumps({"instruction": ODD, "output": "o"}, ensure_ascii=False)
                                    + "\n{broken\n").encode()))
    _, items = read_records(str(path))
    assert items[0][0].line == 2 and items[0][1]["instruction"] == ODD
    assert isinstance(items[1][1], Problem) and str(items[1][1]).startswith(f"{path}:3: invalid JSON")
    with pytest.raises(DataError, match=r"refs\.jsonl\.gz:3: invalid JSON"):
        read_outputs(path)
