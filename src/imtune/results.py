"""What a comparison, a sweep and a study hand to their reports and terminal views, typed: their files as frozen
records.

    CompareResult   compare.json: settings, data, arms, evidence, verdict, versions, time, memory
      ArmResult       one arm: spec, name, overrides, its runs and their mean over seeds (`results`)
        RunResult       one seed's run: seed, run directory (relative to COMPARE_DIR), its scores (`results`)
      Evidence        the paired intervals (imtune.experiments.aggregate): reference arm, method, per measure:
        Measure         label, better, each arm's value and its difference to the reference (Interval), per seed
    SweepResult     sweep.json: per λ (SweepRow) the held-out loss final and best (Estimate), the Recommendation
    StudyResult     study.json: per value of the factor (StudyRow) the arms' difference (Estimate), the trends

`from_json(obj)` checks the shape of what it reads (the file may come from elsewhere: a file is hostile input) and
raises ValueError saying what is wrong; report.runs.read_record is the one reader of these files and adds the path.
`to_json()` gives back the object the file holds, key for key, so a written file reads back equal.
A run's and an arm's scores (`results`: train/held-out loss, best checkpoint, BLEU, exact match, benchmarks) keep the
shape imtune.experiments.score gives them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

VERSION = 2  # compare.json "version" this code writes
VERSIONS = (1, 2)  # and the ones it reads (1: one seed per arm, the run in arms/<arm>/)


@dataclass(frozen=True)
class Interval:
    """A value with its 95% interval (low/high None where a measure has none, e.g. an arm's own gap)."""

    value: float | None
    low: float | None = None
    high: float | None = None

    def excludes_zero(self) -> bool:
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)

    @classmethod
    def from_json(cls, d: dict) -> Interval:
        return cls(d.get("value"), d.get("low"), d.get("high"))

    def to_json(self) -> dict:
        return {"value": self.value, **({} if self.low is None and self.high is None else
                                        {"low": self.low, "high": self.high})}


@dataclass(frozen=True)
class Measure:
    """One measure of the evidence: each arm's value and its difference to the reference arm, keyed by arm spec."""

    label: str
    better: str  # "lower" | "higher"
    values: dict[str, Interval]
    differences: dict[str, Interval]
    per_seed: dict[str, list]

    @classmethod
    def from_json(cls, d: dict) -> Measure:
        return cls(d.get("label", ""), d.get("better", "lower"),
                   {k: Interval.from_json(v) for k, v in (d.get("values") or {}).items()},
                   {k: Interval.from_json(v) for k, v in (d.get("differences") or {}).items()},
                   dict(d.get("per_seed") or {}))

    def to_json(self) -> dict:
        return {"values": {k: v.to_json() for k, v in self.values.items()},
                "differences": {k: v.to_json() for k, v in self.differences.items()},
                "per_seed": self.per_seed, "label": self.label, "better": self.better}


@dataclass(frozen=True)
class Evidence:
    reference: str  # the reference arm's spec
    method: str
    level: float
    n_seeds: int
    n_examples: dict  # {"heldout": n, "train": n}
    measures: dict[str, Measure]

    @classmethod
    def from_json(cls, d: dict) -> Evidence:
        return cls(d.get("reference", ""), d.get("method", ""), d.get("level", 0.95), d.get("n_seeds", 1),
                   dict(d.get("n_examples") or {}),
                   {k: Measure.from_json(m) for k, m in (d.get("measures") or {}).items()})

    def to_json(self) -> dict:
        return {"reference": self.reference, "method": self.method, "level": self.level, "n_seeds": self.n_seeds,
                "n_examples": self.n_examples, "measures": {k: m.to_json() for k, m in self.measures.items()}}


@dataclass(frozen=True)
class RunResult:
    seed: int | None
    dir: str  # the run directory, relative to COMPARE_DIR
    results: dict = field(default_factory=dict)  # its scores (imtune.experiments.score); {} before evaluation

    @classmethod
    def from_json(cls, d: dict) -> RunResult:
        return cls(d["seed"], d["dir"], d.get("results") or {})

    def to_json(self) -> dict:
        return {"seed": self.seed, "dir": self.dir, **({"results": self.results} if self.results else {})}


@dataclass(frozen=True)
class ArmResult:
    spec: str  # as typed: "weighted:0.1"
    name: str  # its directory name under arms/
    dir: str | None
    overrides: dict
    runs: tuple[RunResult, ...]
    results: dict = field(default_factory=dict)  # the mean over seeds, in one run's shape, plus "seeds" (spreads)

    @classmethod
    def from_json(cls, d: dict, seed: int | None = None) -> ArmResult:
        runs = d["runs"] if "runs" in d else [{"seed": seed, "dir": d["dir"], "results": d.get("results")}]
        return cls(d.get("spec", d["name"]), d["name"], d.get("dir"), dict(d.get("overrides") or {}),
                   tuple(RunResult.from_json(r) for r in runs), d.get("results") or {})

    def to_json(self) -> dict:
        return {"spec": self.spec, "name": self.name, "dir": self.dir, "overrides": self.overrides,
                "runs": [r.to_json() for r in self.runs], **({"results": self.results} if self.results else {})}


