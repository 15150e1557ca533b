"""imtune.tasks: every benchmark module defines what its Protocol says run_benchmark / score_samples call."""
from __future__ import annotations

import types

import pytest

from imtune import tasks


@pytest.mark.parametrize("name", [n for n in tasks.BENCHMARKS if n != "harness"])
def test_every_benchmark_module_satisfies_its_protocol(name):
    protocol = tasks.JudgedTask if name in tasks.JUDGED else tasks.ScoredTask
    mod = tasks.module(name)
    members = [m for m in vars(protocol) if not m.startswith("_")] + list(protocol.__annotations__)
    assert {"label", "load", "KEY_FIELDS", "Options", "HEADLINE"} <= set(members)
    assert isinstance(mod, protocol), [m for m in members if not hasattr(mod, m)]


def test_each_benchmark_declares_the_number_it_is_reported_by():
    """compare's benchmark table takes (metric, scale) from the task module, never by sniffing result keys; for a rule-
    scored task the metric is a key of what its summarize returns."""
    assert {n: tasks.headline(n) for n in tasks.BENCHMARKS} == {
        "gsm8k": ("accuracy", "fraction"), "humaneval": ("pass@1", "fraction"), "bbh": ("accuracy", "fraction"),
        "harness": (None, "fraction"), "alpacaeval": ("win_rate", "fraction"), "mtbench": ("score", "1-10")}
    gsm8k = tasks.module("gsm8k")
    opts = tasks.make_options("gsm8k", {})
    result = gsm8k.summarize([(object(), "The answer is 4.")], [tasks.Verdict(True, "4")], opts)
    assert gsm8k.HEADLINE in result and result[gsm8k.HEADLINE] == 1.0


def test_a_module_missing_a_member_does_not_satisfy_it():
    gsm8k = tasks.module("gsm8k")
    partial = types.ModuleType("partial")
    partial.__dict__.update({k: v for k, v in vars(gsm8k).items() if k != "postprocess"})
    assert isinstance(gsm8k, tasks.ScoredTask)
    assert not isinstance(partial, tasks.ScoredTask)
    assert not isinstance(gsm8k, tasks.JudgedTask)  # no run/summary/markdown


def test_unknown_benchmark_lists_the_valid_ones():
    with pytest.raises(tasks.UsageError, match="valid: gsm8k, humaneval"):
        tasks.module("nope")
