"""Data-quality findings for `imtune data stats`: what is odd in the data, counted, with the first `path:line`s.

`data stats` analyses data as it is, so these are findings, not refusals (training still refuses empty outputs by
default; see imtune.data.validate). Each is counted over every parsable record:

| finding             | a record ...                                                                             |
|---------------------|------------------------------------------------------------------------------------------|
| empty_output        | has an assistant message that is empty or whitespace-only (it counts 0 words of content)  |
| empty_instruction   | has a user message that is empty or whitespace-only                                      |
| duplicate           | has exactly the messages (roles and contents) of an earlier record                       |
| near_duplicate      | has a long prompt (system + user text of >= NEAR_CHARS characters once case, punctuation   |
|                     | and spacing are ignored) whose first NEAR_CHARS such characters equal an earlier record's |
|                     | (and is not an exact duplicate): the shared-context case where loss on prompts memorises   |
| control_tokens      | has content that spells a control token, e.g. the text `<|im_end|>` (see weights.py)       |
| too_long            | has more than MAX_CHARS characters of content: not tokenized, not in the statistics       |

Memory: one 8-byte hash (twice) and one line number per record, in numpy arrays; duplicates are found at the end
with np.unique, so a million records cost tens of megabytes.
"""
from __future__ import annotations

import hashlib
import re

import numpy as np

from imtune.data.validate import MAX_CHARS
from imtune.types import Conversation, Problem

FIRST = 5  # path:lines shown per finding
NEAR_CHARS = 500  # a prompt this long (normalised) is "long"; near duplicates share this many leading characters

WHAT = {
    "empty_output": "records with an empty or whitespace-only assistant message",
    "empty_instruction": "records with an empty or whitespace-only user message",
    "duplicate": "records that repeat an earlier record exactly",
    "near_duplicate": f"records whose long prompt (>= {NEAR_CHARS} characters) starts like an earlier record's",
    "control_tokens": "records whose content spells a control token (tokenized as plain text unless "
                      "--special-tokens-in-content keep)",
    "too_long": f"records with more than {MAX_CHARS:,} characters of content (not measured)",
}
_NOT_WORD = re.compile(r"[\W_]+")


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


class Scan:
    """Findings over a stream of conversations, fed a batch at a time (add); result() at the end."""

    def __init__(self) -> None:
        self.path = ""
        self._lines: list[np.ndarray] = []
        self._exact: list[np.ndarray] = []
        self._near: list[np.ndarray] = []
        self.found: dict[str, list[str]] = {name: [] for name in WHAT}  # first path:lines
        self.count: dict[str, int] = dict.fromkeys(WHAT, 0)

    def note(self, name: str, where: str) -> None:
        self.count[name] += 1
        if len(self.found[name]) < FIRST:
            self.found[name].append(where)

    def too_long(self, conversation: Conversation) -> bool:
        """True (and noted) when the record is too long to tokenize at all."""
        n = sum(len(m.content) for m in conversation.messages)
        if n <= MAX_CHARS:
            return False
        self.note("too_long", f"{conversation.source} ({n:,} characters)")
        return True

    def add(self, conversations: list[Conversation], specials: list[Problem] = ()) -> None:
        lines, exact, near = [], [], []
        for c in conversations:
            self.path = self.path or c.source.path
            if any(m.role == "assistant" and not m.content.strip() for m in c.messages):
                self.note("empty_output", str(c.source))
            if any(m.role == "user" and not m.content.strip() for m in c.messages):
                self.note("empty_instruction", str(c.source))
            lines.append(c.source.line)
            exact.append(_hash("\x1e".join(f"{m.role}\x1f{m.content}" for m in c.messages)))
            prompt = "\n".join(m.content for m in c.messages if m.role != "assistant")
            key = 0
            if len(prompt) >= NEAR_CHARS:
                norm = _NOT_WORD.sub(" ", prompt.casefold()).strip()
                key = _hash(norm[:NEAR_CHARS]) | 1 if len(norm) >= NEAR_CHARS else 0  # 0 = not a long prompt
            near.append(key)
        for p in specials:
            self.note("control_tokens", str(p))
        self._lines.append(np.array(lines, dtype=np.int64))
        self._exact.append(np.array(exact, dtype=np.uint64))
        self._near.append(np.array(near, dtype=np.uint64))

    def _repeats(self, keys: np.ndarray, lines: np.ndarray, name: str, skip: np.ndarray | None = None) -> np.ndarray:
        """Note every record whose key an earlier record has (keys of 0 never match); the mask of those records."""
        _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        earlier = first[inverse.reshape(-1)]
        repeat = (earlier != np.arange(len(keys))) & (keys != 0)
        if skip is not None:
            repeat &= ~skip
        for i in np.flatnonzero(repeat)[:FIRST].tolist():
            self.found[name].append(f"{self.path}:{lines[i]} (like line {lines[earlier[i]]})")
        self.count[name] = int(repeat.sum())
        return repeat

    def result(self) -> dict:
        """{finding: {"count", "first": [path:line, ...], "what"}} for every finding (counts may be 0)."""
        if self._lines:
            lines = np.concatenate(self._lines)
            dup = self._repeats(np.concatenate(self._exact), lines, "duplicate")
            self._repeats(np.concatenate(self._near), lines, "near_duplicate", skip=dup)
        return {name: {"count": self.count[name], "first": self.found[name], "what": WHAT[name]} for name in WHAT}


def format_findings(findings: dict) -> list[str]:
    """Lines for the text report: one per finding that occurs."""
    lines = []
    for f in findings.values():
        if f["count"]:
            more = ", ..." if f["count"] > len(f["first"]) else ""
            lines.append(f"  finding: {f['count']:,} {f['what']} (first: {', '.join(f['first'])}{more})")
    return lines or ["  findings: none (no empty outputs, duplicates, near-duplicate long prompts or control tokens)"]
