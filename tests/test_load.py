"""Reading files and hub datasets: every container, the line each record starts on, field maps, real data."""
import csv
import gzip
import json
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from imtune.data.load import FORMATS, LoadResult, load_conversations, parse_fields
from imtune.types import DataError, UsageError, Where

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TRAIN = DATA / "train"

ALPACA = [{"instruction": "Add.", "input": "1 + 1", "output": "2"},
          {"instruction": "Say hi.", "input": "", "output": "hi"},
          {"instruction": "Greet\nwarmly.", "output": "Hello,\nfriend \u2028 (U+2028 inside)"}]
EXPECTED = [[("user", "Add.\n\n1 + 1"), ("assistant", "2")],
            [("user", "Say hi."), ("assistant", "hi")],
            [("user", "Greet\nwarmly."), ("assistant", "Hello,\nfriend \u2028 (U+2028 inside)")]]


def turns(result: LoadResult):
    return [[(m.role, m.content) for m in c.messages] for c in result.conversations]


def wheres(result: LoadResult):
    return [(c.source.line, c.source.index) for c in result.conversations]


def test_jsonl_lines_skip_blank_lines_and_count_them(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("\n" + json.dumps(ALPACA[0]) + "\n\n  \n" + json.dumps(ALPACA[1]) + "\r\n" + json.dumps(ALPACA[2]))
    result = load_conversations(str(path))
    assert (result.format, result.path, result.skipped) == ("alpaca", str(path), [])
    assert turns(result) == EXPECTED
    assert wheres(result) == [(2, 0), (5, 1), (6, 2)]
    assert result.conversations[0].source == Where(str(path), 2, 0)


def test_json_array_line_is_where_each_element_starts(tmp_path):
    path = tmp_path / "a.json"
    text = json.dumps(ALPACA, indent=4)  # element k starts on line 2 + 5k (input present) ...
    path.write_text(text)
    starts = [n for n, line in enumerate(text.split("\n"), 1) if line.strip() == "{"]
    assert wheres(load_conversations(str(path))) == [(line, i) for i, line in enumerate(starts)]
    path.write_text('[{"prompt": "a", "completion": "b"},\n\n  {"prompt": "c",\n "completion": "d"}, {"prompt": "e", '
                    '"completion": "f"}]')
    result = load_conversations(str(path))
    assert result.format == "prompt_completion"
    assert wheres(result) == [(1, 0), (3, 1), (4, 2)]


def test_json_file_with_json_lines_content_and_a_bom(tmp_path):
    path = tmp_path / "lines.json"
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(r) for r in ALPACA).encode())
    result = load_conversations(str(path))
    assert turns(result) == EXPECTED and wheres(result) == [(1, 0), (2, 1), (3, 2)]


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".json.gz"])
def test_gzip(tmp_path, suffix):
    path = tmp_path / ("a" + suffix)
    body = json.dumps(ALPACA, indent=1) if suffix == ".json.gz" else "\n".join(json.dumps(r) for r in ALPACA)
    path.write_bytes(gzip.compress(body.encode()))
    assert turns(load_conversations(str(path))) == EXPECTED


def test_csv_round_trip_with_multiline_cells(tmp_path):
    path = tmp_path / "a.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows({"input": "", **r} for r in ALPACA)
    result = load_conversations(str(path))
    assert result.format == "alpaca" and turns(result) == EXPECTED
    assert wheres(result) == [(2, 0), (3, 1), (4, 2)]  # header is line 1; the third row starts on line 4


def test_tsv(tmp_path):
    path = tmp_path / "a.tsv"
    path.write_text("question\tanswer\nq1\ta1\n\nq2\ta2\n")
    result = load_conversations(str(path), fields={"prompt": "question", "completion": "answer"})
    assert turns(result) == [[("user", "q1"), ("assistant", "a1")], [("user", "q2"), ("assistant", "a2")]]
    assert wheres(result) == [(2, 0), (4, 1)]


def test_parquet_round_trip_messages_and_row_numbers(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": ""}]},
            {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q3"},
                          {"role": "assistant", "content": "a3"}]}]
    path = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError, match=r"a\.parquet:2: messages\[1\]\.content: empty text"):
        load_conversations(str(path))
    result = load_conversations(str(path), on_invalid="skip")
    assert result.format == "messages"
    assert turns(result) == [[("user", "q"), ("assistant", "a")],
                             [("system", "s"), ("user", "q3"), ("assistant", "a3")]]
    assert wheres(result) == [(1, 0), (3, 2)]  # line = row number, 1-based
    assert [str(p.where) for p in result.skipped] == [f"{path}:2"]


