"""Problems are for people: a corpus of broken files, each with the exact `path:line: field:` it must report.

The files are written by the tests; each case also checks that skip mode keeps exactly the valid records."""
import json

import pytest

from imtune.data import validate
from imtune.data.load import load_conversations
from imtune.types import Conversation, DataError, Message, UsageError, Where

OK_ALPACA = '{"instruction": "i", "output": "o"}'
OK_MESSAGES = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}'


def lines(*records: str) -> bytes:
    return ("\n".join(records) + "\n").encode()


# name -> (file name, bytes, [expected problem prefixes], index of the records skip mode keeps)
CORPUS = {
    "bad JSON on line 3": ("bad.jsonl", lines(OK_ALPACA, OK_ALPACA, '{"instruction": "i", "output": }', OK_ALPACA),
                           ["bad.jsonl:3: invalid JSON: Expecting value at column 32"], [0, 1, 3]),
    "missing output": ("missing.jsonl", lines(OK_ALPACA, '{"instruction": "i", "input": "x"}'),
                       ["missing.jsonl:2: output: missing (format alpaca); the record has fields instruction, input"],
                       [0]),
    "null output": ("null.jsonl", lines(OK_ALPACA, '{"instruction": "i", "output": null}'),
                    ["null.jsonl:2: output: is null"], [0]),
    "empty content": ("empty.jsonl", lines(
        OK_MESSAGES, '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  \\n"}]}'),
        ["empty.jsonl:2: messages[1].content: whitespace-only text"], [0]),
    "non-string content": ("nonstr.jsonl", lines(
        '{"messages": [{"role": "user", "content": ["q"]}, {"role": "assistant", "content": 3}]}', OK_MESSAGES),
        ["nonstr.jsonl:1: messages[0].content: expected a string, got a list",
         "nonstr.jsonl:1: messages[1].content: expected a string, got a number"], [1]),
    "unknown role": ("role.jsonl", lines(
        OK_MESSAGES, '{"messages": [{"role": "person", "content": "q"}, {"role": "assistant", "content": "a"}]}'),
        ["role.jsonl:2: messages[0].role: unknown role 'person'; use one of system, human, user, gpt, assistant; "
         "or map it with --role person=ROLE"], [0]),
    "no assistant": ("noasst.jsonl", lines(
        '{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}', OK_MESSAGES),
        ["noasst.jsonl:1: messages: no assistant turn"], [1]),
    "empty message list": ("nomsg.jsonl", lines(OK_MESSAGES, '{"messages": []}'),
                           ["nomsg.jsonl:2: messages: empty list"], [0]),
    "record not an object": ("notobj.jsonl", lines(OK_ALPACA, '["i", "o"]', '"text"'),
                             ["notobj.jsonl:2: the record is a list, expected an object",
                              "notobj.jsonl:3: the record is a string, expected an object"], [0]),
    "invalid UTF-8": ("utf8.jsonl",
                      lines(OK_ALPACA) + b'{"instruction": "caf\xe9", "output": "o"}\n' + lines(OK_ALPACA),
                      ["utf8.jsonl:2: invalid UTF-8 (byte 0xe9 at column 21)"], [0, 2]),
    "JSON array, bad element on line 6": ("arr.json", (
        b'[\n  {"instruction": "i",\n   "output": "o"},\n\n  {"instruction": "i2", "output": "o2"},\n'
        b'  {\n    "instruction": "i3"\n  },\n  {"instruction": "i4", "output": "o4"}\n]\n'),
        ["arr.json:6: output: missing"], [0, 1, 3]),
    "CSV with an empty cell": ("cells.csv", b'instruction,input,output\ni,,o\n"multi\nline",x,\ni3,,o3\n',
                               ["cells.csv:3: output: empty text"], [0, 2]),
    "CSV row with too many cells": ("wide.csv", b"prompt,completion\np,c\np,c,extra\n",
                                    ["wide.csv:3: the row has 3 cells but the header has 2"], [0]),
}


@pytest.mark.parametrize("name", list(CORPUS))
def test_broken_file_reports_path_line_field_and_skip_keeps_the_valid_ones(tmp_path, monkeypatch, name):
    filename, data, expected, kept = CORPUS[name]
    monkeypatch.chdir(tmp_path)  # relative paths, as a person types them, are what the messages show
    (tmp_path / filename).write_bytes(data)

    with pytest.raises(DataError) as error:
        load_conversations(filename)
    got = [str(p) for p in error.value.problems]
    assert len(got) == len(expected) == error.value.total, got
    for message, prefix in zip(got, expected):
        assert message.startswith(prefix), (message, prefix)

    result = load_conversations(filename, on_invalid="skip")
    assert [c.source.index for c in result.conversations] == kept
    assert len(result.skipped) == len({p.where.index for p in error.value.problems})
    assert all(str(p).startswith(filename + ":") for p in result.skipped)


def test_one_record_with_several_problems_is_one_skipped_entry(tmp_path):
    path = tmp_path / "two.jsonl"
    path.write_bytes(lines(OK_ALPACA, '{"instruction": "", "output": ""}'))
    result = load_conversations(str(path), on_invalid="skip")
    assert len(result.conversations) == 1
    [skipped] = result.skipped
    assert skipped.field == "instruction" and skipped.message.endswith("(and 1 more problem(s) in this record)")


