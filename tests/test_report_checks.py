"""imtune.report.checks.next_commands: an undecided or tied comparison ends with the commands that would make it
decide, each the command that ran it with one flag changed, and each parses with the real CLI parser."""
from __future__ import annotations

import json
import shlex

from imtune.cli import build_parser, main
from imtune.report.checks import MIN_HELDOUT, next_commands
from imtune.results import CompareResult


def parsed(command: str, words: str = "compare") -> dict:
    parts = shlex.split(command)
    assert parts[:len(words.split()) + 1] == ["imtune", *words.split()], command
    return vars(build_parser(words).parse_args(parts[1 + len(words.split()):]))


def changed(command: str, argv: list[str], words: str = "compare") -> dict:
    """The parsed values that differ between `command` and the original argv (program name first)."""
    new, old = parsed(command, words), vars(build_parser(words).parse_args(argv[1 + len(words.split()):]))
    return {k: (old.get(k), new.get(k)) for k in set(new) | set(old) if new.get(k) != old.get(k)}


def summary(argv: list[str], **over) -> CompareResult:
    s = {"dir": "runs/compare-d", "commands": [{"argv": argv, "cwd": "/x", "time": "t"}],
         "arms": [{"name": "it", "spec": "it", "runs": [{"seed": 0, "dir": "arms/it/seed-0"}]}],
         "settings": {"base_config": {"epochs": 2.0, "max_steps": None, "seed": 42}, "seeds": [0, 1]},
         "data": {"n_train": 90, "n_heldout": 10, "n_test": 7, "split": {"kind": "split", "heldout_fraction": 0.1}},
         "evidence": {"n_examples": {"heldout": 7}}}
    for k, v in over.items():
        s[k] = {**s[k], **v} if isinstance(v, dict) else v
    return CompareResult.from_json(s)


ARGV = ["imtune", "compare", "d.jsonl", "--arms", "it,im", "--seeds", "0", "1", "--epochs=2", "--limit", "100"]


def test_each_reason_changes_its_own_flag():
    steps = dict(next_commands(summary(ARGV), ["falling", "few", "tie"]))
    budget, held, seeds = (next(c for w, c in steps.items() if w.startswith(p))
                           for p in ("held-out loss still falling", "only 7 held-out", "an interval"))
    assert changed(budget, ARGV) == {"epochs": (2.0, 4.0), "out": (None, "runs/compare-d-epochs4")}
    # 7 of 10 held-out examples are scored: 0.1 -> 0.45 of 100 records gives 31 (>= 30), --limit stays
    assert changed(held, ARGV) == {"heldout_fraction": (0.1, 0.45), "out": (None, "runs/compare-d-heldout0.45")}
    assert changed(seeds, ARGV) == {"seeds": ("0,1", "0,1,2,3,4")}  # the same --out: trained runs are reused
    assert seeds.count("--seeds") == 1 and "--epochs=2" in seeds  # the list flag's values replaced, the rest kept
    assert list(steps)[-1].startswith("on a GPU") and steps[list(steps)[-1]] is None


def test_max_steps_is_doubled_when_it_sets_the_budget_and_the_limit_grows_when_the_fraction_cannot():
    argv = ["imtune", "compare", "--data", "d.jsonl", "--preset", "cpu-quick", "--limit", "40", "--out", "cmp"]
    s = summary(argv, settings={"base_config": {"epochs": 2.0, "max_steps": 40, "seed": 42}, "seeds": [0]},
                data={"n_train": 36, "n_heldout": 4, "n_test": 3})
    steps = dict(next_commands(s, ["falling", "few"]))
    budget = next(c for w, c in steps.items() if "falling" in w)
    assert changed(budget, argv) == {"max_steps": (None, 80), "out": ("cmp", "cmp-max-steps80")}
    held = next(c for w, c in steps.items() if w.startswith("only 3"))
    # at most half the data is held out; --limit 40 grows until 30 examples are scored
    assert changed(held, argv) == {"heldout_fraction": (0.1, 0.5), "limit": (40, 80),
                                   "out": ("cmp", "cmp-heldout0.5")}
    assert 80 * 0.5 * 3 / 4 >= MIN_HELDOUT
    # the file itself is too small (the limit is not what stops it): said, and no --limit below the one given
    small = summary(argv, data={"n_train": 20, "n_heldout": 4, "n_test": 3})
    why, cmd = next((w, c) for w, c in next_commands(small, ["few"]) if w.startswith("only 3"))
    assert "24 records" in why and "limit" not in changed(cmd, argv)


def test_a_given_held_out_file_is_said_in_words_and_other_commands_get_none():
    s = summary(ARGV, data={"split": {"kind": "file", "heldout_source": "h.jsonl"}})
    (why, cmd), _ = next_commands(s, ["few"])
    assert "a larger --eval-data file" in why and cmd is None
    demo = summary(["imtune", "demo"])
    assert [c for _, c in next_commands(demo, ["tie", "falling"])] == [None, None, None]
    assert next_commands(summary(ARGV), []) == []


def test_an_undecided_compare_ends_with_the_commands_that_would_decide_it(tmp_path, capsys):
    rows = [{"messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(24)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "cmp"
    argv = ["compare", str(data), "--model", "random:tiny", "--arms", "it,im", "--max-steps", "2",
            "--eval-every", "1", "--eval-train-sample", "4", "--batch-size", "4", "--max-length", "128",
            "--heldout-fraction", "0.2", "--bleu-samples", "0", "--no-progress", "--threads", "1", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    v = json.loads((out / "compare.json").read_text())["verdict"]
    assert v["headline"].startswith(("Undecided", "No arm won")) and "few" in v["undecided"]
    assert printed.index("To decide") > printed.index(v["headline"].split(":")[0])
    original = ["imtune", *argv]
    assert json.loads((out / "compare.json").read_text())["commands"][-1]["argv"] == original
    commands = {s["why"].split(":")[0].split(" (")[0]: s["command"] for s in v["next"] if s["command"]}
    assert commands, v["next"]
    for why, cmd in commands.items():
        assert f"    {cmd}" in printed
        diff = changed(cmd, original)
        if why.startswith("only"):
            assert diff["heldout_fraction"][1] > 0.2 and set(diff) <= {"heldout_fraction", "limit", "out"}
        elif why.startswith("held-out loss still falling"):
            assert diff == {"max_steps": (2, 4), "out": (str(out), f"{out}-max-steps4")}
        else:
            assert diff == {"seeds": (None, "42,0,1,2,3")}  # the one --seed, then the smallest unused
    md = (out / "report.md").read_text()
    assert "### To decide" in md and next(iter(commands.values())) in md