def test_explicit_format_and_field_map(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"question": "q", "answer": "a", "instruction": "not this one"}\n')
    result = load_conversations(str(path), format="prompt_completion",
                                fields={"prompt": "question", "completion": "answer"})
    assert result.format == "prompt_completion" and turns(result) == [[("user", "q"), ("assistant", "a")]]
    # detection follows the field map too
    assert load_conversations(str(path), fields={"prompt": "question", "completion": "answer"}).format == \
        "prompt_completion"


def test_detection_uses_the_first_record_that_fits_a_format(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('not json\n{"instruction": "i"}\n{"instruction": "i", "output": "o"}\n')
    result = load_conversations(str(path), on_invalid="skip")
    assert result.format == "alpaca" and wheres(result) == [(3, 2)]
    assert [str(p).split(": ")[0:2] for p in result.skipped] == [[f"{path}:1", "invalid JSON"],
                                                                 [f"{path}:2", "output"]]


def test_hub_spec_calls_load_dataset_with_name_and_split(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.Dataset.from_list([{"instruction": "i", "output": "o"}, {"instruction": "j", "output": ""}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    result = load_conversations("hf:someone/alpaca-like", on_invalid="skip")
    assert calls == [(("someone/alpaca-like",), {"split": "train"})]
    assert result.path == "hf:someone/alpaca-like:train" and result.format == "alpaca"
    assert turns(result) == [[("user", "i"), ("assistant", "o")]]
    assert [str(p) for p in result.skipped] == ["hf:someone/alpaca-like:train:2: output: empty text; fill it in or "
                                                "remove the record"]
    load_conversations("hf:openai/gsm8k/main:test", fields={"prompt": "instruction", "completion": "output"},
                       on_invalid="skip")
    assert calls[1] == (("openai/gsm8k", "main"), {"split": "test"})


def test_hub_failures_are_usage_errors(monkeypatch):
    import datasets

    def unreachable(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(UsageError, match="hf:a/b: could not load the dataset: ConnectionError: no network"):
        load_conversations("hf:a/b")
    with pytest.raises(UsageError, match="expected hf:owner/name"):
        load_conversations("hf:a//b")


def test_parse_fields():
    assert parse_fields(None) == {} and parse_fields([]) == {}
    assert parse_fields(["output=response", " instruction = question "]) == {"output": "response",
                                                                             "instruction": "question"}
    assert parse_fields(["output=response", "output=response"]) == {"output": "response"}
    for bad in (["output"], ["=response"], ["output="], ["answer=completion"], ["output=a", "output=b"]):
        with pytest.raises(UsageError):
            parse_fields(bad)


def test_parse_fields_takes_ordered_alternatives():
    assert parse_fields(["output=output|response"]) == {"output": ["output", "response"]}
    assert parse_fields(["output = output | response ", "instruction=question"]) == {
        "output": ["output", "response"], "instruction": "question"}
    assert parse_fields(["output=response|response"]) == {"output": "response"}  # one key stays a string
    for bad in (["output=|"], ["output=a|b", "output=b|a"], ["ouptut=a|b"]):
        with pytest.raises(UsageError):
            parse_fields(bad)
    with pytest.raises(UsageError, match="did you mean 'output'"):
        parse_fields(["ouptut=a|b"])


MIXED = [{"instruction": "Add.", "output": "2"}, {"instruction": "Say hi.", "response": "hi"},
         {"instruction": "Count.", "input": "1 2", "output": "3"},
         {"question": "Why?", "response": "because", "output": "ignored: response comes first here"}]


@pytest.mark.parametrize("fields", [{"output": "output|response"}, {"output": ["output", "response"]}])
def test_a_file_spelling_a_field_two_ways_loads_with_alternatives(tmp_path, fields):
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in MIXED[:3]) + "\n")
    result = load_conversations(str(path), fields=fields)
    assert turns(result) == [[("user", "Add."), ("assistant", "2")], [("user", "Say hi."), ("assistant", "hi")],
                             [("user", "Count.\n\n1 2"), ("assistant", "3")]]
    assert "output|response → assistant" in result.understood.line()
    assert "response" not in result.understood.ignored  # an alternative is read, never "ignored"
    # The order decides when a record has both; nested alternatives (instruction=instruction|question) work alike.
    path.write_text(json.dumps(MIXED[3]) + "\n")
    both = load_conversations(str(path), format="alpaca",
                              fields={"output": ["response", "output"], "instruction": "instruction|question"})
    assert turns(both) == [[("user", "Why?"), ("assistant", "because")]]


def test_a_file_spelling_a_field_two_ways_fails_clearly_without_alternatives(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in MIXED[:3]) + "\n")
    with pytest.raises(DataError) as error:
        load_conversations(str(path))
    text = error.value.render()
    assert f"{path}:2: output: missing (format alpaca); the record has fields instruction, response" in text
    assert "1 record(s) have response instead of output: read either with --field output=output|response" in text
    with pytest.raises(DataError) as error:  # mapping only the other spelling moves the failure, and says so
        load_conversations(str(path), fields={"output": "response"})
    assert f"{path}:1: response: missing" in error.value.render()
    assert "--field output=response|output" in error.value.hint
    # A record with none of the alternatives names every key tried, at its file:line.
    path.write_text(json.dumps(MIXED[0]) + "\n" + json.dumps({"instruction": "x", "answer": "y"}) + "\n")
    with pytest.raises(DataError) as error:
        load_conversations(str(path), fields={"output": "output|response"})
    assert (f"{path}:2: output|response: missing (format alpaca; tried output, response); the record has fields "
            "instruction, answer; add one to the alternatives, e.g. --field output=output|response|NAME"
            in error.value.render())


def test_formats_registry_is_reexported():
    assert list(FORMATS) == ["messages", "sharegpt", "alpaca", "prompt_completion"]


text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1).filter(str.strip)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(st.fixed_dictionaries({"prompt": text, "completion": text}), min_size=1, max_size=6),
       indent=st.sampled_from([None, 0, 2]))
