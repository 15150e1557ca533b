"""The one reader of JSON/JSONL/CSV/Parquet/hub records: spec -> (display path, records with their Where).

Training data, judge outputs, bench samples and references all come through here, so `path:line` means the same
everywhere and U+2028 inside a JSON string survives (JSONL is split on "\n" only, never str.splitlines()). Records
are streamed: a JSONL or Parquet file is never held whole.

A spec is a local file or a hub dataset:

    data.jsonl / data.ndjson   one JSON object a line (blank lines allowed)           line = the record's line
    data.json                  a JSON array of objects, or JSON lines                 line = where its `{` starts
    data.csv / data.tsv        a header row, then one record a row                    line = the row's first line
    data.parquet               one record a row                                       line = row number (1-based)
    *.jsonl.gz, *.json.gz, *.csv.gz, *.tsv.gz                                         gzip'ed text files
    hf:owner/name[/config][:split]   datasets.load_dataset(name, [config], split=split or "train"); line = row number

A .gz file is refused once it decompresses past IMTUNE_MAX_DECOMPRESSED bytes (default 4 GiB: a gzip bomb is a small
file that inflates past any memory). CSV and Parquet files that name a column twice are refused (a record would
silently keep one of the two). JSON numbers too long for Python's int (over 4,300 digits) and `\ud800` escapes
without their pair (half a character) are problems of their record.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
import sys
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from imtune.data.validate import lone_surrogate, surrogate_message
from imtune.types import DataError, Problem, UsageError, Where

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
Item = tuple[Where, Any]  # a record as read, or a Problem standing for a record that could not be read

MAX_DECOMPRESSED = 4 << 30  # bytes a .gz file may decompress to, unless IMTUNE_MAX_DECOMPRESSED says otherwise


def read_records(spec: str, split: str = "train", list_key: str | None = None) -> tuple[str, list[Item]]:
    """The records of a file or hub dataset, in order, each with its Where (unreadable ones as Problems)."""
    path, items = stream_records(spec, split, list_key)
    return path, list(items)


def stream_records(spec: str, split: str = "train", list_key: str | None = None) -> tuple[str, Iterator[Item]]:
    """(display path, an iterator over the records with their Where). The spec is checked now (UsageError); problems
    with the contents (DataError, or a Problem in place of a record) come while iterating.

    split: the hub split when the spec gives none. list_key: a .json file may also be one object whose `list_key`
    field holds the list of records (BBH's {"examples": [...]})."""
    if spec.startswith("hf:"):
        return _read_hub(spec, split)
    path = Path(spec).expanduser()
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
        if path.stat().st_size == 0:
            raise DataError(f"{spec}: the file is empty")
        path.open("rb").close()  # unreadable (permissions) is the user's to fix: say so now, not mid-stream
    except OSError as e:
        raise UsageError(f"{spec}: cannot read the file ({e.strerror or e})") from None
    return spec, _nonempty(_read_file(path, kind, gz, spec, list_key), spec)


def _nonempty(items: Iterator[Item], spec: str) -> Iterator[Item]:
    empty = True
    for item in items:
        empty = False
        yield item
    if empty:
        raise DataError(f"{spec}: no records")


def _read_file(path: Path, kind: str, gz: bool, spec: str, list_key: str | None) -> Iterator[Item]:
    try:
        with (gzip.open(path, "rb") if gz else path.open("rb")) as f:
            if kind == "parquet":
                yield from _read_parquet(path, spec)
            elif kind == "jsonl":
                yield from _read_jsonl(_lines(_gunzip(f, spec)) if gz else f, spec)
            else:
                data = b"".join(_gunzip(f, spec)) if gz else f.read()
                if not data.strip():
                    raise DataError(f"{spec}: the file is empty")
                if kind == "json":
                    yield from _read_json(data, spec, list_key)
                else:
                    yield from _read_csv(data, spec, "\t" if kind == "tsv" else ",")
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"{spec}: not a valid gzip file ({e})") from None
    except OSError as e:
        raise UsageError(f"{spec}: cannot read the file ({e.strerror or e})") from None


def max_decompressed() -> int:
    value = os.environ.get("IMTUNE_MAX_DECOMPRESSED", "").strip()
    if not value:
        return MAX_DECOMPRESSED
    if not value.isdigit():
        raise UsageError(f"IMTUNE_MAX_DECOMPRESSED={value!r}: give a number of bytes, e.g. {MAX_DECOMPRESSED}")
    return int(value)


def _gunzip(f, spec: str) -> Iterator[bytes]:
    """A gzip file's decompressed bytes, 1 MiB at a time, refused once they pass max_decompressed()."""
    limit, total = max_decompressed(), 0
    while chunk := f.read(1 << 20):
        total += len(chunk)
        if total > limit:
            raise DataError(f"{spec}: decompresses to more than {limit:,} bytes, refused as a possible gzip bomb; "
                            "if the file is genuine, raise IMTUNE_MAX_DECOMPRESSED (bytes)")
        yield chunk


