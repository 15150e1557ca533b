"""A run's scores (imtune.experiments.score), or the mean over an arm's seeds (imtune.experiments.aggregate), as
records: Loss, BestScore, Bleu, ExactMatch, BenchScore, and Scores holding them. Each is a Part: its fields are what
the report reads, `more` keeps the rest of the object as it is."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar


@dataclass(frozen=True)
class Part:
    """A JSON object read into a record: the dataclass fields are the keys the code reads (a field in NESTED is
    itself a Part, one in DICT_OF an object of Parts), `more` the other keys as they were. from_json remembers which of
    the fields the object had (`keys`), so to_json gives back exactly the object read: a key absent stays absent, a
    null stays null. A Part made in code (keys None) writes every field."""

    NESTED: ClassVar[dict] = {}
    DICT_OF: ClassVar[dict] = {}
    more: dict = field(default_factory=dict, kw_only=True)
    keys: tuple | None = field(default=None, kw_only=True, compare=False, repr=False)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name not in ("more", "keys")]

    @classmethod
    def from_json(cls, d: dict):
        """ValueError (what is wrong) for an object that is not one: the file may come from elsewhere."""
        if not isinstance(d, dict):
            raise ValueError(f"{cls.__name__.lower()}: expected an object, got {type(d).__name__}")
        names = cls.names()
        values = {n: cls._read(n, d[n]) for n in names if n in d}
        return cls(**values, more={k: v for k, v in d.items() if k not in names}, keys=tuple(values))

    @classmethod
    def _read(cls, name: str, v):
        if v is None:
            return None
        if name in cls.NESTED:
            return cls.NESTED[name].from_json(v)
        if name in cls.DICT_OF:
            if not isinstance(v, dict):
                raise ValueError(f"{name}: expected an object, got {type(v).__name__}")
            return {k: cls.DICT_OF[name].from_json(x) for k, x in v.items()}
        return v

    def to_json(self) -> dict:
        def write(v):
            if isinstance(v, Part):
                return v.to_json()
            return {k: x.to_json() for k, x in v.items()} if isinstance(v, dict) and v and \
                all(isinstance(x, Part) for x in v.values()) else v
        return {**{n: write(getattr(self, n)) for n in (self.names() if self.keys is None else self.keys)},
                **self.more}


@dataclass(frozen=True)
class Loss(Part):
    """Output-token loss on one data set: examples scored, mean NLL per output token (None: no output token); `more`:
    output_tokens, instruction_loss, truncated, skipped, scored."""

    n: int | None = None
    output_loss: float | None = None


@dataclass(frozen=True)
class BestScore(Part):
    """The best checkpoint (selected on validation): its held-out loss; a run's step and selection loss, or an arm's
    step per seed."""

    NESTED: ClassVar[dict] = {"heldout": Loss}
    heldout: Loss | None = None
    selected_on: str | None = None
    step: int | None = None
    loss: float | None = None
    steps: list | None = None


@dataclass(frozen=True)
class Bleu(Part):
    """Memorisation: BLEU of greedy answers to training prompts against the training outputs."""

    n: int | None = None
    corpus_bleu: float | None = None
    sentence_bleu: list = field(default_factory=list)
    reference_words_mean: float | None = None

    def meaningful(self) -> bool:
        """4-gram BLEU of answers shorter than 4 words is 0 whatever they say: no verdict on it then."""
        return self.reference_words_mean is None or self.reference_words_mean >= 4


@dataclass(frozen=True)
class ExactMatch(Part):
    n: int = 0
    accuracy: float = 0.0
    correct: list = field(default_factory=list)


@dataclass(frozen=True)
class BenchScore(Part):
    """One benchmark's headline (imtune.tasks: each task declares its metric); judged ones carry their judge and
    standard error."""

    metric: str = ""
    value: float | None = None
    n: int | None = None
    standard_error: float | None = None
    judge: str | None = None


@dataclass(frozen=True)
class Scores(Part):
    """A run's (or an arm's mean) scores: training-sample and held-out output loss, their gap, the best checkpoint,
    memorisation BLEU, held-out exact match, benchmarks; an arm's also `seeds` (mean/sd/min/max per measure); `more`:
    seconds, time, per_example (a run's own eval/compare.json)."""

    NESTED: ClassVar[dict] = {"train": Loss, "heldout": Loss, "best": BestScore, "bleu": Bleu,
                              "exact_match": ExactMatch}
    DICT_OF: ClassVar[dict] = {"bench": BenchScore}
    train: Loss | None = None
    heldout: Loss | None = None
    gap: float | None = None
    best: BestScore | None = None
    bleu: Bleu | None = None
    exact_match: ExactMatch | None = None
    bench: dict[str, BenchScore] | None = None
    seeds: dict | None = None

    def __bool__(self) -> bool:
        return bool(self.keys) or bool(self.more)