def test_any_text_round_trips_with_the_right_lines(tmp_path, records, indent):
    """Whatever the strings hold (newlines, U+2028, quotes), content comes back exactly and lines point at records."""
    for name, body in [("p.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in records)),
                       ("p.json", json.dumps(records, indent=indent, ensure_ascii=False))]:
        path = tmp_path / name
        path.write_text(body, encoding="utf-8")
        result = load_conversations(str(path))
        assert turns(result) == [[("user", r["prompt"]), ("assistant", r["completion"])] for r in records]
        raw = body.split("\n")
        for c in result.conversations:
            assert raw[c.source.line - 1].lstrip(" [,").startswith("{")


# ---- real data (../shared/data) -------------------------------------------------------------------------------------

def real(name: str) -> str:
    path = TRAIN / name
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (the shared data folder sits next to the repo)")
    return str(path)


def test_lima_1030_conversations_30_multi_turn_fast():
    path = real("lima.jsonl")
    start = time.perf_counter()
    result = load_conversations(path)
    seconds = time.perf_counter() - start
    assert result.format == "messages" and len(result.conversations) == 1030
    assert sum(len(c.messages) > 2 for c in result.conversations) == 30
    assert all(c.messages[-1].role == "assistant" for c in result.conversations)
    assert [c.source.line for c in result.conversations] == list(range(1, 1031))
    assert seconds < 2.0, f"loading LIMA took {seconds:.2f}s"  # ~0.03s; the bound leaves room for a busy machine


def test_alpagasus_dolly_2996():
    result = load_conversations(real("alpagasus_dolly_3k.jsonl"))
    assert result.format == "messages" and len(result.conversations) == 2996


def test_code_alpaca_2017_records_two_with_an_empty_output():
    """Code Alpaca 2k is a JSON array of 2,017 alpaca records; two have output "" (nothing to train on)."""
    path = real("code_alpaca_2k.json")
    with pytest.raises(DataError) as error:
        load_conversations(path)
    assert [str(p) for p in error.value.problems] == [
        f"{path}:1187: output: empty text; fill it in or remove the record",
        f"{path}:9297: output: empty text; fill it in or remove the record"]
    result = load_conversations(path, on_invalid="skip")
    assert result.format == "alpaca"
    assert len(result.conversations) + len(result.skipped) == 2017 and len(result.conversations) == 2015
    assert result.conversations[0].messages[0].content == ("What are the distinct values from the given list?\n\n"
                                                           "dataList = [3, 9, 3, 5, 7, 9, 5]")
    assert result.conversations[0].source.line == 2


def test_gsm8k_with_a_field_map():
    fields = parse_fields(["prompt=question", "completion=answer"])
    result = load_conversations(real("gsm8k_train.jsonl"), format="prompt_completion", fields=fields)
    assert len(result.conversations) == 7473
    assert result.conversations[0].messages[1].content.endswith("#### 72")


def test_the_commands_read_a_mixed_file_with_field_alternatives(tmp_path, capsys):
    from imtune.cli import main

    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in MIXED[:3]) + "\n")
    assert main(["data", "stats", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:2: output: missing" in err and "--field output=output|response" in err
    assert "Traceback" not in err and "usage:" not in err
    assert main(["data", "stats", str(path), "--field", "output=output|response"]) == 0
    out = capsys.readouterr().out
    assert f"{path}: 3 examples" in out and "output|response → assistant" in out