def _lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Chunks of bytes -> lines split at b"\\n" only (as iterating a binary file gives them, less the b"\\n")."""
    pending: list[bytes] = []  # the start of a line that runs on into the next chunk
    for chunk in chunks:
        *complete, rest = chunk.split(b"\n")
        if complete:
            complete[0] = b"".join([*pending, complete[0]])
            pending = []
            yield from complete
        pending.append(rest)
    if any(pending):
        yield b"".join(pending)


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


def _read_jsonl(f: Iterable[bytes], path: str) -> Iterator[Item]:
    """One JSON value a line, from a binary file (or any iterable of byte lines): its lines end at b"\\n" only, so a
    JSON string may hold U+2028 and friends, which str.splitlines() would split on. Blank lines are skipped (a file
    of blank lines only is empty). An invalid line is a Problem in place of its record."""
    n_items = 0
    for n, line in enumerate(f, 1):
        if n == 1:
            line = line.removeprefix(b"\xef\xbb\xbf")
        if not line.strip():
            continue
        where = Where(path, n, n_items)
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            n_items += 1
            yield where, _utf8_problem(line, e, where)
            continue
        if not text.strip():
            continue
        n_items += 1
        yield where, _parse(text, where)
    if n_items == 0:
        raise DataError(f"{path}: the file is empty")


def _parse(text: str, where: Where) -> Any:
    """One JSON line -> its value, or a Problem saying what is wrong with it."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return Problem(where, "", f"invalid JSON: {e.msg} at column {e.colno}; "
                                  "each line must hold one complete JSON object")
    except RecursionError:
        return Problem(where, "", "invalid JSON: nested too deeply")
    except ValueError:  # the only other thing json raises: an integer beyond Python's digit limit
        return Problem(where, "", _too_long())
    return _characters_checked(value, text, where)


def _too_long() -> str:
    """What json's ValueError other than JSONDecodeError means (only Pythons with an int digit limit raise it)."""
    return f"a number has more than {sys.get_int_max_str_digits():,} digits, too many to read; store it as a string"


_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89abcdefABCDEF]")  # how a lone surrogate can get into JSON text


def _characters_checked(value: Any, text: str, where: Where, start: int = 0, end: int | None = None) -> Any:
    """value, or a Problem when a string in it holds a lone surrogate (only looked for where text[start:end], the
    JSON it was read from, has a surrogate escape: a valid pair decodes to one whole character)."""
    if not _ESCAPED_SURROGATE.search(text, start, len(text) if end is None else end):
        return value
    escape = lone_surrogate(value)
    return Problem(where, "", f"a string {surrogate_message(escape)}") if escape else value


_WS = re.compile(r"[ \t\n\r]*")


def _read_json(data: bytes, path: str, list_key: str | None = None) -> Iterator[Item]:
    """A JSON array of records (line = where each element starts), an object whose `list_key` field is that array
    (when list_key is given), or JSON lines in a .json file."""
    text = _decode(data, path)
    pos = _WS.match(text).end()
    start = _find_list(text, pos, list_key) if list_key and text.startswith("{", pos) else None
    if start is not None:
        yield from _array(text, start, path, top_level=False)
    elif text.startswith("[", pos):
        yield from _array(text, pos, path, top_level=True)
    else:
        items = _read_jsonl(io.BytesIO(data), path)
        first = next(items)
        if text.startswith("{", pos) and isinstance(first[1], Problem):
            try:
                whole = json.loads(text)
            except (ValueError, RecursionError):
                whole = None
            if isinstance(whole, dict):
                expected = "an array of records [{...}, {...}]" + (f", {{{list_key!r}: [...]}}" if list_key else "")
                raise DataError([Problem(first[0], "", f"the file holds one JSON object; expected {expected} "
                                                       "or one record per line")])
        yield first
        yield from items


