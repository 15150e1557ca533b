"""Record (a dict) -> Conversation. One small converter a format, listed in the FORMATS registry.

Converters read *canonical* field names through a field map: with `fields={"output": "response"}` the canonical
`output` is read from the record's `response` key (every name below can be mapped, nested ones too: role, content,
from, value). A name may map to ordered alternatives, `{"output": ["output", "response"]}` (or `"output|response"`):
each record (or message) reads the first of them it has, so a file whose records spell one field two ways loads.
Problems are reported with the name the record actually uses, or every alternative tried, so a person can find it.

| format            | record                                                                | detected by        |
|-------------------|-----------------------------------------------------------------------|--------------------|
| messages          | {"messages": [{"role": "system"/"user"/"assistant", "content": str}]} | messages           |
|                   |   (or ShareGPT-style turns {"from", "value"} inside "messages")       |                    |
| sharegpt          | {"conversations": [{"from": "human"/"gpt"/"system", "value": str}]}   | conversations      |
| alpaca            | {"instruction", "input"?, "output", "system"?}                        | instruction, output|
| prompt_completion | {"prompt", "completion", "system"?}                                   | prompt, completion |

alpaca's user message is the instruction, followed by a blank line and the input when the input is not blank.
`system` in the flat formats becomes a leading system message.

Roles: both list formats accept our names (system, user, assistant) and ShareGPT's (human -> user, gpt ->
assistant); any other spelling is mapped with a role map, `--role bot=assistant,person=user` (parse_roles).
"""
from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from imtune.data import validate
from imtune.types import ROLES, Conversation, Message, Problem, UsageError, Where

Bad = validate.Bad


def alternatives(fields: dict, canonical: str) -> tuple[str, ...]:
    """The record keys canonical field `canonical` is read from, in order: `fields[canonical]` as a list or an
    `a|b` string of alternatives, a single key, or (not mapped) the canonical name itself."""
    if canonical not in fields:  # not mapped (the common case: asked for every field of every message)
        return (canonical,)
    value = fields[canonical]
    return _alternatives(value if isinstance(value, str) else tuple(value), canonical)


@functools.lru_cache(maxsize=1024)
def _alternatives(value: str | tuple, canonical: str) -> tuple[str, ...]:  # asked for every field of every record
    keys = value.split("|") if isinstance(value, str) else list(value)
    return tuple(k.strip() for k in keys if k.strip()) or (canonical,)


def key_in(fields: dict, canonical: str, obj) -> str:
    """The key `canonical` is read from in `obj`: the first alternative it has (else the first alternative)."""
    keys = alternatives(fields, canonical)
    if len(keys) == 1:
        return keys[0]
    return next((k for k in keys if isinstance(obj, dict) and k in obj), keys[0])


def shown(fields: dict, canonical: str) -> str:
    """The alternatives as a person typed them: `output|response`."""
    return "|".join(alternatives(fields, canonical))


@dataclass(frozen=True)
class Record:
    """One record being converted: its data, the field map and where problems go."""

    data: dict
    fields: dict[str, str]
    format: str
    bad: Bad
    allow_empty: bool = False  # empty or whitespace-only text is accepted (data stats), not a problem
    roles: dict[str, str] = field(default_factory=dict)  # extra role spellings -> ROLES (--role)

    def key(self, canonical: str, obj: dict | None = None) -> str:
        """The key of `obj` (default: the record) that canonical field `canonical` is read from."""
        return key_in(self.fields, canonical, self.data if obj is None else obj)

    def required(self, canonical: str, obj: dict | None = None, prefix: str = "") -> Any:
        """The value of a required field (None, reported, when absent or null)."""
        obj = self.data if obj is None else obj
        key = self.key(canonical, obj)
        value = obj.get(key)
        if value is None:
            what = "message" if prefix else "record"
            tried = alternatives(self.fields, canonical)
            self.bad(prefix + ("|".join(tried) if len(tried) > 1 and key not in obj else key),
                     validate.missing(obj, key, canonical, self.format, what, tried))
        return value

    def text(self, canonical: str) -> str | None:
        value = self.required(canonical)
        return None if value is None else validate.text(value, self.key(canonical), self.bad, self.allow_empty)

    def optional_text(self, canonical: str) -> str | None:
        return validate.optional_text(self.data.get(self.key(canonical)), self.key(canonical), self.bad)

    def system(self) -> list[Message]:
        """The optional `system` field of the flat formats, as a leading system message."""
        content = self.optional_text("system")
        return [Message("system", content)] if content is not None else []


