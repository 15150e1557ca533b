"""imtune.analysis.evidence: the hierarchical paired bootstrap against cases with a known answer."""
from __future__ import annotations

import numpy as np
import pytest

from imtune.analysis import evidence as ev


def test_a_constant_difference_gives_a_zero_width_interval_at_that_value():
    rng = np.random.default_rng(0)
    S, N, c = 3, 50, 0.125
    tokens = rng.integers(1, 20, size=(S, N)).astype(float)
    base = rng.gamma(2.0, 1.0, size=(S, N)) * tokens  # per-example nll sums, varying a lot
    num = np.stack([base, base + c * tokens])  # arm 1 = arm 0 + c nats on every token
    den = np.stack([tokens, tokens])
    out = ev.compare_arms(num, den, reference=0)
    d = out["differences"][1]
    assert d["value"] == pytest.approx(c) and d["low"] == pytest.approx(c) and d["high"] == pytest.approx(c)
    assert out["differences"][0] == {"value": 0.0, "low": 0.0, "high": 0.0}
    assert out["values"][0]["low"] < out["values"][0]["value"] < out["values"][0]["high"]  # the level varies


def test_one_seed_many_examples_matches_the_analytic_standard_error():
    rng = np.random.default_rng(1)
    N, mu, sd = 4000, 0.3, 1.0
    a = rng.normal(2.0, 1.0, N)
    b = a + rng.normal(mu, sd, N)  # paired: per-example differences ~ N(mu, sd)
    num, den = np.stack([a, b])[:, None, :], np.ones((2, 1, N))
    d = ev.compare_arms(num, den, reference=0)["differences"][1]
    diffs = b - a
    se = diffs.std(ddof=1) / np.sqrt(N)
    assert d["value"] == pytest.approx(diffs.mean())
    assert (d["high"] - d["low"]) / 2 == pytest.approx(1.96 * se, rel=0.1)
    assert d["low"] < diffs.mean() < d["high"]
    # Unpaired noise would be much wider: the pairing is kept (a's own spread of 1.0 cancels).
    assert (d["high"] - d["low"]) / 2 < 1.96 * np.sqrt(2.0) / np.sqrt(N)


def test_the_seed_level_dominates_when_seeds_disagree():
    """Many seeds whose difference varies (sd 0.05) with no example noise: the interval is that of a mean of seeds."""
    rng = np.random.default_rng(2)
    S, N = 400, 5
    c = rng.normal(0.1, 0.05, S)
    a = np.ones((S, N))
    num = np.stack([a, a + c[:, None]])
    d = ev.compare_arms(num, np.ones_like(num), reference=0)["differences"][1]
    assert (d["high"] - d["low"]) / 2 == pytest.approx(1.96 * c.std(ddof=1) / np.sqrt(S), rel=0.15)


def test_gap_difference_and_helpers():
    S, N = 2, 30
    ho = (np.stack([np.full((S, N), 2.0), np.full((S, N), 1.5)]), np.ones((2, S, N)))
    tr = (np.stack([np.full((S, 10), 1.0), np.full((S, 10), 1.2)]), np.ones((2, S, 10)))
    d = ev.gap_differences(ho, tr, reference=0)[1]  # (1.5-1.2) - (2.0-1.0) = -0.7
    assert d == {"value": pytest.approx(-0.7), "low": pytest.approx(-0.7), "high": pytest.approx(-0.7)}
    assert ev.excludes_zero(d) and not ev.excludes_zero({"low": -0.1, "high": 0.2})
    assert ev.spread([1.0, 3.0]) == {"mean": 2.0, "sd": pytest.approx(np.sqrt(2)), "min": 1.0, "max": 3.0, "n": 2}
    t = ev.linear_trend([1, 10, 100], [0.0, 1.0, 2.0], log_x=True)
    assert t["slope"] == pytest.approx(1.0) and t["intercept"] == pytest.approx(0.0, abs=1e-12)
    assert ev.linear_trend([5, 5], [1.0, 2.0]) is None