@dataclass(frozen=True)
class CompareResult:
    version: int
    dir: str
    commands: list  # [{"argv", "time", "cwd"}], one per invocation
    settings: dict  # {"base_config", "eval", "heldout_fraction", "seeds", "reference", "val_fraction"}
    data: dict  # what experiments.data measured and wrote (counts, paths, stats with the loss advice)
    arms: tuple[ArmResult, ...]
    evidence: Evidence | None = None
    versions: dict = field(default_factory=dict)
    verdict: dict | None = None  # the one verdict (report.write.verdict), stored by compare
    time: dict | None = None
    memory: dict | None = None

    # -- reading ---------------------------------------------------------------------------------------------------
    @property
    def base_config(self) -> dict:
        return self.settings["base_config"]

    @property
    def seeds(self) -> list:
        return list(self.settings.get("seeds") or [self.base_config.get("seed")])

    @property
    def cwd(self) -> str | None:
        """Where the last command ran (next-step commands run there)."""
        return (self.commands or [{}])[-1].get("cwd")

    @property
    def argv(self) -> list[str]:
        return (self.commands or [{}])[-1].get("argv") or []

    def runs(self) -> list[tuple[ArmResult, RunResult]]:
        """(arm, run) for every arm x seed."""
        return [(a, r) for a in self.arms for r in a.runs]

    def arm(self, name: str) -> ArmResult:
        return next(a for a in self.arms if name in (a.name, a.spec))

    def run_label(self, arm: ArmResult, run: RunResult) -> str:
        return arm.spec if len(self.settings.get("seeds") or [0]) == 1 else f"{arm.spec} seed {run.seed}"

    def replace(self, **changes) -> CompareResult:
        return dataclasses.replace(self, **changes)

    # -- the file --------------------------------------------------------------------------------------------------
    @classmethod
    def from_json(cls, d) -> CompareResult:
        """compare.json's object -> CompareResult; ValueError (what is wrong) for anything imtune did not write."""
        problem = _problem(d)
        if problem:
            raise ValueError(problem)
        seed = d["settings"]["base_config"].get("seed")
        return cls(d.get("version", 1), d.get("dir", ""), list(d.get("commands") or []), d["settings"],
                   d.get("data") or {}, tuple(ArmResult.from_json(a, seed) for a in d["arms"]),
                   Evidence.from_json(d["evidence"]) if isinstance(d.get("evidence"), dict) else None,
                   d.get("versions") or {}, d.get("verdict"), d.get("time"), d.get("memory"))

    def to_json(self) -> dict:
        out = {"version": self.version, "dir": self.dir, "commands": self.commands, "settings": self.settings,
               "data": self.data, "arms": [a.to_json() for a in self.arms],
               "evidence": None if self.evidence is None else self.evidence.to_json(), "versions": self.versions}
        out.update({k: v for k, v in (("verdict", self.verdict), ("time", self.time), ("memory", self.memory))
                    if v is not None})
        return out


def _problem(d) -> str | None:
    if not isinstance(d, dict):
        return "not a JSON object"
    if d.get("version", 1) not in VERSIONS:
        return f"version {d.get('version')!r} (this imtune reads {', '.join(map(str, VERSIONS))})"
    if not isinstance(d.get("settings"), dict) or not isinstance(d["settings"].get("base_config"), dict):
        return '"settings" without a "base_config" object'
    arms = d.get("arms")
    if not isinstance(arms, list) or not arms:
        return '"arms" is not a non-empty list'
    for a in arms:  # version 2: "runs" per arm; version 1: one run, the arm's own "dir"
        if not isinstance(a, dict) or not isinstance(a.get("name"), str):
            return 'an arm without a "name"'
        runs = a.get("runs") if "runs" in a else [{"seed": None, "dir": a.get("dir")}]
        if not isinstance(runs, list) or not all(isinstance(r, dict) and isinstance(r.get("dir"), str) and "seed" in r
                                                 for r in runs):
            return f'arm {a["name"]!r}: a run without a "dir" or a "seed"'
        if not isinstance(a.get("results", {}), dict) or not all(isinstance(r.get("results", {}), dict) for r in runs):
            return f'arm {a["name"]!r}: "results" that are not an object'
    if d.get("evidence") is not None and not isinstance(d["evidence"], dict):
        return '"evidence" is not an object'
    return None


# ----------------------------------------------------------------------------------------------------------------
# sweep.json and study.json
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
