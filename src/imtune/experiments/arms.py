"""What a comparison is asked: its arms (`it`, `im`, `weighted:λ`, +neftune/+kl) and its settings (CompareSettings)."""
from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from imtune.config import TrainConfig
from imtune.types import UsageError

ARM_FORMS = ("it, im, all or weighted:λ (λ >= 0), each optionally followed by +neftune:α and/or +kl:λ, "
             "e.g. it,im,weighted:0.1,im+neftune:5,it+kl:1")


BASE_MODES = ("it", "im", "all")


MODIFIERS = {"neftune": "neftune_alpha", "kl": "kl_coef"}  # +name:value -> TrainConfig field


@dataclass(frozen=True)
class Arm:
    spec: str  # as typed, e.g. "im+neftune:5"
    name: str  # directory name, e.g. "im+neftune-5"
    overrides: dict  # TrainConfig fields this arm sets


def _number(text: str, what: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not (math.isfinite(v) and v >= 0):
        raise UsageError(f"arm {what!r}: {text!r} is not a number >= 0; valid arms: {ARM_FORMS}")
    return v


def parse_arm(spec: str) -> Arm:
    spec = spec.strip().lower()  # IM, Weighted:0.1: arms are case-insensitive
    head, *mods = spec.split("+")
    mode, _, value = head.partition(":")
    if mode in BASE_MODES and not value:
        over = {"loss": mode, "prompt_weight": None}
    elif mode == "weighted" and value:
        over = {"loss": "weighted", "prompt_weight": _number(value, spec)}
    else:
        raise UsageError(f"unknown arm {spec!r}; valid arms: {ARM_FORMS}")
    over.update(neftune_alpha=0.0, kl_coef=0.0)
    for m in mods:
        name, _, value = m.partition(":")
        if name not in MODIFIERS or not value:
            raise UsageError(f"unknown arm modifier {'+' + m!r} in {spec!r}; valid arms: {ARM_FORMS}")
        over[MODIFIERS[name]] = _number(value, spec)
    return Arm(spec, re.sub(r"[^A-Za-z0-9+._-]", "-", spec.replace(":", "-")), over)


def parse_arms(text: str) -> list[Arm]:
    arms = [parse_arm(s) for s in text.split(",") if s.strip()]
    if len(arms) < 1:
        raise UsageError(f"--arms: give at least one arm; valid arms: {ARM_FORMS}")
    names = [a.name for a in arms]
    if len(set(names)) < len(names):
        raise UsageError(f"--arms {text!r} names an arm twice")
    return arms


@dataclass
class CompareSettings:
    """What `imtune compare` was asked. `base` carries every training flag (shared by all arms)."""

    out: Path
    base: TrainConfig
    arms: list[Arm]
    seeds: list[int] | None = None  # every arm trains once per seed; None: [base.seed]
    reference: str | None = None  # arm spec or name the others are compared with; None: the first arm
    val_fraction: float = 0.3  # share of the held-out data that selects best checkpoints (0: no best/)
    val_data: str | None = None  # validation data for the selection instead of a split of the held-out data
    max_steps_cap: int | None = None  # at most this many optimizer steps per run (imtune study --budget)
    heldout_fraction: float = 0.1
    # training examples whose final output loss is the train side of the gap: None = the trainer's fixed sample
    # (eval_train_sample) as it scored it at the last step (else all); N = a fixed sample scored at the end; "all"
    loss_samples: int | str | None = None
    bleu_samples: int = 16  # training prompts answered greedily for memorisation BLEU
    exact_match: int = 0  # held-out prompts answered greedily and scored by exact match (short-answer data)
    dry_run: bool = False  # print the plan and its estimated cost, train nothing
    ray: object = None  # imtune.experiments.ray_jobs.RayPlan: train the grid on a Ray cluster (--executor ray)
    max_new_tokens: int = 128
    bench: list[tuple[str, str]] = field(default_factory=list)  # (benchmark, data path)
    bench_limit: int | None = None
    # LLM judge of the judged benchmarks (alpacaeval, mtbench): judge_url, judge_model, judge_api_key_env, judge_cache.
    # One judge for every arm of a comparison: scores under different judges are never compared.
    judge: dict = field(default_factory=dict)
    bench_max_new_tokens: int | None = None  # answer length for benchmarks (None: each benchmark's own)
    device: str = "auto"
    jobs: int = 1  # runs trained side by side (imtune.experiments.jobs); 1: one after another in this process
    keep: str = "both"  # which models of each run stay on disk after its evaluation (KEEP)
    checkpoints: bool = True  # without --save-every: a checkpoint at each evaluation point, for Ctrl-C (demo: off)
    plan: bool = True  # print the measured plan before the first step (demo: off, its fixed cost is stated instead)
    planned: object = None  # --dry-run: the imtune.train.cost.Cost it printed (sweep and study add up their grid's)
    argv: list[str] = field(default_factory=lambda: list(sys.argv))

    def eval_settings(self) -> dict:
        return {"loss_samples": "trainer" if self.loss_samples is None else self.loss_samples,
                "bleu_samples": self.bleu_samples, "exact_match": self.exact_match,
                "max_new_tokens": self.max_new_tokens, "bench": [list(b) for b in self.bench],
                "bench_limit": self.bench_limit,
                "judge": {k: v for k, v in self.judge.items() if k in ("judge_url", "judge_model")},
                **({"judge_max_tokens": self.judge["judge_max_tokens"]} if self.judge.get("judge_max_tokens") else {}),
                **({"bench_max_new_tokens": self.bench_max_new_tokens} if self.bench_max_new_tokens else {})}

    def seed_list(self) -> list[int]:
        return list(self.seeds) if self.seeds else [self.base.seed]

    def reference_arm(self) -> Arm:
        if self.reference is None:
            return self.arms[0]
        for a in self.arms:
            if self.reference in (a.spec, a.name):
                return a
        arms = ", ".join(a.spec for a in self.arms)
        raise UsageError(f"--reference {self.reference!r} is not one of the arms ({arms})")


KEEP = ("final", "best", "both", "none")  # --keep: which models of each run stay on disk after its evaluation


# ----------------------------------------------------------------------------------------------------------------
# Small helpers
def fmt(x, digits: int = 4) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def read_json(path: Path) -> dict | None:
    """A JSON object imtune wrote (None when absent or unreadable); a symbolic link is refused, never followed."""
    if Path(path).is_symlink():
        raise UsageError(f"{path} is a symbolic link: imtune reads its own files only as they are")
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
