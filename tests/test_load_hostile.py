"""Hostile data files: each becomes `path:line: what is wrong, what to do` (a DataError, like any bad record), never
a traceback, and never a silent choice.

- a JSON number with 100,000 digits (past Python's int digit limit) in JSONL, a JSON array, an object holding the
  record list, and JSON text inside a CSV cell;
- a `\\ud800` escape without its pair (half a character, which no tokenizer can encode), in a value or a key;
- JSON text in a cell nested past the parser's stack;
- a gzip bomb (a small .gz that inflates past IMTUNE_MAX_DECOMPRESSED), while an honest large .gz still reads;
- CSV and Parquet files that name a column twice; Parquet strings that are not UTF-8."""
from __future__ import annotations

import gzip
import json

import pytest

from imtune.data import validate
from imtune.data.load import load_conversations
from imtune.data.records import read_records
from imtune.types import Conversation, DataError, Message, Problem, UsageError, Where

HUGE = "1" * 100_000
OK = '{"instruction": "i", "output": "o"}'


def write(tmp_path, name: str, data: str | bytes):
    path = tmp_path / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return str(path)


def problem_lines(error: DataError) -> list[str]:
    return [str(p) for p in error.problems]


# -- numbers past the int digit limit --------------------------------------------------------------------------------
def test_a_huge_integer_in_jsonl_is_a_problem_of_its_line(tmp_path):
    path = write(tmp_path, "big.jsonl", "\n".join([OK, '{"instruction": "i", "output": "o", "n": ' + HUGE + "}", OK]))
    with pytest.raises(DataError) as e:
        load_conversations(path)
    (line,) = problem_lines(e.value)
    assert line.startswith(f"{path}:2: a number has more than ") and "digits" in line and "store it as a string" in line
    kept = load_conversations(path, on_invalid="skip")
    assert len(kept.conversations) == 2 and [str(p.where) for p in kept.skipped] == [f"{path}:2"]


def test_a_huge_integer_in_a_json_array_names_its_line(tmp_path):
    path = write(tmp_path, "big.json", f'[\n{OK},\n{{"instruction": "i",\n "output": {HUGE}}}\n]')
    with pytest.raises(DataError, match=r"big\.json:3: a number has more than .* digits.*cannot be read past"):
        load_conversations(path)


def test_a_huge_integer_beside_a_record_list_is_a_problem_not_a_traceback(tmp_path):
    path = write(tmp_path, "bbh.json", '{"n": ' + HUGE + ', "examples": [{"input": "q", "target": "a"}]}')
    _, items = read_records(path, list_key="examples")
    assert [type(v) for _, v in items] == [Problem] and "digits" in items[0][1].message


def test_a_huge_integer_or_deep_nesting_in_a_csv_cell_of_json(tmp_path):
    rows = [["messages"], ['[{"role": "user", "content": "q", "n": ' + HUGE + "}]"], ["[" * 20_000 + "]" * 20_000]]
    path = write(tmp_path, "cells.csv", "\n".join('"' + r[0].replace('"', '""') + '"' for r in rows) + "\n")
    with pytest.raises(DataError) as e:
        load_conversations(path, format="messages")
    assert problem_lines(e.value) == [f"{path}:{n}: messages: expected a list of messages, got a string that is not "
                                      "readable JSON (invalid, nested too deeply, or a number too long)"
                                      for n in (2, 3)]


# -- lone surrogates -------------------------------------------------------------------------------------------------
def test_a_lone_surrogate_in_jsonl_is_a_problem_and_pairs_are_fine(tmp_path):
    records = ['{"instruction": "i", "output": "half \\ud800 a character"}',  # lone high surrogate
               '{"instruction": "i", "output": "a smile \\ud83d\\ude00 is a pair"}',
               '{"instruction": "i", "output": "\\\\ud800 is only text here"}',  # an escaped backslash
               '{"instruction": "i\\udfff", "output": "o"}',  # lone low surrogate
               '{"instruction": "i", "output": "o", "\\udc00key": 1}']  # in a key the format ignores
    path = write(tmp_path, "s.jsonl", "\n".join(records))
    with pytest.raises(DataError) as e:
        load_conversations(path)
    assert problem_lines(e.value) == [
        f"{path}:{n}: a string holds {esc}, half of a UTF-16 surrogate pair and not a character; fix the \\u escape "
        "that wrote it (or remove it)" for n, esc in ((1, "\\ud800"), (4, "\\udfff"), (5, "\\udc00"))]
    kept = load_conversations(path, on_invalid="skip")
    assert [c.messages[1].content for c in kept.conversations] == ["a smile \U0001F600 is a pair",
                                                                  "\\ud800 is only text here"]


def test_a_lone_surrogate_in_a_json_array_names_its_element(tmp_path):
    path = write(tmp_path, "s.json", f'[\n{OK},\n{{"instruction": "i",\n  "output": "\\ud800"}}\n]')
    with pytest.raises(DataError, match=r"s\.json:3: a string holds \\ud800"):
        load_conversations(path)


