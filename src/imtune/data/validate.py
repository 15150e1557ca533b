"""The content rules a record must meet, and how to say so to a person.

Every check reports through `bad(field, message)` (the caller knows the record's `Where`), so one record can carry
several problems and each reads `path:line: field: what is wrong, what to do`. The rules:

- text (content, instruction, output, ...) is a string that is not empty or whitespace-only, and holds no lone
  surrogate (a `\ud800` escape without its pair decodes to half a character, which no tokenizer can encode);
- a role is one the format knows (the message lists them);
- a conversation has at least one assistant turn. It may end on a user turn (the earlier assistant turns still
  train), repeat a role, or carry a system message anywhere.

`check(conversation)` applies the same rules to a Conversation built in code (synthetic data, tests).
"""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from imtune.types import ROLES, Conversation, Problem

MAX_CHARS = 10_000_000  # content characters beyond which a record is not tokenized (tokenizers abort natively far
#                         beyond this: a 200 MB line ended `data stats` with exit 134)

Bad = Callable[[str, str], None]  # bad(field, message): record one problem of the record being read
SURROGATE = re.compile("[\ud800-\udfff]")  # half of a UTF-16 pair: what a lone `\ud800` escape in JSON decodes to


def lone_surrogate(value: Any) -> str | None:
    """The first lone surrogate in a JSON value's strings or keys, as its escape (`\\ud800`), or None. Walks with a
    stack, so nesting as deep as the JSON parser allows costs no recursion."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if not v.isascii() and (m := SURROGATE.search(v)):
                return f"\\u{ord(m.group()):04x}"
        elif isinstance(v, dict):
            stack += [*v.keys(), *v.values()]
        elif isinstance(v, list):
            stack += v
    return None


def surrogate_message(escape: str) -> str:
    return (f"holds {escape}, half of a UTF-16 surrogate pair and not a character; "
            "fix the \\u escape that wrote it (or remove it)")


def kind(value: Any) -> str:
    """What a JSON value is, in words: 'a string', 'a list', 'null', ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def listing(names) -> str:
    return ", ".join(str(n) for n in names)


def missing(obj: dict, key: str, canonical: str, fmt: str, what: str = "record",
            tried: tuple[str, ...] = ()) -> str:
    """The message for a required field an object lacks: name the keys it has (and the alternatives tried, when the
    field map gives several) and how to map one of them."""
    if key in obj:  # present but null
        return f"is null; format {fmt} needs a value here"
    others = [k for k in obj if isinstance(k, str)]
    has = f"the {what} has fields {listing(others)}" if others else f"the {what} has no fields"
    if len(tried) > 1:
        return (f"missing (format {fmt}; tried {', '.join(tried)}); {has}; add one to the alternatives, "
                f"e.g. --field {canonical}={'|'.join(tried)}|NAME")
    return f"missing (format {fmt}); {has}; map one with --field {canonical}=NAME"


def text(value: Any, field: str, bad: Bad, allow_empty: bool = False) -> str | None:
    """A required piece of text: a string with something other than whitespace in it (allow_empty: any string, for
    analysing data as it is, where empty text is a finding rather than a refusal)."""
    if not isinstance(value, str):
        bad(field, f"expected a string, got {kind(value)}")
        return None
    if not value.strip() and not allow_empty:
        what = "empty" if not value else "whitespace-only"
        bad(field, f"{what} text; fill it in or remove the record")
        return None
    return _whole_characters(value, field, bad)


def _whole_characters(value: str, field: str, bad: Bad) -> str | None:
    if value.isascii() or not SURROGATE.search(value):
        return value
    bad(field, surrogate_message(lone_surrogate(value)))
    return None


def optional_text(value: Any, field: str, bad: Bad) -> str | None:
    """Optional text (alpaca `input`, `system`): absent, null or blank mean none; anything else must be a string."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        bad(field, f"expected a string, got {kind(value)}")
        return None
    return _whole_characters(value, field, bad)


def role(value: Any, field: str, roles: dict[str, str], bad: Bad, mappable: bool = True) -> str | None:
    """A role as spelled in the data -> one of ROLES, through `roles` (spelling -> role). `mappable`: the data came
    from a file, where --role can map another spelling (say so)."""
    if isinstance(value, str) and value in roles:
        return roles[value]
    shown = repr(value) if isinstance(value, str) else kind(value)
    hint = ""
    if mappable and isinstance(value, str) and value:
        hint = f"; or map it with --role {value}=ROLE (ROLE: user, assistant or system)"
    bad(field, f"unknown role {shown}; use one of {listing(roles)}{hint}")
    return None


def has_assistant(roles: list[str | None], field: str, bad: Bad) -> None:
    """A conversation with no assistant turn has nothing to learn from (it may end on any role)."""
    if "assistant" not in roles:
        bad(field, "no assistant turn; a conversation needs at least one assistant message to train on")


def not_object(value: Any) -> str:
    return f"the record is {kind(value)}, expected an object ({{...}}) with named fields"


def check(conversation: Conversation) -> list[Problem]:
    """The same rules for a Conversation built in code; [] when it is fine."""
    problems: list[Problem] = []

    def bad(field: str, message: str) -> None:
        problems.append(Problem(conversation.source, field, message))

    if not conversation.messages:
        bad("messages", "no messages")
        return problems
    for i, m in enumerate(conversation.messages):
        role(m.role, f"messages[{i}].role", {r: r for r in ROLES}, bad, mappable=False)
        text(m.content, f"messages[{i}].content", bad)
    has_assistant([m.role for m in conversation.messages], "messages", bad)
    return problems
