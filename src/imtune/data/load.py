"""Records -> Conversations (via imtune.data.formats): what a data set is read as, with --format, --field and
--role, and what happens to a record that cannot be used. The records come from imtune.data.records.

Bad data never raises a traceback: a problem with one record is a Problem (`path:line: field: what, what to do`);
with on_invalid="error" all of them are collected and raised together as a DataError, with "skip" the valid records
are kept and each skipped one is reported in LoadResult.skipped. A problem with the whole file (empty, not UTF-8
where it cannot be read line by line, broken JSON array, unreadable Parquet) is a DataError; a wrong spec (no such
file, unknown extension, bad --field) is a UsageError.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain

from imtune.data.formats import CANONICAL_FIELDS, FORMATS, Survey, Understood, describe_formats, detect, to_conversation
from imtune.data.records import Item, stream_records
from imtune.types import Conversation, DataError, Problem, UsageError

__all__ = ["FORMATS", "ConversationStream", "LoadResult", "check_fields", "load_conversations", "parse_fields",
           "stream_conversations"]

ON_INVALID = ("error", "skip")



@dataclass(frozen=True)
class LoadResult:
    conversations: list[Conversation]
    skipped: list[Problem]  # one per record skipped under on_invalid="skip" (empty otherwise)
    path: str  # what was loaded (display)
    format: str  # the format used (detected or given)
    understood: Understood | None = None  # the format and field mapping in words, ignored fields


def load_conversations(spec: str, format: str = "auto", fields: dict[str, str] | None = None,
                       on_invalid: str = "error", max_problems: int = 20, limit: int | None = None,
                       allow_empty: bool = False, roles: dict[str, str] | None = None) -> LoadResult:
    """Load a file or `hf:` dataset as Conversations, detecting the format from the first record that fits one.
    `roles`: extra role spellings of the list formats (formats.parse_roles)."""
    stream = stream_conversations(spec, format, fields, on_invalid, max_problems, limit, allow_empty, roles)
    conversations = list(stream)
    return LoadResult(conversations, stream.skipped, stream.path, stream.format, stream.understood())


class ConversationStream:
    """The Conversations of a file or `hf:` dataset, one at a time (a large file is never held whole).

    Iterate it once. `path` and `format` are known at once; `skipped` fills in while iterating (on_invalid="skip");
    with on_invalid="error" the problems of every bad record are raised together, as a DataError, when the iteration
    reaches the end (or at once when there is nothing valid at all). limit: stop after this many conversations.
    understood(): the format and field mapping in words, from the records read so far (call it after iterating)."""

    def __init__(self, spec: str, format: str = "auto", fields: dict[str, str] | None = None,
                 on_invalid: str = "error", max_problems: int = 20, limit: int | None = None,
                 allow_empty: bool = False, roles: dict[str, str] | None = None):
        self.fields = check_fields(fields)
        if format != "auto" and format not in FORMATS:
            raise UsageError(f"unknown data format {format!r}; use one of auto, {', '.join(FORMATS)}")
        if on_invalid not in ON_INVALID:
            raise UsageError(f"on_invalid must be one of {', '.join(ON_INVALID)}, not {on_invalid!r}")
        self.path, items = stream_records(spec)
        self.detected = format == "auto"
        head: list[Item] = []
        if format == "auto":  # read up to the first record that fits a format (usually the first)
            for item in items:
                head.append(item)
                if detect(item[1], self.fields) is not None:
                    break
            format = _detect(head, self.fields)
        self.format = format
        self._items = chain(head, items)
        self.on_invalid, self.max_problems, self.limit, self.allow_empty = on_invalid, max_problems, limit, allow_empty
        self.roles = dict(roles or {})
        self.survey = Survey(format, self.fields, self.roles)  # keys and differing fields of the records read
        self.skipped: list[Problem] = []  # one per record skipped under on_invalid="skip"
        self.n_read = 0  # records read (valid or not)

    def understood(self) -> Understood:
        return self.survey.understood(detected=self.detected)

    def __iter__(self) -> Iterator[Conversation]:
        problems: list[Problem] = []  # the first max_problems problems of bad records
        n_problems = n_ok = 0
        for where, value in self._items:
            if self.limit is not None and n_ok >= self.limit:
                break
            self.n_read += 1
            self.survey.add(value)
            if isinstance(value, Problem):
                conversation, found = None, [value]
            else:
                conversation, found = to_conversation(value, where, self.format, self.fields, self.roles,
                                                      allow_empty=self.allow_empty)
            if conversation is not None:
                n_ok += 1
                yield conversation
                continue
            n_problems += len(found)
            problems += found[:max(self.max_problems, 1) - len(problems)]
            if self.on_invalid == "skip":
                first = found[0]
                more = f" (and {len(found) - 1} more problem(s) in this record)" if len(found) > 1 else ""
                self.skipped.append(Problem(first.where, first.field, first.message + more))
        if n_problems and (self.on_invalid == "error" or not n_ok):  # skip mode with nothing left is an error too
            hint = self.survey.nothing_valid(self.n_read) if not n_ok else self.survey.fallbacks()
            raise DataError(problems, total=n_problems, hint=hint)


stream_conversations = ConversationStream


def parse_fields(items: list[str] | None) -> dict[str, str | list[str]]:
    """["output=response", "instruction=question"] -> {"output": "response", "instruction": "question"};
    ordered alternatives, the first a record has being read: "output=output|response" -> {"output": ["output",
    "response"]}."""
    fields: dict = {}
    for item in items or []:
        canonical, sep, key = (part.strip() for part in item.partition("="))
        if not sep or not canonical or not key.strip("| "):
            raise UsageError(f"--field {item!r}: expected FIELD=KEY or FIELD=KEY1|KEY2 (the first a record has is "
                             "read), e.g. output=response or output=output|response")
        key = normal_fields({canonical: key})[canonical]
        if fields.get(canonical, key) != key:
            raise UsageError(f"--field {canonical} is given twice ({fields[canonical]!r} and {key!r}); give "
                             f"alternatives once, in order: --field {canonical}=KEY1|KEY2")
        fields[canonical] = key
    return check_fields(fields)


def normal_fields(fields: dict | None) -> dict[str, str | list[str]]:
    """A field map in one form, however it was written (--field, YAML string, YAML list): one key as a string, ordered
    alternatives as a list (`"output|response"` and `[output, response]` -> ["output", "response"])."""
    out: dict = {}
    for canonical, value in dict(fields or {}).items():
        keys = value.split("|") if isinstance(value, str) else value
        if not isinstance(keys, list | tuple) or not keys or not all(isinstance(k, str) and k.strip() for k in keys):
            raise UsageError(f"field map: {canonical} must map to a key name or a list of key names (the first a "
                             f"record has is read), e.g. output: response or output: [output, response]; not "
                             f"{value!r}")
        keys = list(dict.fromkeys(k.strip() for k in keys))
        out[canonical] = keys[0] if len(keys) == 1 else keys
    return out


def check_fields(fields: dict | None) -> dict[str, str | list[str]]:
    for canonical in dict(fields or {}):
        if canonical not in CANONICAL_FIELDS:
            close = difflib.get_close_matches(str(canonical), CANONICAL_FIELDS, n=1, cutoff=0.6)
            meant = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(f"unknown field {canonical!r} in the field map{meant}; use one of "
                             f"{', '.join(CANONICAL_FIELDS)}")
    return normal_fields(fields)


def _detect(items: list[Item], fields: dict[str, str]) -> str:
    """The format of the first record that fits one; a record that fits none is a problem with the whole file."""
    first = None
    for where, value in items:  # the head of the stream, up to the first record that fits a format
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















































