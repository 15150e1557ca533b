"""A comparison's runs for the report: compare.json's arms and runs, their metrics curves, and how a value is shown."""
from __future__ import annotations

import json
from pathlib import Path

from imtune.files import inside, refuse_links
from imtune.rundir.read import config_text, metrics
from imtune.types import UsageError

THRESHOLDS = {"loss_relative": 0.01, "bleu_points": 1.0, "standard_errors": 2.0}


# ----------------------------------------------------------------------------------------------------------------
# Reading
def runs_of(summary: dict) -> list[tuple[dict, dict]]:
    """(arm, run) for every arm x seed; a version-1 compare.json (one seed, arms/<arm>/) has one run per arm."""
    seed = summary["settings"]["base_config"].get("seed")
    return [(a, r) for a in summary["arms"] for r in a.get("runs") or [{"seed": seed, "dir": a["dir"]}]]


def run_label(arm: dict, run: dict, summary: dict) -> str:
    return arm["spec"] if len(summary.get("settings", {}).get("seeds") or [0]) == 1 else \
        f"{arm['spec']} seed {run['seed']}"


SUMMARY_VERSIONS = (1, 2)  # compare.json "version"s this code reads


def read_summary(compare_dir: str | Path) -> dict:
    """COMPARE_DIR/compare.json: the one reader (report, terminal view, sweep, study, demo). The file may come from
    elsewhere, so what is not a compare.json imtune wrote — absent, a link, not JSON, another version, arms that are
    not a list of {name, runs: [{seed, dir}]} — is a UsageError that names the file and what is wrong."""
    d = Path(compare_dir)
    path = d / "compare.json"
    if path.is_symlink():
        raise UsageError(f"{path} is a symbolic link: imtune reads its own files only as they are")
    if not path.is_file():
        raise UsageError(f"{d}: no compare.json (not a finished `imtune compare` directory)")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UsageError(f"{path}: not readable as JSON ({e}); rerun the comparison to write it again") from None
    problem = _summary_problem(summary)
    if problem:
        raise UsageError(f"{path}: not a compare.json imtune wrote: {problem}")
    return summary


def _summary_problem(summary) -> str | None:
    if not isinstance(summary, dict):
        return "not a JSON object"
    if summary.get("version", 1) not in SUMMARY_VERSIONS:
        return f"version {summary.get('version')!r} (this imtune reads {', '.join(map(str, SUMMARY_VERSIONS))})"
    if not isinstance(summary.get("settings"), dict) or not isinstance(summary["settings"].get("base_config"), dict):
        return '"settings" without a "base_config" object'
    arms = summary.get("arms")
    if not isinstance(arms, list) or not arms:
        return '"arms" is not a non-empty list'
    for a in arms:  # version 2: "runs" per arm; version 1: one run, the arm's own "dir"
        if not isinstance(a, dict) or not isinstance(a.get("name"), str):
            return 'an arm without a "name"'
        runs = a.get("runs") if "runs" in a else [{"seed": None, "dir": a.get("dir")}]
        if not isinstance(runs, list) or not all(isinstance(r, dict) and isinstance(r.get("dir"), str) and "seed" in r
                                                 for r in runs):
            return f'arm {a["name"]!r}: a run without a "dir" or a "seed"'
    return None


def load(compare_dir: str | Path) -> tuple[dict, dict[str, list[dict]], dict[str, str]]:
    """(compare.json, run dir -> metrics.jsonl records, run dir -> config.yaml text)."""
    d = Path(compare_dir)
    refuse_links(d)
    summary = read_summary(d)
    for _, r in runs_of(summary):  # compare.json may come from elsewhere: its run directories stay inside d
        refuse_links(inside(d, r["dir"]))
    texts = {r["dir"]: config_text(d / r["dir"]) for _, r in runs_of(summary)}
    configs = {k: "(missing)" if v is None else v for k, v in texts.items()}
    return summary, load_metrics(summary, d), configs


def load_metrics(summary: dict, d: Path) -> dict[str, list[dict]]:
    return {r["dir"]: metrics(d / r["dir"], kind=None) for _, r in runs_of(summary)}


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