def _array(text: str, pos: int, path: str, top_level: bool) -> Iterator[Item]:
    """The elements of the JSON array whose `[` is at text[pos], each with the line where it starts. top_level: the
    array is the whole file (nothing may follow its `]`)."""
    decoder = json.JSONDecoder()
    n = 0
    line, seen = text.count("\n", 0, pos) + 1, pos  # line number at text offset `seen`
    pos = _WS.match(text, pos + 1).end()
    while not n or text.startswith(",", pos):  # leaves at the closing `]`; `[]` has no records
        if n:
            pos = _WS.match(text, pos + 1).end()
        elif text.startswith("]", pos):
            break
        line += text.count("\n", seen, pos)
        seen = pos
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError([Problem(Where(path, e.lineno, n), "",
                                     f"invalid JSON: {e.msg} at column {e.colno}; "
                                     "the array cannot be read past this point")]) from None
        except RecursionError:
            raise DataError([Problem(Where(path, line, n), "", "invalid JSON: nested too deeply")]) from None
        except ValueError:  # an integer beyond Python's digit limit
            raise DataError([Problem(Where(path, line, n), "", f"{_too_long()}; the array cannot be read past "
                                                               "this point")]) from None
        yield Where(path, line, n), _characters_checked(value, text, Where(path, line, n), pos, end)
        n += 1
        pos = _WS.match(text, end).end()
    if not text.startswith("]", pos):
        where = Where(path, text.count("\n", 0, pos) + 1)
        raise DataError([Problem(where, "", "invalid JSON: expected ',' or ']' after the record "
                                            f"that starts on line {line}")])
    end = _WS.match(text, pos + 1).end()
    if top_level and end != len(text):
        raise DataError([Problem(Where(path, text.count("\n", 0, end) + 1), "",
                                 "invalid JSON: extra data after the closing ']' of the array")])


def _find_list(text: str, pos: int, key: str) -> int | None:
    """The offset of the `[` that starts field `key`'s value in the JSON object whose `{` is at text[pos]; None when
    the object has no such list (or is not valid JSON: the caller's ordinary path then says why)."""
    decoder = json.JSONDecoder()
    pos = _WS.match(text, pos + 1).end()
    try:
        while text.startswith('"', pos):
            name, pos = decoder.raw_decode(text, pos)
            pos = _WS.match(text, pos).end()
            if not text.startswith(":", pos):
                return None
            pos = _WS.match(text, pos + 1).end()
            if name == key and text.startswith("[", pos):
                return pos
            _, pos = decoder.raw_decode(text, pos)
            pos = _WS.match(text, pos).end()
            if not text.startswith(",", pos):
                return None
            pos = _WS.match(text, pos + 1).end()
    except (ValueError, RecursionError):  # ValueError: invalid JSON, or an integer beyond the digit limit
        return None
    return None


def _read_csv(data: bytes, path: str, delimiter: str) -> Iterator[Item]:
    """A header row, then one record a row; a row may span lines (quoted newlines): line = where it starts."""
    reader = csv.reader(io.StringIO(_decode(data, path), newline=""), delimiter=delimiter)
    header: list[str] | None = None
    n = 0
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
                if (name := _duplicate(header)) is not None:
                    raise DataError([Problem(Where(path, start), "", DUPLICATE.format(name))])
                continue
            where = Where(path, start, n)
            n += 1
            if len(row) != len(header):
                yield where, Problem(where, "", f"the row has {len(row)} cells but the header has "
                                                f"{len(header)}; quote cells that contain {delimiter!r}")
            else:
                yield where, dict(zip(header, row))
    except csv.Error as e:
        raise DataError([Problem(Where(path, reader.line_num), "", f"unreadable CSV: {e}")]) from None


def _duplicate(names: list[str]) -> str | None:
    """The first column a header names twice (each record would silently keep one of the two cells), or None."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            return name
        seen.add(name)
    return None


DUPLICATE = "the column {!r} appears more than once; rename the duplicates so each column has its own name"


def _read_parquet(path: Path, display: str) -> Iterator[Item]:
    """One record a row, read a batch of rows at a time (the table is never held as Python objects)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 0
    try:
        file = pq.ParquetFile(path)
        if (name := _duplicate(file.schema_arrow.names)) is not None:
            raise DataError(f"{display}: {DUPLICATE.format(name)}")
        for batch in file.iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                yield Where(display, n + 1, n), row
                n += 1
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{display}: not a readable Parquet file ({e})") from None
    except UnicodeDecodeError:
        raise DataError(f"{display}: a text column holds bytes that are not UTF-8 (in rows {n + 1} to "
                        f"{n + 4096}); re-save the file with UTF-8 strings") from None


def _read_hub(spec: str, default_split: str = "train") -> tuple[str, Iterator[Item]]:
    """hf:owner/name[/config][:split] through datasets.load_dataset (rows stay in Arrow and are read one at a time);
    line = row number (1-based)."""
    name, _, split = spec[len("hf:"):].partition(":")
    parts = name.split("/")
    if not name or len(parts) > 3 or not all(parts) or ":" in split:
        raise UsageError(f"{spec}: expected hf:owner/name[/config][:split], e.g. hf:tatsu-lab/alpaca:train")
    split = split or default_split
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
    if not len(dataset):
        raise DataError(f"{display}: no records")
    return display, ((Where(display, i + 1, i), dict(row)) for i, row in enumerate(dataset))
