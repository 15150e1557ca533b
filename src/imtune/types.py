"""The plain data that travels between stages. Frozen dataclasses, no behaviour beyond small helpers."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

ROLES = ("system", "user", "assistant")

# Token classes. The order is also the priority a token straddling two classes follows:
# a token takes the highest class among the characters it covers (eot > assistant > user > system > template),
# so content always wins over template text and no data character is ever left without its class.
CLASSES = ("template", "system", "user", "assistant", "eot")
CLASS_ID = {name: i for i, name in enumerate(CLASSES)}
# The one place that says which classes are the output (what IT trains on and every held-out loss scores) and which
# the instruction; template tokens are neither.
OUTPUT = ("assistant", "eot")
INSTRUCTION = ("user", "system")


@dataclass(frozen=True, slots=True)  # slots: millions of these (no __dict__ each)
class Where:
    """Where a record came from, so every later message can say `path:line`."""

    path: str
    line: int  # 1-based line in the file where the record starts (row number + 1 for tables)
    index: int = 0  # 0-based record index in the source

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass(frozen=True, eq=False)
class Sources:
    """Where each of K examples came from, as arrays; sources[k] makes that example's Where when asked.

    Why not a tuple of Where: a million of them cost ~0.11 GB, and because they are made while the file is read, in
    the same memory as the conversations, they would keep that memory (~0.5 GB at a million records) from going back
    to the system after the conversations are released."""

    paths: tuple[str, ...]  # the distinct paths
    path_of: np.ndarray  # [K] int32: index into paths
    lines: np.ndarray  # [K] int64
    indices: np.ndarray  # [K] int64

    @staticmethod
    def of(wheres) -> Sources:
        """Sources from Where objects (or a Sources, returned as it is)."""
        if isinstance(wheres, Sources):
            return wheres
        paths: dict[str, int] = {}
        path_of, lines, indices = [], [], []
        for w in wheres:
            path_of.append(paths.setdefault(w.path, len(paths)))
            lines.append(w.line)
            indices.append(w.index)
        return Sources(tuple(paths), np.array(path_of, dtype=np.int32), np.array(lines, dtype=np.int64),
                       np.array(indices, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return self.select(np.arange(len(self))[k])
        k = range(len(self))[k]  # an IndexError past the end (iteration relies on it), negative indices work
        return Where(self.paths[self.path_of[k]], int(self.lines[k]), int(self.indices[k]))

    def __iter__(self):
        return (self[k] for k in range(len(self)))

    def __eq__(self, other) -> bool:  # the same Where, in the same order (a tuple or list of Where too)
        if not isinstance(other, (Sources, tuple, list)):
            return NotImplemented
        return len(self) == len(other) and list(self) == list(other)

    __hash__ = None  # mutable arrays inside, like a list

    def __repr__(self) -> str:
        return f"Sources({len(self)} examples from {', '.join(self.paths) or 'nowhere'})"

    def select(self, index) -> Sources:
        """The sources at `index` (a sequence of example numbers), in that order."""
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        return Sources(self.paths, self.path_of[index], self.lines[index], self.indices[index])


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
    """One tokenisation of `Rendered.text`: ids, per-token class and the loss weight of predicting that token.
    Made when asked from Examples (numpy views into its flat arrays; lists work too, e.g. in tests)."""

    input_ids: np.ndarray  # [n] int32
    weights: np.ndarray  # [n] float64: weight of the loss for predicting token i (weights[0] is never used)
    classes: np.ndarray  # [n] int8, indices into CLASSES
    source: Where
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True, eq=False)
class Examples:
    """Tokenized examples held flat, what prepare_examples returns: example k owns tokens [bounds[k], bounds[k+1]) of
    input_ids, weights and classes. A sequence of TokenizedExample (len, [k], iteration, slices), each made when asked.

    Why flat: 13 bytes a token and ~16 an example. Per-token Python lists cost ~24 bytes a token more, and a numpy
    array per example ~110 bytes of header each (a million small records: gigabytes / hundreds of MB)."""

    input_ids: np.ndarray  # [N] int32
    weights: np.ndarray  # [N] float64: the loss table's exact values (collate casts to float32); a training run
    #                      keeps them as float32 (train.setup: half the memory, 0.18 GB at 45M tokens)
    classes: np.ndarray  # [N] int8, indices into CLASSES
    bounds: np.ndarray  # [K+1] int64: example k is [bounds[k], bounds[k+1])
    sources: Sources  # [K] (any sequence of Where given is turned into a Sources)
    truncated: np.ndarray  # [K] bool: cut to --max-length

    def __post_init__(self):
        object.__setattr__(self, "sources", Sources.of(self.sources))

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return self.select(np.arange(len(self))[k])
        k = range(len(self))[k]  # an IndexError past the end (iteration relies on it), negative indices work
        a, b = int(self.bounds[k]), int(self.bounds[k + 1])
        return TokenizedExample(self.input_ids[a:b], self.weights[a:b], self.classes[a:b], self.sources[k],
                                bool(self.truncated[k]))

    def __iter__(self):
        return (self[k] for k in range(len(self)))

    @property
    def lengths(self) -> np.ndarray:
        """[K] int64 tokens per example."""
        return np.diff(self.bounds)

    def select(self, index) -> Examples:
        """The examples at `index` (a sequence of example numbers), in that order, as a new flat Examples."""
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        starts, lengths = self.bounds[index], self.lengths[index]
        bounds = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        tokens = np.repeat(starts - bounds[:-1], lengths) + np.arange(int(bounds[-1]))  # gather positions
        return Examples(self.input_ids[tokens], self.weights[tokens], self.classes[tokens], bounds,
                        self.sources.select(index), self.truncated[index])

    def with_weights(self, weights: np.ndarray) -> Examples:
        """The same examples with other per-token weights ([N] float64, or float32 as collate makes them)."""
        return Examples(self.input_ids, weights, self.classes, self.bounds, self.sources, self.truncated)

    @staticmethod
    def of(examples) -> Examples:
        """Examples from TokenizedExample objects (or from an Examples, returned as it is)."""
        if isinstance(examples, Examples):
            return examples
        examples = list(examples)
        flat = lambda f, dtype: np.concatenate(  # noqa: E731
            [np.asarray(getattr(e, f), dtype=dtype).reshape(-1) for e in examples] or [np.zeros(0, dtype)])
        bounds = np.concatenate([[0], np.cumsum([len(e) for e in examples])]).astype(np.int64)
        return Examples(flat("input_ids", np.int32), flat("weights", np.float64), flat("classes", np.int8), bounds,
                        [e.source for e in examples], np.array([e.truncated for e in examples], dtype=bool))


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


class Interrupted(KeyboardInterrupt):
    """Ctrl-C in a command whose work survives it (compare, sweep, study): `lines` say what was kept and what resumes;
    the CLI prints them, then the command that continues, and exits 130."""

    def __init__(self, lines: list[str]):
        self.lines = list(lines)
        super().__init__("\n".join(self.lines))
