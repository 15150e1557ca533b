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
    assert {"label", "load", "KEY_FIELDS", "Options"} <= set(members)
    assert isinstance(mod, protocol), [m for m in members if not hasattr(mod, m)]


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