def test_a_lone_surrogate_in_json_inside_a_csv_cell(tmp_path):
    cell = json.dumps([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a\ud800"}])
    path = write(tmp_path, "s.csv", 'messages\n"' + cell.replace('"', '""') + '"\n')
    with pytest.raises(DataError) as e:
        load_conversations(path)
    assert problem_lines(e.value) == [f"{path}:2: messages[1].content: holds \\ud800, half of a UTF-16 surrogate pair "
                                      "and not a character; fix the \\u escape that wrote it (or remove it)"]


def test_check_refuses_a_lone_surrogate_in_a_conversation_built_in_code():
    conv = Conversation((Message("user", "q"), Message("assistant", "a\udbff")), Where("code", 1))
    assert [str(p) for p in validate.check(conv)] == [
        "code:1: messages[1].content: holds \\udbff, half of a UTF-16 surrogate pair and not a character; fix the "
        "\\u escape that wrote it (or remove it)"]


# -- gzip bombs ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["bomb.jsonl.gz", "bomb.json.gz", "bomb.csv.gz"])
def test_a_gzip_bomb_is_refused_past_the_limit(tmp_path, monkeypatch, name):
    """16 MiB of one character compress to ~16 KB; with a 1 MiB limit reading stops at the limit (a JSONL line that
    never ends is not gathered whole either)."""
    path = write(tmp_path, name, gzip.compress(b" " * (16 << 20)))
    monkeypatch.setenv("IMTUNE_MAX_DECOMPRESSED", str(1 << 20))
    with pytest.raises(DataError) as e:
        load_conversations(path)
    assert str(e.value) == (f"{path}: decompresses to more than 1,048,576 bytes, refused as a possible gzip bomb; if "
                            "the file is genuine, raise IMTUNE_MAX_DECOMPRESSED (bytes)")


def test_a_file_under_the_limit_reads_whole_across_chunk_boundaries(tmp_path, monkeypatch):
    """Records longer than the 1 MiB read size, and lines split at every chunk boundary, read as the plain file."""
    records = [{"instruction": f"q{i}", "output": "x" * (i * 37_003 % 1_500_000 + 1)} for i in range(12)]
    body = "\r\n".join(json.dumps(r) for r in records) + "\n\n"
    plain = write(tmp_path, "a.jsonl", body)
    packed = write(tmp_path, "a.jsonl.gz", gzip.compress(body.encode()))
    monkeypatch.setenv("IMTUNE_MAX_DECOMPRESSED", str(len(body)))  # exactly enough
    expect = [(c.source.line, [m.content for m in c.messages]) for c in load_conversations(plain).conversations]
    got = [(c.source.line, [m.content for m in c.messages]) for c in load_conversations(packed).conversations]
    assert got == expect and len(got) == 12
    monkeypatch.setenv("IMTUNE_MAX_DECOMPRESSED", str(len(body) - 1))
    with pytest.raises(DataError, match="possible gzip bomb"):
        load_conversations(packed)


def test_a_bad_limit_is_a_usage_error(tmp_path, monkeypatch):
    path = write(tmp_path, "a.jsonl.gz", gzip.compress(OK.encode()))
    monkeypatch.setenv("IMTUNE_MAX_DECOMPRESSED", "4G")
    with pytest.raises(UsageError, match="IMTUNE_MAX_DECOMPRESSED='4G': give a number of bytes"):
        load_conversations(path)


# -- columns named twice, bytes that are not UTF-8 -------------------------------------------------------------------
def test_a_csv_header_that_names_a_column_twice_is_refused(tmp_path):
    path = write(tmp_path, "dup.csv", "instruction,output,output\ni,first,second\n")
    with pytest.raises(DataError) as e:
        load_conversations(path)
    assert problem_lines(e.value) == [f"{path}:1: the column 'output' appears more than once; rename the duplicates "
                                      "so each column has its own name"]


def test_a_parquet_file_that_names_a_column_twice_is_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "dup.parquet"
    table = pa.Table.from_arrays([pa.array(["i"]), pa.array(["first"]), pa.array(["second"])],
                                 names=["instruction", "output", "output"])
    pq.write_table(table, path)
    with pytest.raises(DataError) as e:
        load_conversations(str(path))
    assert str(e.value) == (f"{path}: the column 'output' appears more than once; rename the duplicates so each "
                            "column has its own name")


def test_parquet_strings_that_are_not_utf8_are_a_data_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    offsets = pa.py_buffer(b"\x00\x00\x00\x00\x02\x00\x00\x00")
    bad = pa.Array.from_buffers(pa.string(), 1, [None, offsets, pa.py_buffer(b"\xff\xfe")])
    path = tmp_path / "bytes.parquet"
    pq.write_table(pa.table({"instruction": bad, "output": pa.array(["o"])}), path)
    with pytest.raises(DataError, match=r"bytes\.parquet: a text column holds bytes that are not UTF-8 \(in rows 1 "):
        load_conversations(str(path))