def _turns(r: Record, list_field: str, role_field: str, content_field: str, roles: dict[str, str]) -> list[Message]:
    """A list of {role, content}-like objects -> messages; shared by `messages` and `sharegpt`."""
    key = r.key(list_field)
    turns = r.required(list_field)
    if isinstance(turns, str):  # a JSON list stored as text (a CSV cell, a string column)
        try:
            turns = json.loads(turns)
        except (ValueError, RecursionError):  # also a number beyond the int digit limit, or nesting past the stack
            r.bad(key, "expected a list of messages, got a string that is not readable JSON (invalid, nested too "
                       "deeply, or a number too long)")
            return []
    if turns is None:
        return []
    if not isinstance(turns, list):
        r.bad(key, f"expected a list of messages, got {validate.kind(turns)}")
        return []
    if not turns:
        r.bad(key, "empty list; a conversation needs at least one user and one assistant message")
        return []
    messages: list[Message] = []
    seen: list[str | None] = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            r.bad(where, f"expected an object with {shown(r.fields, role_field)} and {shown(r.fields, content_field)},"
                         f" got {validate.kind(turn)}")
            continue
        raw_role = r.required(role_field, turn, where + ".")
        raw_content = r.required(content_field, turn, where + ".")
        role = (None if raw_role is None
                else validate.role(raw_role, f"{where}.{r.key(role_field, turn)}", roles, r.bad))
        content = (None if raw_content is None
                   else validate.text(raw_content, f"{where}.{r.key(content_field, turn)}", r.bad, r.allow_empty))
        seen.append(role)
        if role is not None and content is not None:
            messages.append(Message(role, content))
    if len(seen) == len(turns) and None not in seen:  # every role was read: a missing assistant is its own problem
        validate.has_assistant(seen, key, r.bad)
    return messages


# Role spellings every list format accepts: ours and ShareGPT's. Others come from a role map (--role).
KNOWN_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
SHAREGPT_ROLES = KNOWN_ROLES  # the name earlier code used


def _sharegpt_turns(r: Record) -> bool:
    """True when a `messages` list holds ShareGPT-style turns ({from, value}, no role/content): read them as such."""
    turns = r.data.get(r.key("messages"))
    if "role" in r.fields or "content" in r.fields or not isinstance(turns, list) or not turns:
        return False
    first = turns[0]
    return isinstance(first, dict) and "role" not in first and "content" not in first and "from" in first


def from_messages(r: Record) -> list[Message]:
    roles = {**KNOWN_ROLES, **r.roles}
    if _sharegpt_turns(r):
        return _turns(r, "messages", "from", "value", roles)
    return _turns(r, "messages", "role", "content", roles)


def from_sharegpt(r: Record) -> list[Message]:
    return _turns(r, "conversations", "from", "value", {**KNOWN_ROLES, **r.roles})


def parse_roles(items: list[str] | str | None) -> dict[str, str]:
    """["bot=assistant,person=user"] or "bot=assistant" -> {"bot": "assistant", "person": "user"} (--role)."""
    out: dict[str, str] = {}
    items = [items] if isinstance(items, str) else list(items or [])
    for item in (part.strip() for text in items for part in text.split(",")):
        if not item:
            continue
        spelled, sep, role = (x.strip() for x in item.partition("="))
        if not sep or not spelled or role not in ROLES:
            raise UsageError(f"--role {item!r}: expected NAME=ROLE with ROLE one of {', '.join(ROLES)}, "
                             "e.g. --role human=user,gpt=assistant")
        if out.get(spelled, role) != role:
            raise UsageError(f"--role {spelled} is mapped twice ({out[spelled]} and {role})")
        out[spelled] = role
    return out


def from_alpaca(r: Record) -> list[Message]:
    system = r.system()
    instruction, extra, output = r.text("instruction"), r.optional_text("input"), r.text("output")
    if instruction is None or output is None:
        return []
    user = instruction if extra is None else instruction + "\n\n" + extra
    return system + [Message("user", user, extra), Message("assistant", output)]


def from_prompt_completion(r: Record) -> list[Message]:
    system = r.system()
    prompt, completion = r.text("prompt"), r.text("completion")
    if prompt is None or completion is None:
        return []
    return system + [Message("user", prompt), Message("assistant", completion)]


