"""sweep.json and study.json as records: SweepResult (SweepRow, Estimate, Recommendation) and StudyResult
(StudyRow)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from imtune.results.compare import Interval


@dataclass(frozen=True)
class Estimate:
    """A held-out output loss (sweep: one λ's) or a difference of two (study: the arms'), its 95% interval, its value
    per seed, and (sweep) its paired difference to the recommended λ."""

    value: float
    low: float
    high: float
    per_seed: list
    difference_to_recommended: Interval | None = None

    @classmethod
    def from_json(cls, d: dict) -> Estimate:
        diff = d.get("difference_to_recommended")
        return cls(d["value"], d["low"], d["high"], list(d.get("per_seed") or []),
                   None if diff is None else Interval.from_json(diff))

    def to_json(self) -> dict:
        out = {"value": self.value, "low": self.low, "high": self.high, "per_seed": self.per_seed}
        if self.difference_to_recommended is not None:
            out["difference_to_recommended"] = self.difference_to_recommended.to_json()
        return out


def _estimates(d: dict) -> dict:
    return {k: Estimate.from_json(d[k]) if isinstance(d.get(k), dict) else None for k in ("final", "best")}


def _with_estimates(head: dict, row) -> dict:
    return {**head, **{k: e.to_json() for k, e in (("final", row.final), ("best", row.best)) if e is not None}}


@dataclass(frozen=True)
class SweepRow:
    prompt_weight: float
    arm: str
    final: Estimate | None
    best: Estimate | None
    best_steps: list | None

    @classmethod
    def from_json(cls, d: dict) -> SweepRow:
        return cls(d["prompt_weight"], d["arm"], **_estimates(d), best_steps=d.get("best_steps"))

    def to_json(self) -> dict:
        return {**_with_estimates({"prompt_weight": self.prompt_weight, "arm": self.arm}, self),
                "best_steps": self.best_steps}


@dataclass(frozen=True)
class Recommendation:
    """The λ with the lowest held-out loss, and whether it is recommended (`decided`: distinguishable from every
    other λ) or ties with `indistinguishable`; `next`: [{"why", "command"}] that would separate a tie."""

    prompt_weight: float
    measure: str
    value: float
    interval: list
    indistinguishable: list
    decided: bool
    rule: str
    to_decide: str | None = None
    next: list = field(default_factory=list)

    @classmethod
    def from_json(cls, d: dict) -> Recommendation:
        return cls(d["prompt_weight"], d["measure"], d["value"], list(d["interval"]), list(d["indistinguishable"]),
                   d.get("decided", not d["indistinguishable"]), d.get("rule", ""), d.get("to_decide"),
                   list(d.get("next") or []))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SweepResult:
    version: int
    compare_dir: str
    normalize: str
    weights: object
    seeds: list | None
    method: str
    data: dict  # source, n_train, n_val, n_test
    prompt_weights: tuple[SweepRow, ...]
    recommendation: Recommendation
    cwd: str | None = None

    @classmethod
    def from_json(cls, d) -> SweepResult:
        if not isinstance(d, dict) or not isinstance(d.get("prompt_weights"), list) or \
                not isinstance(d.get("recommendation"), dict):
            raise ValueError('not an object with "prompt_weights" and a "recommendation"')
        try:
            return cls(d.get("version", 1), d.get("compare_dir", "compare"), d.get("normalize", "tokens"),
                       d.get("weights"), d.get("seeds"), d.get("method", ""), dict(d.get("data") or {}),
                       tuple(SweepRow.from_json(r) for r in d["prompt_weights"]),
                       Recommendation.from_json(d["recommendation"]), d.get("cwd"))
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"a λ row or the recommendation without {e}") from None

    def to_json(self) -> dict:
        return {"version": self.version, "compare_dir": self.compare_dir, "normalize": self.normalize,
                "weights": self.weights, "seeds": self.seeds, "method": self.method, "data": self.data,
                "prompt_weights": [r.to_json() for r in self.prompt_weights],
                "recommendation": self.recommendation.to_json(), "cwd": self.cwd}


@dataclass(frozen=True)
class StudyRow:
    """One value of the factor: its comparison (where, data sizes, measured ratio, steps), the difference of the two
    arms' held-out output loss (final and best), and for a ratio stratum of real data what the stratum holds."""

    value: float
    compare_dir: str
    n_train: int
    n_test: int
    ratio_measured: float | None
    steps: int
    final: Estimate | None
    best: Estimate | None
    stratum: dict | None = None  # {"stratum", "of", "ratio_low", "ratio_high", "pool", "ratio_words"}

    STRATUM = ("stratum", "of", "ratio_low", "ratio_high", "pool", "ratio_words")

    @classmethod
    def from_json(cls, d: dict) -> StudyRow:
        stratum = {k: d[k] for k in cls.STRATUM if k in d} or None
        return cls(d["value"], d["compare_dir"], d["n_train"], d["n_test"], d.get("ratio_measured"), d["steps"],
                   **_estimates(d), stratum=stratum)

    def to_json(self) -> dict:
        head = {"value": self.value, "compare_dir": self.compare_dir, "n_train": self.n_train, "n_test": self.n_test,
                "ratio_measured": self.ratio_measured, "steps": self.steps}
        return {**_with_estimates(head, self), **(self.stratum or {})}


@dataclass(frozen=True)
class StudyResult:
    version: int
    factor: str  # "ratio" | "n"
    values: list
    arms: list  # specs: the difference is arms[1] − arms[0]
    difference: str
    seeds: list | None
    family: str | None
    data: str | None
    strata: int | None
    budget: int | None
    rows: tuple[StudyRow, ...]
    trend: dict  # "final"/"best" -> {"intercept", "slope", "x_scale", "weighted"} (analysis.evidence.linear_trend)

    @classmethod
    def from_json(cls, d) -> StudyResult:
        if not isinstance(d, dict) or not isinstance(d.get("rows"), list) or d.get("factor") not in ("ratio", "n"):
            raise ValueError('not an object with "rows" and a "factor" (ratio or n)')
        try:
            return cls(d.get("version", 1), d["factor"], list(d.get("values") or []), list(d.get("arms") or []),
                       d.get("difference", ""), d.get("seeds"), d.get("family"), d.get("data"), d.get("strata"),
                       d.get("budget"), tuple(StudyRow.from_json(r) for r in d["rows"]), dict(d.get("trend") or {}))
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"a row without {e}") from None

    def to_json(self) -> dict:
        return {"version": self.version, "factor": self.factor, "values": self.values, "arms": self.arms,
                "difference": self.difference, "seeds": self.seeds, "family": self.family, "data": self.data,
                "strata": self.strata, "budget": self.budget, "rows": [r.to_json() for r in self.rows],
                "trend": self.trend}
