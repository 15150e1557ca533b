"""The plain data that travels between stages. Frozen dataclasses, no behaviour beyond small helpers."""
from __future__ import annotations

from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant")

# Token classes. The order is also the priority a token straddling two classes follows:
# a token takes the highest class among the characters it covers (eot > assistant > user > system > template),
# so content always wins over template text and no data character is ever left without its class.
CLASSES = ("template", "system", "user", "assistant", "eot")
CLASS_ID = {name: i for i, name in enumerate(CLASSES)}


@dataclass(frozen=True, slots=True)  # slots: millions of these (no __dict__ each)
class Where:
    """Where a record came from, so every later message can say `path:line`."""

    path: str
    line: int  # 1-based line in the file where the record starts (row number + 1 for tables)
    index: int = 0  # 0-based record index in the source

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass(frozen=True, slots=True)
class Message:
    role: str  # one of ROLES
    content: str
    # alpaca records: the `input` field, which `content` ends with (content = instruction + "\n\n" + input), kept
    # so that --template alpaca can render the canonical "### Input:" section; None everywhere else.
    input: str | None = None

    @property
    def instruction(self) -> str:
        """The content without its alpaca input."""
        return self.content[: len(self.content) - len(self.input) - 2] if self.input is not None else self.content


@dataclass(frozen=True, slots=True)
class Conversation:
    messages: tuple[Message, ...]
    source: Where = field(default_factory=lambda: Where("<memory>", 0, 0))


@dataclass(frozen=True, slots=True)
class Span:
    """A character span [start, end) of the rendered text carrying one class.

    `turn` is the index of the message it belongs to (eot spans: the assistant message they close)."""

    start: int
    end: int
    cls: str  # one of CLASSES other than "template" (template = every character not in a span)
    turn: int


@dataclass(frozen=True, slots=True)
class Rendered:
    """A conversation rendered by a template: the exact training text and where each message's content lies."""

    text: str
    spans: tuple[Span, ...]
    source: Where
    n_messages: int


@dataclass(frozen=True, slots=True)
class TokenizedExample:
    """One tokenisation of `Rendered.text`: ids, per-token class and the loss weight of predicting that token."""

    input_ids: list[int]
    weights: list[float]  # weight of the loss for predicting token i (weights[0] is never used: nothing predicts it)
    classes: list[int]  # indices into CLASSES
    source: Where
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input, phrased for a person."""

    where: Where
    field: str  # the field or part at fault ("" when the record as a whole)
    message: str

    def __str__(self) -> str:
        part = f" {self.field}:" if self.field else ""
        return f"{self.where}:{part} {self.message}"


class DataError(Exception):
    """Bad input data. Carries the problems; the CLI prints them without a traceback."""

    def __init__(self, problems: list[Problem] | str, total: int | None = None, hint: str = ""):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.total = len(self.problems) if total is None else total
        self.hint = hint  # what to do about all of them, when one cause is likely (printed last)
        super().__init__(self.render())

    def render(self, limit: int = 20) -> str:
        lines = [str(p) for p in self.problems[:limit]]
        if self.total > len(lines):
            lines.append(f"... and {self.total - len(lines)} more problem(s)")
        if self.hint:
            lines.append(self.hint)
        return "\n".join(lines)


class UsageError(Exception):
    """A user mistake that is not about a data record (unknown template, bad flag value). Printed without traceback."""