@dataclass(frozen=True)
class Format:
    convert: Callable[[Record], list[Message]]
    detect: tuple[str, ...]  # canonical fields whose presence identifies the format (in this registry's order)
    fields: tuple[str, ...]  # every canonical field it reads, for --field


FORMATS: dict[str, Format] = {
    "messages": Format(from_messages, ("messages",), ("messages", "role", "content")),
    "sharegpt": Format(from_sharegpt, ("conversations",), ("conversations", "from", "value")),
    "alpaca": Format(from_alpaca, ("instruction", "output"), ("instruction", "input", "output", "system")),
    "prompt_completion": Format(from_prompt_completion, ("prompt", "completion"), ("prompt", "completion", "system")),
}

CANONICAL_FIELDS = tuple(dict.fromkeys(name for f in FORMATS.values() for name in f.fields))


def detect(record: Any, fields: dict[str, str]) -> str | None:
    """The first format whose identifying fields (through the field map) are all keys of the record."""
    if not isinstance(record, dict):
        return None
    for name, fmt in FORMATS.items():
        if all(any(k in record for k in alternatives(fields, c)) for c in fmt.detect):
            return name
    return None


def describe_formats(fields: dict[str, str]) -> str:
    """'messages (messages), alpaca (instruction, output), ...' with the field map applied."""
    return "; ".join(f"{name} ({', '.join(shown(fields, c) for c in f.detect)})" for name, f in FORMATS.items())


def to_conversation(record: Any, where: Where, format: str, fields: dict[str, str],
                    roles: dict[str, str] | None = None, allow_empty: bool = False,
                    ) -> tuple[Conversation | None, list[Problem]]:
    """One record -> (Conversation, []) or (None, its problems). `roles`: extra role spellings (parse_roles);
    allow_empty: empty text is no problem."""
    if not isinstance(record, dict):
        return None, [Problem(where, "", validate.not_object(record))]
    problems: list[Problem] = []
    r = Record(record, fields, format, lambda field, message: problems.append(Problem(where, field, message)),
               allow_empty, dict(roles or {}))
    messages = FORMATS[format].convert(r)
    if problems:
        return None, problems
    return Conversation(tuple(messages), where), []


# ---- what was understood: the format, which field became which message, and what was left out ------------------
# Names data sets give the same field. When a record has two of one group, the mapped one is read and the other is
# ignored, and a person is told (with the number of records where the two differ: they may have meant the other).
SAME_FIELD = (("output", "response", "completion", "answer"), ("instruction", "prompt", "question", "query"),
              ("input", "context"))


@dataclass(frozen=True)
class Understood:
    """How a file was read, in words: `format: alpaca — instruction + input → user, output → assistant; ignored
    fields: response`, plus notes on ignored fields that differ from the ones used."""

    format: str
    detected: bool
    mapping: str
    ignored: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def line(self) -> str:
        how = "detected" if self.detected else "given"
        ignored = f"; ignored fields: {', '.join(self.ignored)}" if self.ignored else ""
        return f"format: {self.format} ({how}) — {self.mapping}{ignored}"

    def lines(self) -> list[str]:
        return [self.line(), *(f"  note: {n}" for n in self.notes)]

    def as_dict(self) -> dict:
        return {"format": self.format, "detected": self.detected, "mapping": self.mapping,
                "ignored_fields": list(self.ignored), "notes": list(self.notes), "text": self.line()}


