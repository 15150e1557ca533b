"""Intervals for comparisons over seeds and held-out examples: pure functions on numpy arrays (no torch).

The data. A measure of one run is a ratio of sums over the held-out examples: held-out output loss is
Σ_i nll_i / Σ_i tokens_i (the per-token micro average the evaluation reports), exact match is Σ_i correct_i / Σ_i 1.
For A arms and S seeds on the same N examples the inputs are two arrays num[A, S, N] and den[A, S, N]. Runs are
PAIRED twice: arm a and arm b with seed s share initialisation and data order, and every run is scored on the same
examples.

The statistic. value[a] = mean over seeds of the per-seed ratio  Σ_i num[a, s, i] / Σ_i den[a, s, i];
difference(a, ref) = value[a] − value[ref] (= the mean over seeds of the per-seed paired differences).

The interval: a two-level (hierarchical) paired percentile bootstrap. Each of B replicates
  1. draws S seeds with replacement (the seed-to-seed variation: another seed is another training run), then
  2. within each drawn seed, draws N example indices with replacement (the held-out sample: other examples),
and recomputes every arm's value on the SAME draws (so the pairing is kept), then the differences. The 95% interval
is the 2.5th and 97.5th percentile of the replicates. With one seed step 1 is a no-op and the interval covers the
example sampling only; with few seeds (2-3) the seed level is coarse (only a handful of distinct seed draws), so the
interval is a floor on the uncertainty rather than an exact coverage statement. A difference that is the same on
every example (num_a − num_b = c·den) gives a zero-width interval at c; for one seed and many examples the interval
approaches ±1.96 standard errors of the mean paired difference (tests/test_evidence.py checks both).

Several example sets (e.g. held-out and training sample, for the train/held-out gap) share step 1's seed draw and
get their own step 2 (`replicates(..., seed_idx=...)`).
"""
from __future__ import annotations

import numpy as np

LEVEL = 0.95
N_BOOT = 2000
METHOD = ("hierarchical paired percentile bootstrap: resample seeds, then held-out examples within each seed; "
          f"{N_BOOT} replicates; {100 * LEVEL:g}% interval")


def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """[..., S, N] -> [...]: mean over seeds of Σ num / Σ den over examples."""
    return (num.sum(-1) / den.sum(-1)).mean(-1)


def seed_draws(n_seeds: int, n_boot: int = N_BOOT, rng: np.random.Generator | None = None) -> np.ndarray:
    """[B, S] seed indices drawn with replacement (step 1)."""
    rng = rng or np.random.default_rng(0)
    return rng.integers(0, n_seeds, size=(n_boot, n_seeds))


def replicates(num: np.ndarray, den: np.ndarray, seed_idx: np.ndarray,
               rng: np.random.Generator | None = None) -> np.ndarray:
    """num, den [A, S, N] -> [B, A]: each arm's value on B bootstrap replicates (step 2 on the given seed draws)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    A, S, N = num.shape
    rng = rng or np.random.default_rng(1)
    B = len(seed_idx)
    out = np.empty((B, A))
    step = max(1, 4_000_000 // max(1, S * N * A))  # replicates per block: bounded memory
    for b0 in range(0, B, step):
        s = seed_idx[b0:b0 + step]  # [b, S]
        ex = rng.integers(0, N, size=(len(s), S, N))  # [b, S, N]
        n = num[:, s[..., None], ex]  # [A, b, S, N]
        d = den[:, s[..., None], ex]
        out[b0:b0 + step] = (n.sum(-1) / d.sum(-1)).mean(-1).T
    return out


def interval(reps: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    lo, hi = np.percentile(reps, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def summarize(value: float, reps: np.ndarray, level: float = LEVEL) -> dict:
    """{"value", "low", "high"}: a point estimate and its percentile interval."""
    lo, hi = interval(reps, level)
    return {"value": float(value), "low": lo, "high": hi}


def compare_arms(num: np.ndarray, den: np.ndarray, reference: int = 0, n_boot: int = N_BOOT,
                 seed: int = 0) -> dict:
    """num, den [A, S, N] -> {"values": [A] {value, low, high}, "differences": [A] {value, low, high} of arm −
    reference (the reference's own entry is 0), "per_seed": [A][S] per-seed values, "method"}."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    rng = np.random.default_rng(seed)
    reps = replicates(num, den, seed_draws(num.shape[1], n_boot, rng), rng)
    point = ratio(num, den)
    return {"values": [summarize(point[a], reps[:, a]) for a in range(len(point))],
            "differences": [summarize(point[a] - point[reference], reps[:, a] - reps[:, reference])
                            for a in range(len(point))],
            "per_seed": (num.sum(-1) / den.sum(-1)).tolist(), "method": METHOD}


def gap_differences(ho: tuple[np.ndarray, np.ndarray], tr: tuple[np.ndarray, np.ndarray], reference: int = 0,
                    n_boot: int = N_BOOT, seed: int = 0) -> list[dict]:
    """(held-out − train) of each arm minus the reference's, with intervals: held-out and training examples are
    resampled independently on shared seed draws. ho, tr: (num, den) [A, S, N_ho] and [A, S, N_tr]."""
    rng = np.random.default_rng(seed)
    s = seed_draws(np.asarray(ho[0]).shape[1], n_boot, rng)
    reps = replicates(*ho, s, rng) - replicates(*tr, s, rng)  # [B, A]
    point = ratio(*map(np.asarray, ho)) - ratio(*map(np.asarray, tr))
    return [summarize(point[a] - point[reference], reps[:, a] - reps[:, reference]) for a in range(len(point))]


def excludes_zero(iv: dict) -> bool:
    return iv["low"] > 0 or iv["high"] < 0


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), min and max over seeds."""
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "min": float(v.min()),
            "max": float(v.max()), "n": int(len(v))}


def linear_trend(x: list[float], y: list[float], se: list[float] | None = None, log_x: bool = False) -> dict | None:
    """Weighted least-squares line y = a + b·x (x on a log10 scale when log_x); weights 1/se² where the standard
    errors are positive. None with fewer than two distinct x."""
    xs = np.log10(np.asarray(x, dtype=np.float64)) if log_x else np.asarray(x, dtype=np.float64)
    ys = np.asarray(y, dtype=np.float64)
    if len(set(xs.tolist())) < 2:
        return None
    w = None
    if se is not None:
        s = np.asarray(se, dtype=np.float64)
        if np.all(s > 0):
            w = 1.0 / s
    slope, intercept = np.polyfit(xs, ys, 1, w=w)
    return {"intercept": float(intercept), "slope": float(slope), "x_scale": "log10" if log_x else "linear",
            "weighted": w is not None}