@pytest.mark.parametrize("filename, data, message", [
    ("empty.jsonl", b"", "empty.jsonl: the file is empty"),
    ("blank.jsonl", b"\n  \n\n", "blank.jsonl: the file is empty"),
    ("empty.json", b"[ ]\n", "empty.json: no records"),
    ("empty.csv", b"instruction,output\n", "empty.csv: no records"),
    ("empty.parquet", b"", "empty.parquet: the file is empty"),
    ("junk.parquet", b"not parquet at all", "junk.parquet: not a readable Parquet file"),
    ("junk.jsonl.gz", b"not gzip", "junk.jsonl.gz: not a valid gzip file"),
    ("trailing.json", b'[{"prompt": "p", "completion": "c"},\n]', "trailing.json:2: invalid JSON: Expecting value"),
    ("unclosed.json", b'[{"prompt": "p", "completion": "c"}\n{"prompt": "p"}]',
     "unclosed.json:2: invalid JSON: expected ',' or ']' after the record that starts on line 1"),
    ("extra.json", b'[{"prompt": "p", "completion": "c"}]\n\n[]', "extra.json:3: invalid JSON: extra data"),
    ("object.json", b'{\n  "prompt": "p",\n  "completion": "c"\n}\n', "object.json:1: the file holds one JSON object"),
    ("latin1.json", b'[\n{"prompt": "\xe9"}]', "latin1.json:2: invalid UTF-8 (byte 0xe9 at column 13)"),
    ("latin1.csv", b'prompt,completion\np,c\n\xff,c\n', "latin1.csv:3: invalid UTF-8 (byte 0xff at column 1)"),
    ("keys.jsonl", b'{"question": "q", "answer": "a"}\n', "keys.jsonl:1: cannot tell the data format from the "
                                                          "record's fields (question, answer)"),
])
def test_whole_file_problems_are_data_errors_in_both_modes(tmp_path, monkeypatch, filename, data, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / filename).write_bytes(data)
    for mode in ("error", "skip"):
        with pytest.raises(DataError) as error:
            load_conversations(filename, on_invalid=mode)
        assert str(error.value).startswith(message), str(error.value)


def test_skip_mode_with_no_valid_record_left_is_an_error(tmp_path):
    path = tmp_path / "allbad.jsonl"
    path.write_bytes(lines('{"instruction": "i"}', "{oops"))
    with pytest.raises(DataError) as error:
        load_conversations(str(path), format="alpaca", on_invalid="skip")
    assert error.value.total == 2


def test_error_mode_lists_max_problems_but_counts_them_all(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text("\n".join(json.dumps({"instruction": "i", "output": ""}) for _ in range(50)))
    with pytest.raises(DataError) as error:
        load_conversations(str(path), max_problems=5)
    assert len(error.value.problems) == 5 and error.value.total == 50
    assert error.value.render().splitlines()[5] == "... and 45 more problem(s)"


@pytest.mark.parametrize("spec, message", [
    ("nope.jsonl", "nope.jsonl: no such file"),
    ("data.txt", "data.txt: unknown file type '.txt'"),
    (".", ".: is a directory"),
])
def test_wrong_specs_are_usage_errors(tmp_path, monkeypatch, spec, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(UsageError, match="^" + message):
        load_conversations(spec)


def test_wrong_arguments_are_usage_errors(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_bytes(lines(OK_ALPACA))
    with pytest.raises(UsageError, match="unknown data format 'csv'; use one of auto, messages"):
        load_conversations(str(path), format="csv")
    with pytest.raises(UsageError, match="on_invalid"):
        load_conversations(str(path), on_invalid="ignore")
    with pytest.raises(UsageError, match="unknown field 'answer'"):
        load_conversations(str(path), fields={"answer": "completion"})


def test_check_applies_the_same_rules_to_conversations_built_in_code():
    where = Where("synth", 4, 3)
    good = Conversation((Message("user", "q"), Message("assistant", "a"), Message("user", "more?")), where)
    assert validate.check(good) == []
    bad = Conversation((Message("user", " "), Message("bot", "a")), where)
    assert [str(p) for p in validate.check(bad)] == [
        "synth:4: messages[0].content: whitespace-only text; fill it in or remove the record",
        "synth:4: messages[1].role: unknown role 'bot'; use one of system, user, assistant",
        "synth:4: messages: no assistant turn; a conversation needs at least one assistant message to train on"]
    assert [p.message for p in validate.check(Conversation((), where))] == ["no messages"]


@pytest.mark.parametrize("value, words", [
    (None, "null"), (True, "true/false"), (1.5, "a number"), ("s", "a string"), ([], "a list"), ({}, "an object")])
def test_kind_names_json_values(value, words):
    assert validate.kind(value) == words


def test_no_valid_record_says_so_and_points_at_the_mapping(tmp_path, capsys):
    from imtune.cli import main

    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps({"instruction": f"q{i}", "answer": "a"}) for i in range(3)) + "\n")
    with pytest.raises(DataError) as error:
        load_conversations(str(path), format="alpaca")
    hint = error.value.hint
    assert hint.startswith("imtune: 0 valid records of 3: every record has a problem")
    assert "the records have instruction, answer" in hint and "--field output=answer" in hint
    assert main(["inspect", str(path), "--format", "alpaca"]) == 2
    err = capsys.readouterr().err
    assert "0 valid records of 3" in err and "--on-invalid skip" not in err  # skipping would leave nothing


def test_some_valid_records_still_suggest_skipping(tmp_path, capsys):
    from imtune.cli import main

    path = tmp_path / "half.jsonl"
    path.write_bytes(lines(OK_ALPACA, '{"instruction": "i", "note": "a"}'))
    with pytest.raises(DataError) as error:
        load_conversations(str(path))
    assert error.value.hint == ""
    assert main(["inspect", str(path)]) == 2
    assert "pass --on-invalid skip" in capsys.readouterr().err
