"""compare.json as records: CompareResult > ArmResult > RunResult (their Scores: imtune.results.scores), and the
evidence, Evidence > Measure > Interval."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from imtune.results.scores import Part, Scores

VERSION = 2  # compare.json "version" this code writes
VERSIONS = (1, 2)  # and the ones it reads (1: one seed per arm, the run in arms/<arm>/)


@dataclass(frozen=True)
class Interval(Part):
    """A value with its 95% interval (low/high None where a measure has none, e.g. an arm's own gap)."""

    value: float | None = None
    low: float | None = None
    high: float | None = None

    def excludes_zero(self) -> bool:
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)


@dataclass(frozen=True)
class Measure(Part):
    """One measure of the evidence: each arm's value and its difference to the reference arm, keyed by arm spec."""

    DICT_OF: ClassVar[dict] = {"values": Interval, "differences": Interval}
    values: dict[str, Interval] = field(default_factory=dict)
    differences: dict[str, Interval] = field(default_factory=dict)
    per_seed: dict[str, list] = field(default_factory=dict)
    label: str = ""
    better: str = "lower"  # | "higher"


@dataclass(frozen=True)
class Evidence(Part):
    DICT_OF: ClassVar[dict] = {"measures": Measure}
    reference: str = ""  # the reference arm's spec
    method: str = ""
    level: float = 0.95
    n_seeds: int = 1
    n_examples: dict = field(default_factory=dict)  # {"heldout": n, "train": n}
    measures: dict[str, Measure] = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict(Part):
    """The one verdict of a comparison (imtune.report.write.verdict): computed once, stored in compare.json, shown by
    the report and the terminal view. `measures`: per measure its values and comparisons (the report's own rows). An
    older imtune's verdict, which lacks some of these keys, is written back with the keys it had (Part)."""

    version: int = 0
    thresholds: dict = field(default_factory=dict)
    evidence_method: str | None = None
    measures: list = field(default_factory=list)
    headline: str = ""
    warnings: list = field(default_factory=list)
    learned_nothing: dict | None = None  # {"warning", "runs"}
    advice: dict | None = None  # {"advised", "arm", "outcome", "agreement", "text"}
    bullets: list = field(default_factory=list)
    undecided: list = field(default_factory=list)  # why the budget cannot decide: "few", "falling", "small"
    next: list = field(default_factory=list)  # [{"why", "command"}]
    text: str = ""


@dataclass(frozen=True)
class RunResult:
    seed: int | None
    dir: str  # the run directory, relative to COMPARE_DIR
    results: Scores = field(default_factory=Scores)  # its scores (imtune.experiments.score); empty before evaluation

    @classmethod
    def from_json(cls, d: dict) -> RunResult:
        return cls(d["seed"], d["dir"], Scores.from_json(d.get("results") or {}))

    def to_json(self) -> dict:
        return {"seed": self.seed, "dir": self.dir, **({"results": self.results.to_json()} if self.results else {})}


@dataclass(frozen=True)
class ArmResult:
    spec: str  # as typed: "weighted:0.1"
    name: str  # its directory name under arms/
    dir: str | None
    overrides: dict
    runs: tuple[RunResult, ...]
    results: Scores = field(default_factory=Scores)  # the mean over seeds, in one run's shape, plus `seeds`

    @classmethod
    def from_json(cls, d: dict, seed: int | None = None) -> ArmResult:
        runs = d["runs"] if "runs" in d else [{"seed": seed, "dir": d["dir"], "results": d.get("results")}]
        return cls(d.get("spec", d["name"]), d["name"], d.get("dir"), dict(d.get("overrides") or {}),
                   tuple(RunResult.from_json(r) for r in runs), Scores.from_json(d.get("results") or {}))

    def to_json(self) -> dict:
        return {"spec": self.spec, "name": self.name, "dir": self.dir, "overrides": self.overrides,
                "runs": [r.to_json() for r in self.runs],
                **({"results": self.results.to_json()} if self.results else {})}


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
    verdict: Verdict | None = None  # the one verdict (report.write.verdict), stored by compare
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
                   d.get("versions") or {},
                   Verdict.from_json(d["verdict"]) if isinstance(d.get("verdict"), dict) else None,
                   d.get("time"), d.get("memory"))

    def to_json(self) -> dict:
        """The object compare.json holds; a version-1 file (read from an older imtune, given a verdict by
        --report-only) keeps its shape: arms without "runs", and no evidence or versions it did not have."""
        arms = [a.to_json() for a in self.arms]
        if self.version == 1:
            arms = [{k: v for k, v in a.items() if k != "runs"} for a in arms]
        out = {"version": self.version, "dir": self.dir, "commands": self.commands, "settings": self.settings,
               "data": self.data, "arms": arms,
               **({"evidence": self.evidence and self.evidence.to_json()} if self.evidence or self.version > 1 else {}),
               **({"versions": self.versions} if self.versions or self.version > 1 else {})}
        out.update({k: v for k, v in (("verdict", self.verdict and self.verdict.to_json()), ("time", self.time),
                                      ("memory", self.memory))
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


