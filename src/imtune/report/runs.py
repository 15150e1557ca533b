"""A comparison's runs for the report: compare.json's arms and runs, their metrics curves, and how a value is shown."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

from imtune.files import inside, refuse_links
from imtune.results import CompareResult, StudyResult, SweepResult
from imtune.rundir.read import config_text, metrics
from imtune.types import UsageError

R = TypeVar("R", CompareResult, SweepResult, StudyResult)
THRESHOLDS = {"loss_relative": 0.01, "bleu_points": 1.0, "standard_errors": 2.0}


# ----------------------------------------------------------------------------------------------------------------
# Reading
def read_summary(compare_dir: str | Path) -> CompareResult:
    """COMPARE_DIR/compare.json: what the report, the terminal view, sweep, study and the demo read."""
    if not (Path(compare_dir) / "compare.json").is_file() and not (Path(compare_dir) / "compare.json").is_symlink():
        raise UsageError(f"{compare_dir}: no compare.json (not a finished `imtune compare` directory)")
    return read_record(Path(compare_dir) / "compare.json", CompareResult)


def read_record(path: Path, kind: type[R]) -> R:
    """compare.json, sweep.json or study.json as its record (imtune.results): the one reader of these files. They may
    come from elsewhere, so what imtune did not write — absent, a link, not JSON, another version, the wrong shape
    (kind.from_json says which) — is a UsageError that names the file and what is wrong."""
    path = Path(path)
    if path.is_symlink():
        raise UsageError(f"{path} is a symbolic link: imtune reads its own files only as they are")
    if not path.is_file():
        raise UsageError(f"{path}: not found (not a finished imtune {path.stem} directory)")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UsageError(f"{path}: not readable as JSON ({e}); rerun the command to write it again") from None
    try:
        return kind.from_json(obj)
    except ValueError as e:
        raise UsageError(f"{path}: not a {path.name} imtune wrote: {e}") from None


def load(compare_dir: str | Path) -> tuple[CompareResult, dict[str, list[dict]], dict[str, str]]:
    """(compare.json, run dir -> metrics.jsonl records, run dir -> config.yaml text)."""
    d = Path(compare_dir)
    refuse_links(d)
    summary = read_summary(d)
    for _, r in summary.runs():  # compare.json may come from elsewhere: its run directories stay inside d
        refuse_links(inside(d, r.dir))
    texts = {r.dir: config_text(d / r.dir) for _, r in summary.runs()}
    configs = {k: "(missing)" if v is None else v for k, v in texts.items()}
    return summary, load_metrics(summary, d), configs


def load_metrics(summary: CompareResult, d: Path) -> dict[str, list[dict]]:
    return {r.dir: metrics(d / r.dir, kind=None) for _, r in summary.runs()}


def eval_points(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("type") == "eval"]


def train_points(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("type", "train") == "train"]


def show_value(key: str, v) -> str:
    if v is None:
        return "–"
    if key == "bleu":
        return f"{v:.2f}"
    if key.startswith("bench:mtbench"):
        return f"{v:.2f}"  # MT-Bench: a 1-10 score, not a fraction
    if key == "exact_match" or key.startswith("bench:"):
        return f"{100 * v:.1f}%"
    return f"{v:.4f}"


def show_diff(key: str, d: float) -> str:
    if key.startswith("bench:mtbench"):
        return f"{d:.2f}"
    return f"{100 * d:.1f} points" if key == "exact_match" or key.startswith("bench:") else show_value(key, d)
