"""A run's scores (imtune.experiments.score), or the mean over an arm's seeds (imtune.experiments.aggregate), as
records: Loss, BestScore, Bleu, ExactMatch, BenchScore, and Scores holding them."""
from __future__ import annotations

from dataclasses import dataclass, field


# Scores: what imtune.experiments.score measured of one run, or the mean over an arm's seeds
# (imtune.experiments.aggregate). Each keeps the fields the report reads; `more` keeps the rest of the object as it is.
def _take(d: dict, names: tuple[str, ...]) -> tuple[list, dict]:
    return [d.get(n) for n in names], {k: v for k, v in d.items() if k not in names}


@dataclass(frozen=True)
class Loss:
    """Output-token loss on one data set: examples scored, mean NLL per output token (None: no output token)."""

    n: int | None
    output_loss: float | None
    more: dict = field(default_factory=dict)  # output_tokens, instruction_loss, truncated, skipped, scored

    @classmethod
    def from_json(cls, d: dict) -> Loss:
        (n, loss), more = _take(d, ("n", "output_loss"))
        return cls(n, loss, more)

    def to_json(self) -> dict:
        return {"n": self.n, "output_loss": self.output_loss, **self.more}


@dataclass(frozen=True)
class BestScore:
    """The best checkpoint (selected on validation): its held-out loss; a run's step and selection loss, or an arm's
    step per seed."""

    heldout: Loss | None
    selected_on: str | None
    step: int | None = None
    loss: float | None = None
    steps: list | None = None
    more: dict = field(default_factory=dict)

    NAMES = ("heldout", "selected_on", "step", "loss", "steps")

    @classmethod
    def from_json(cls, d: dict) -> BestScore:
        (held, on, step, loss, steps), more = _take(d, cls.NAMES)
        return cls(None if held is None else Loss.from_json(held), on, step, loss, steps, more)

    def to_json(self) -> dict:
        vals = (None if self.heldout is None else self.heldout.to_json(), self.selected_on, self.step, self.loss,
                self.steps)
        return {**{k: v for k, v in zip(self.NAMES, vals) if v is not None}, **self.more}


@dataclass(frozen=True)
class Bleu:
    """Memorisation: BLEU of greedy answers to training prompts against the training outputs."""

    n: int | None
    corpus_bleu: float | None
    sentence_bleu: list
    reference_words_mean: float | None
    more: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: dict) -> Bleu:
        (n, corpus, sentence, words), more = _take(d, ("n", "corpus_bleu", "sentence_bleu", "reference_words_mean"))
        more = {**more, **({"reference_words_mean": None} if "reference_words_mean" in d and words is None else {})}
        return cls(n, corpus, list(sentence or []), words, more)

    def meaningful(self) -> bool:
        """4-gram BLEU of answers shorter than 4 words is 0 whatever they say: no verdict on it then."""
        return self.reference_words_mean is None or self.reference_words_mean >= 4

    def to_json(self) -> dict:
        return {"n": self.n, "corpus_bleu": self.corpus_bleu, "sentence_bleu": self.sentence_bleu,
                **({} if self.reference_words_mean is None else {"reference_words_mean": self.reference_words_mean}),
                **self.more}


@dataclass(frozen=True)
class ExactMatch:
    n: int
    accuracy: float
    correct: list
    more: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: dict) -> ExactMatch:
        (n, acc, correct), more = _take(d, ("n", "accuracy", "correct"))
        return cls(n, acc, list(correct or []), more)

    def to_json(self) -> dict:
        return {"n": self.n, "accuracy": self.accuracy, "correct": self.correct, **self.more}


@dataclass(frozen=True)
class BenchScore:
    """One benchmark's headline (imtune.tasks: each task declares its metric); judged ones carry their judge and
    standard error."""

    metric: str
    value: float | None
    n: int | None
    standard_error: float | None = None
    judge: str | None = None
    more: dict = field(default_factory=dict)

    NAMES = ("metric", "value", "n", "standard_error", "judge")

    @classmethod
    def from_json(cls, d: dict) -> BenchScore:
        (metric, value, n, se, judge), more = _take(d, cls.NAMES)
        present = {k: None for k in ("standard_error", "judge") if k in d and d[k] is None}
        return cls(metric, value, n, se, judge, {**more, **present})

    def to_json(self) -> dict:
        vals = (self.metric, self.value, self.n, self.standard_error, self.judge)
        return {**{k: v for k, v in zip(self.NAMES, vals) if v is not None or k in ("metric", "value", "n")},
                **self.more}


@dataclass(frozen=True)
class Scores:
    """A run's (or an arm's mean) scores: training-sample and held-out output loss, their gap, the best checkpoint,
    memorisation BLEU, held-out exact match, benchmarks; an arm's also `seeds` (mean/sd/min/max per measure)."""

    train: Loss | None = None
    heldout: Loss | None = None
    gap: float | None = None
    best: BestScore | None = None
    bleu: Bleu | None = None
    exact_match: ExactMatch | None = None
    bench: dict[str, BenchScore] | None = None
    seeds: dict | None = None
    more: dict = field(default_factory=dict)  # seconds, time, per_example (a run's own eval/compare.json)

    NAMES = ("train", "heldout", "gap", "best", "bleu", "exact_match", "bench", "seeds")

    @classmethod
    def from_json(cls, d: dict) -> Scores:
        (train, held, gap, best, bleu, em, bench, seeds), more = _take(d or {}, cls.NAMES)
        return cls(None if train is None else Loss.from_json(train), None if held is None else Loss.from_json(held),
                   gap, None if best is None else BestScore.from_json(best),
                   None if bleu is None else Bleu.from_json(bleu), None if em is None else ExactMatch.from_json(em),
                   None if bench is None else {k: BenchScore.from_json(v) for k, v in bench.items()}, seeds,
                   {**more, **({"gap": None} if "gap" in (d or {}) and gap is None else {})})

    def to_json(self) -> dict:
        parts = {"train": self.train and self.train.to_json(), "heldout": self.heldout and self.heldout.to_json(),
                 "gap": self.gap, "best": self.best and self.best.to_json(), "bleu": self.bleu and self.bleu.to_json(),
                 "exact_match": self.exact_match and self.exact_match.to_json(),
                 "bench": None if self.bench is None else {k: v.to_json() for k, v in self.bench.items()},
                 "seeds": self.seeds}
        return {**{k: v for k, v in parts.items() if v is not None}, **self.more}

    def __bool__(self) -> bool:
        return any(getattr(self, n) is not None for n in self.NAMES) or bool(self.more)


