"""Files and hub datasets -> records, each with the Where it came from -> Conversations (via imtune.formats).

A spec is a local file or a hub dataset:

    data.jsonl / data.ndjson   one JSON object a line (blank lines allowed)           line = the record's line
    data.json                  a JSON array of objects, or JSON lines                 line = where its `{` starts
    data.csv / data.tsv        a header row, then one record a row                    line = the row's first line
    data.parquet               one record a row                                       line = row number (1-based)
    *.jsonl.gz, *.json.gz, *.csv.gz, *.tsv.gz                                         gzip'ed text files
    hf:owner/name[/config][:split]   datasets.load_dataset(name, [config], split=split or "train"); line = row number

Bad data never raises a traceback: a problem with one record is a Problem (`path:line: field: what, what to do`);
with on_invalid="error" all of them are collected and raised together as a DataError, with "skip" the valid records
are kept and each skipped one is reported in LoadResult.skipped. A problem with the whole file (empty, not UTF-8
where it cannot be read line by line, broken JSON array, unreadable Parquet) is a DataError; a wrong spec (no such
file, unknown extension, bad --field) is a UsageError.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .formats import CANONICAL_FIELDS, FORMATS, Survey, Understood, describe_formats, detect, to_conversation
from .types import Conversation, DataError, Problem, UsageError, Where

__all__ = ["FORMATS", "LoadResult", "load_conversations", "parse_fields", "read_records"]

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
ON_INVALID = ("error", "skip")

Item = tuple[Where, Any]  # a record as read, or a Problem standing for a record that could not be read


@dataclass(frozen=True)
class LoadResult:
    conversations: list[Conversation]
    skipped: list[Problem]  # one per record skipped under on_invalid="skip" (empty otherwise)
    path: str  # what was loaded (display)
    format: str  # the format used (detected or given)
    understood: Understood | None = None  # the format and field mapping in words, ignored fields


def load_conversations(spec: str, format: str = "auto", fields: dict[str, str] | None = None,
                       on_invalid: str = "error", max_problems: int = 20,
                       roles: dict[str, str] | None = None) -> LoadResult:
    """Load a file or `hf:` dataset as Conversations, detecting the format from the first record that fits one.
    `roles`: extra role spellings of the list formats (formats.parse_roles)."""
    fields = _check_fields(fields)
    if format != "auto" and format not in FORMATS:
        raise UsageError(f"unknown data format {format!r}; use one of auto, {', '.join(FORMATS)}")
    if on_invalid not in ON_INVALID:
        raise UsageError(f"on_invalid must be one of {', '.join(ON_INVALID)}, not {on_invalid!r}")
    path, items = read_records(spec)
    fmt = _detect(items, fields) if format == "auto" else format

    conversations: list[Conversation] = []
    problems: list[Problem] = []  # every problem of every bad record
    skipped: list[Problem] = []  # one a bad record
    survey = Survey(fmt, fields, dict(roles or {}))
    for where, value in items:
        survey.add(value)
        if isinstance(value, Problem):
            conversation, found = None, [value]
        else:
            conversation, found = to_conversation(value, where, fmt, fields, roles)
        if conversation is not None:
            conversations.append(conversation)
            continue
        problems += found
        first = found[0]
        more = f" (and {len(found) - 1} more problem(s) in this record)" if len(found) > 1 else ""
        skipped.append(Problem(first.where, first.field, first.message + more))
    if problems and (on_invalid == "error" or not conversations):  # skip mode with nothing left is an error too
        hint = "" if conversations else survey.nothing_valid(len(items))
        raise DataError(problems[:max(max_problems, 1)], total=len(problems), hint=hint)
    return LoadResult(conversations, skipped if on_invalid == "skip" else [], path, fmt,
                      survey.understood(detected=format == "auto"))


def parse_fields(items: list[str] | None) -> dict[str, str]:
    """["output=response", "instruction=question"] -> {"output": "response", "instruction": "question"}."""
    fields: dict[str, str] = {}
    for item in items or []:
        canonical, sep, key = (part.strip() for part in item.partition("="))
        if not sep or not canonical or not key:
            raise UsageError(f"--field {item!r}: expected FIELD=KEY, e.g. output=response")
        if fields.get(canonical, key) != key:
            raise UsageError(f"--field {canonical} is given twice ({fields[canonical]!r} and {key!r})")
        fields[canonical] = key
    return _check_fields(fields)


def _check_fields(fields: dict[str, str] | None) -> dict[str, str]:
    fields = dict(fields or {})
    for canonical, key in fields.items():
        if canonical not in CANONICAL_FIELDS:
            raise UsageError(f"unknown field {canonical!r} in the field map; use one of {', '.join(CANONICAL_FIELDS)}")
        if not isinstance(key, str) or not key:
            raise UsageError(f"field map: {canonical} must map to a key name (a non-empty string), not {key!r}")
    return fields


def _detect(items: list[Item], fields: dict[str, str]) -> str:
    """The format of the first record that fits one; a record that fits none is a problem with the whole file."""
    first = None
    for where, value in items:
        name = detect(value, fields)
        if name is not None:
            return name
        if first is None and isinstance(value, dict):
            first = (where, value)
    if first is None:  # no record is even an object: each one's own problem says why
        return next(iter(FORMATS))
    where, value = first
    raise DataError([Problem(where, "", (
        f"cannot tell the data format from the record's fields ({', '.join(map(str, value)) or 'none'}); "
        f"known formats and the fields that identify them: {describe_formats(fields)}. "
        f"Pass --format NAME and map its fields to yours, e.g. --field output=response"))],
        hint=f"imtune: 0 valid records of {len(items):,}: no record fits a known format as read; see above")


# ---- reading: spec -> (display path, records with their Where) ----------------------------------------------------

def read_records(spec: str) -> tuple[str, list[Item]]:
    """The records of a file or hub dataset, in order, each with its Where (unreadable ones as Problems)."""
    if spec.startswith("hf:"):
        return _read_hub(spec)
    path = Path(spec)
    if not path.exists():
        raise UsageError(f"{spec}: no such file")
    if path.is_dir():
        raise UsageError(f"{spec}: is a directory; pass a data file ({', '.join(SUFFIXES)}) or hf:owner/name")
    name = path.name.lower()
    gz = name.endswith(".gz")
    suffix = Path(name[:-3] if gz else name).suffix
    kind = SUFFIXES.get(suffix)
    if kind is None or (gz and kind == "parquet"):
        raise UsageError(f"{spec}: unknown file type {(suffix + ('.gz' if gz else '')) or '(no extension)'!r}; "
                         f"use {', '.join(SUFFIXES)} (text ones may be .gz) or hf:owner/name[:split]")
    try:
        if kind == "parquet":
            if path.stat().st_size == 0:
                raise DataError(f"{spec}: the file is empty")
            items = _read_parquet(path, spec)
        else:
            items = _read_text(path.read_bytes(), kind, gz, spec)
    except OSError as e:
        raise UsageError(f"{spec}: cannot read the file ({e.strerror or e})") from None
    if not items:
        raise DataError(f"{spec}: no records")
    return spec, items


def _read_text(data: bytes, kind: str, gz: bool, path: str) -> list[Item]:
    if gz:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: not a valid gzip file ({e})") from None
    if not data.strip():
        raise DataError(f"{path}: the file is empty")
    if kind == "jsonl":
        return _read_jsonl(data, path)
    if kind == "json":
        return _read_json(data, path)
    return _read_csv(data, path, "\t" if kind == "tsv" else ",")


def _utf8_problem(data: bytes, error: UnicodeDecodeError, where: Where) -> Problem:
    line_start = data.rfind(b"\n", 0, error.start) + 1
    column = error.start - line_start + 1
    return Problem(where, "", f"invalid UTF-8 (byte 0x{data[error.start]:02x} at column {column}); "
                              "re-save the file as UTF-8")


def _decode(data: bytes, path: str) -> str:
    """The whole file as text; invalid UTF-8 is a problem with the file, reported at its line."""
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise DataError([_utf8_problem(data, e, Where(path, data.count(b"\n", 0, e.start) + 1))]) from None


def _read_jsonl(data: bytes, path: str) -> list[Item]:
    """One JSON value a line. Split on "\\n" only: JSON strings may hold U+2028 and friends, which splitlines()
    would split on."""
    try:
        lines: list[str | bytes] = data.decode("utf-8").removeprefix("\ufeff").split("\n")
    except UnicodeDecodeError:  # decode line by line so only the bad lines become problems
        lines = data.removeprefix(b"\xef\xbb\xbf").split(b"\n")
    items: list[Item] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = Where(path, n, len(items))
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as e:
                items.append((where, _utf8_problem(line, e, where)))
                continue
        try:
            items.append((where, json.loads(line)))
        except json.JSONDecodeError as e:
            items.append((where, Problem(where, "", f"invalid JSON: {e.msg} at column {e.colno}; "
                                                    "each line must hold one complete JSON object")))
        except RecursionError:
            items.append((where, Problem(where, "", "invalid JSON: nested too deeply")))
    return items


_WS = re.compile(r"[ \t\n\r]*")


def _read_json(data: bytes, path: str) -> list[Item]:
    """A JSON array of records (line = where each element starts), or JSON lines in a .json file."""
    text = _decode(data, path)
    pos = _WS.match(text).end()
    if not text.startswith("[", pos):
        items = _read_jsonl(data, path)
        if text.startswith("{", pos) and isinstance(items[0][1], Problem):
            try:
                whole = json.loads(text)
            except (ValueError, RecursionError):
                whole = None
            if isinstance(whole, dict):
                raise DataError([Problem(items[0][0], "", "the file holds one JSON object; expected an array of "
                                                          "records [{...}, {...}] or one record per line")])
        return items

    decoder = json.JSONDecoder()
    items: list[Item] = []
    line, seen = 1, 0  # line number at text offset `seen`
    pos = _WS.match(text, pos + 1).end()
    while not items or text.startswith(",", pos):  # leaves at the closing `]`; `[]` has no records
        if items:
            pos = _WS.match(text, pos + 1).end()
        elif text.startswith("]", pos):
            break
        line += text.count("\n", seen, pos)
        seen = pos
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError([Problem(Where(path, e.lineno, len(items)), "",
                                     f"invalid JSON: {e.msg} at column {e.colno}; "
                                     "the array cannot be read past this point")]) from None
        except RecursionError:
            raise DataError([Problem(Where(path, line, len(items)), "", "invalid JSON: nested too deeply")]) from None
        items.append((Where(path, line, len(items)), value))
        pos = _WS.match(text, end).end()
    if not text.startswith("]", pos):
        where = Where(path, text.count("\n", 0, pos) + 1)
        raise DataError([Problem(where, "", "invalid JSON: expected ',' or ']' after the record "
                                            f"that starts on line {items[-1][0].line}")])
    end = _WS.match(text, pos + 1).end()
    if end != len(text):
        raise DataError([Problem(Where(path, text.count("\n", 0, end) + 1), "",
                                 "invalid JSON: extra data after the closing ']' of the array")])
    return items


def _read_csv(data: bytes, path: str, delimiter: str) -> list[Item]:
    """A header row, then one record a row; a row may span lines (quoted newlines): line = where it starts."""
    reader = csv.reader(io.StringIO(_decode(data, path), newline=""), delimiter=delimiter)
    header: list[str] | None = None
    items: list[Item] = []
    try:
        while True:
            start = reader.line_num + 1
            row = next(reader, None)
            if row is None:
                break
            if not row:  # a blank line
                continue
            if header is None:
                header = row
                continue
            where = Where(path, start, len(items))
            if len(row) != len(header):
                items.append((where, Problem(where, "", f"the row has {len(row)} cells but the header has "
                                                        f"{len(header)}; quote cells that contain {delimiter!r}")))
            else:
                items.append((where, dict(zip(header, row))))
    except csv.Error as e:
        raise DataError([Problem(Where(path, reader.line_num), "", f"unreadable CSV: {e}")]) from None
    return items


def _read_parquet(path: Path, display: str) -> list[Item]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{display}: not a readable Parquet file ({e})") from None
    return [(Where(display, i + 1, i), row) for i, row in enumerate(rows)]


def _read_hub(spec: str) -> tuple[str, list[Item]]:
    """hf:owner/name[/config][:split] through datasets.load_dataset; line = row number (1-based)."""
    name, _, split = spec[len("hf:"):].partition(":")
    parts = name.split("/")
    if not name or len(parts) > 3 or not all(parts) or ":" in split:
        raise UsageError(f"{spec}: expected hf:owner/name[/config][:split], e.g. hf:tatsu-lab/alpaca:train")
    split = split or "train"
    repo, config = "/".join(parts[:2]), (parts[2] if len(parts) == 3 else None)
    import datasets

    try:
        if config:
            dataset = datasets.load_dataset(repo, config, split=split)
        else:
            dataset = datasets.load_dataset(repo, split=split)
    except Exception as e:  # noqa: BLE001 - the hub fails in many ways (network, name, split); all are the user's
        raise UsageError(f"{spec}: could not load the dataset: {type(e).__name__}: {e}") from None
    display = f"hf:{name}:{split}"
    rows = dataset.to_list() if hasattr(dataset, "to_list") else list(dataset)
    if not rows:
        raise DataError(f"{display}: no records")
    return display, [(Where(display, i + 1, i), row) for i, row in enumerate(rows)]