@dataclass
class Survey:
    """Gathered while the records of one file are converted: which keys they have, and in how many records an
    ignored field of the same meaning (SAME_FIELD) differs from the one read."""

    format: str
    fields: dict[str, str]
    roles: dict[str, str] = field(default_factory=dict)
    n: int = 0
    keys: dict[str, int] = field(default_factory=dict)
    differ: dict[tuple[str, str], int] = field(default_factory=dict)  # (used key, ignored key) -> records
    both: dict[tuple[str, str], int] = field(default_factory=dict)  # (used key, ignored key) -> records with both
    spelled: dict[tuple[str, str], int] = field(default_factory=dict)  # (canonical, other key) -> records that lack
    # every key `canonical` is read from but have `other`, a name of the same meaning (a file spelling it two ways)
    sharegpt_turns: int = 0  # `messages` records read as {from, value} turns

    def used_keys(self) -> list[str]:
        return [k for c in FORMATS[self.format].fields for k in alternatives(self.fields, c)]

    def add(self, record: Any) -> None:
        if not isinstance(record, dict):
            return
        self.n += 1
        for k in record:
            self.keys[str(k)] = self.keys.get(str(k), 0) + 1
        if self.format == "messages":
            self.sharegpt_turns += _sharegpt_turns(Record(record, self.fields, self.format, lambda f, m: None))
        used = self.used_keys()
        for canonical in FORMATS[self.format].fields:
            key = key_in(self.fields, canonical, record)
            group = next((g for g in SAME_FIELD if canonical in g), ())
            if key not in record:
                other = next((o for o in group if o in record and o not in used), None)
                if other is not None:
                    self.spelled[(canonical, other)] = self.spelled.get((canonical, other), 0) + 1
            for other in group:
                if other != key and other not in used and other in record and key in record:
                    self.both[(key, other)] = self.both.get((key, other), 0) + 1
                    if record[other] != record[key]:
                        self.differ[(key, other)] = self.differ.get((key, other), 0) + 1

    def fallbacks(self) -> str:
        """What to say when some records spell a field another way (`response` where the others have `output`): the
        --field with ordered alternatives that reads them all; "" when none does."""
        said = [f"{n:,} record(s) have {other} instead of {shown(self.fields, c)}" for (c, other), n in
                self.spelled.items()]
        flags = " ".join(f"--field {c}={shown(self.fields, c)}|{other}" for c, other in dict(self.spelled))
        return (f"imtune: {'; '.join(said)}: read either with {flags} (the first a record has is read), or pass "
                "--on-invalid skip to train on the others") if said else ""

    def nothing_valid(self, n_records: int) -> str:
        """What to say when no record of a file could be used: the likely cause is how it is read."""
        head = f"imtune: 0 valid records of {n_records:,}"
        if not self.n:
            return f"{head}: none could be read as an object with named fields; check the file's format"
        have = ", ".join(sorted(self.keys, key=lambda k: -self.keys[k])[:12])
        roles = " or name its role spellings with --role NAME=ROLE" if self.format in ("messages", "sharegpt") else ""
        guesses = [f"--field {c}={k}" for c in FORMATS[self.format].detect
                   if not any(a in self.keys for a in alternatives(self.fields, c))
                   for k in next((g for g in SAME_FIELD if c in g), ()) if k in self.keys][:3]
        example = f"here perhaps {' '.join(guesses)}" if guesses else "e.g. --field output=response"
        return (f"{head}: every record has a problem, so the likely cause is how the file is read, not the records. "
                f"Format {self.format} reads {', '.join(self.used_keys())}; the records have {have}. Give the "
                f"right --format ({', '.join(FORMATS)}), map your fields with --field NAME=KEY "
                f"({example}){roles}")

    def understood(self, detected: bool) -> Understood:
        key = lambda c: shown(self.fields, c)  # noqa: E731
        seen = lambda c: any(k in self.keys for k in alternatives(self.fields, c))  # noqa: E731
        if self.format == "alpaca":
            user = " + ".join(key(c) for c in ("instruction", "input") if c == "instruction" or seen(c))
            mapping = f"{user} → user, {key('output')} → assistant"
        elif self.format == "prompt_completion":
            mapping = f"{key('prompt')} → user, {key('completion')} → assistant"
        else:
            lst, role, content = (("messages", "role", "content") if self.format == "messages"
                                  else ("conversations", "from", "value"))
            if self.format == "messages" and self.sharegpt_turns:
                role, content = "from", "value"
            mapping = f"{key(lst)}[].{key(role)}/.{key(content)} → one message each"
            if role == "from":
                mapping += " (human → user, gpt → assistant)"
        if self.format in ("alpaca", "prompt_completion") and seen("system"):
            mapping += f", {key('system')} → system"
        if self.roles:
            mapping += "; roles " + ", ".join(f"{k} → {v}" for k, v in self.roles.items())
        used = set(self.used_keys())
        ignored = tuple(k for k in self.keys if k not in used)
        notes = []
        for (used_key, other), n in self.differ.items():
            canonical = next(c for c in FORMATS[self.format].fields if used_key in alternatives(self.fields, c))
            switch = (f"leave out --field {canonical}={used_key}" if other == canonical
                      else f"--field {canonical}={other}")
            notes.append(f"{other} differs from {used_key} in {n:,} of the {self.both[(used_key, other)]:,} records "
                         f"that have both; {used_key} was used and {other} ignored (to train on {other}: {switch})")
        return Understood(self.format, detected, mapping, ignored, tuple(notes))

