"""Runs -> evidence: per-arm means and spreads over seeds, and paired intervals against a reference arm.

    arms[*].runs[*].results (one per seed, from imtune.experiments.score.evaluate_arm, with per-example output losses)
        ─▶ arms[*].results   the mean over seeds of each measure (the shape one run's results have), plus "seeds":
                             mean / sd / min / max of each measure over seeds
        ─▶ evidence          per measure: each arm's value and its difference to the reference arm, with 95%
                             intervals from imtune.analysis.evidence (seeds and held-out examples resampled, pairs
                             kept)

Measures with intervals: held-out (test) output loss of the final model and of the best checkpoint, the
train/held-out gap, and held-out exact match. The per-example lists stay in each run's eval/compare.json;
compare.json keeps the per-seed numbers and the intervals.
"""
from __future__ import annotations

import numpy as np

from imtune.analysis import evidence as ev

MEASURES = {  # key -> (label, better, where in one run's results)
    "heldout_loss": ("held-out output loss (final)", "lower"),
    "best_heldout_loss": ("held-out output loss (best checkpoint)", "lower"),
    "gap": ("train/held-out gap (final)", "lower"),
    "exact_match": ("held-out exact match (final)", "higher"),
}


def _mean(values: list):
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals and len(vals) == len(values) else None


def _per_run_value(r: dict, key: str):
    if key == "heldout_loss":
        return r["heldout"]["output_loss"]
    if key == "best_heldout_loss":
        return r["best"]["heldout"]["output_loss"] if "best" in r else None
    if key == "gap":
        return r["gap"]
    if key == "exact_match":
        return r["exact_match"]["accuracy"] if "exact_match" in r else None
    if key == "train_loss":
        return r["train"]["output_loss"]
    raise KeyError(key)


def arm_results(runs: list[dict]) -> dict:
    """The mean over seeds, in the shape of one run's results (so tables read both alike), plus the spreads."""
    rs = [run["results"] for run in runs]
    first = rs[0]
    out = {"train": {"n": first["train"]["n"], "output_loss": _mean([r["train"]["output_loss"] for r in rs])},
           "heldout": {"n": first["heldout"]["n"], "output_loss": _mean([r["heldout"]["output_loss"] for r in rs])},
           "gap": _mean([r["gap"] for r in rs])}
    if all("best" in r for r in rs):
        out["best"] = {"heldout": {"n": first["best"]["heldout"]["n"],
                                   "output_loss": _mean([r["best"]["heldout"]["output_loss"] for r in rs])},
                       "steps": [r["best"]["step"] for r in rs], "selected_on": first["best"]["selected_on"]}
    if all("bleu" in r for r in rs):
        b = first["bleu"]
        out["bleu"] = {**b, "corpus_bleu": _mean([r["bleu"]["corpus_bleu"] for r in rs]),
                       "sentence_bleu": [x for r in rs for x in r["bleu"]["sentence_bleu"]]}
    if all("exact_match" in r for r in rs):
        correct = [x for r in rs for x in r["exact_match"]["correct"]]
        out["exact_match"] = {"n": len(correct), "accuracy": sum(correct) / max(len(correct), 1), "correct": correct}
    if all("bench" in r for r in rs):
        out["bench"] = {k: {**v, "value": _mean([r["bench"][k]["value"] for r in rs])}
                        for k, v in first["bench"].items() if all(k in r["bench"] for r in rs)}
    out["seeds"] = {k: ev.spread(vals) for k in ("train_loss", *MEASURES)
                    for vals in [[_per_run_value(r, k) for r in rs]] if None not in vals}
    return out


def _arrays(arms: list[dict], part: str) -> tuple[np.ndarray, np.ndarray] | None:
    """num, den [A, S, N] of one per-example part (heldout, best_heldout, train) over the examples every run scored
    (the same sources for all: same files, same tokenizer); None if any run lacks it."""
    per = [[run["results"].get("per_example", {}).get(part) for run in a["runs"]] for a in arms]
    if any(p is None for row in per for p in row):
        return None
    common = set.intersection(*(set(p["source"]) for row in per for p in row))
    order = [s for s in per[0][0]["source"] if s in common]
    if not order:
        return None

    def pick(p, field):
        at = {s: v for s, v in zip(p["source"], p[field])}
        return [at[s] for s in order]

    num = np.array([[pick(p, "output_nll") for p in row] for row in per], dtype=np.float64)
    den = np.array([[pick(p, "output_tokens") for p in row] for row in per], dtype=np.float64)
    return num, den


def _exact_arrays(arms: list[dict]) -> tuple[np.ndarray, np.ndarray] | None:
    rows = [[run["results"].get("exact_match", {}).get("correct") for run in a["runs"]] for a in arms]
    if any(c is None for row in rows for c in row) or len({len(c) for row in rows for c in row}) != 1 \
            or not rows[0][0]:
        return None
    num = np.array(rows, dtype=np.float64)
    return num, np.ones_like(num)


def _pack(arms: list[dict], out: dict) -> dict:
    names = [a["spec"] for a in arms]
    return {"values": dict(zip(names, out["values"])), "differences": dict(zip(names, out["differences"])),
            "per_seed": dict(zip(names, out["per_seed"]))}


def aggregate(arms: list[dict], reference: str) -> dict:
    """Fill arms[*]["results"] (means, spreads), drop the per-example lists from the runs, return the evidence."""
    ref = next(i for i, a in enumerate(arms) if a["name"] == reference)
    measures = {}
    ho, tr, best = _arrays(arms, "heldout"), _arrays(arms, "train"), _arrays(arms, "best_heldout")
    sizes = {}
    if ho is not None:
        measures["heldout_loss"] = _pack(arms, ev.compare_arms(*ho, reference=ref))
        sizes["heldout"] = ho[0].shape[-1]
    if best is not None:
        measures["best_heldout_loss"] = _pack(arms, ev.compare_arms(*best, reference=ref))
    if ho is not None and tr is not None:
        diffs = ev.gap_differences(ho, tr, reference=ref)
        per_seed = (ho[0].sum(-1) / ho[1].sum(-1) - tr[0].sum(-1) / tr[1].sum(-1)).tolist()
        measures["gap"] = {"values": {a["spec"]: {"value": float(np.mean(p))} for a, p in zip(arms, per_seed)},
                           "differences": dict(zip([a["spec"] for a in arms], diffs)),
                           "per_seed": dict(zip([a["spec"] for a in arms], per_seed))}
        sizes["train"] = tr[0].shape[-1]
    em = _exact_arrays(arms)
    if em is not None:
        measures["exact_match"] = _pack(arms, ev.compare_arms(*em, reference=ref))
        sizes["exact_match"] = em[0].shape[-1]
    for key, m in measures.items():
        m["label"], m["better"] = MEASURES[key]
    for a in arms:
        for run in a["runs"]:
            run["results"] = {k: v for k, v in run["results"].items() if k != "per_example"}
        a["results"] = arm_results(a["runs"])
    return {"reference": arms[ref]["spec"], "method": ev.METHOD, "level": ev.LEVEL,
            "n_seeds": len(arms[0]["runs"]), "n_examples": sizes, "measures": measures}
