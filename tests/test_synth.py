"""imtune.synth and `imtune data synth`: deterministic for a seed (also across processes with other hash seeds),
seeds differ, the ratio knob moves the ratio measured by imtune.stats (words), examples stay short in tokens at the
default ratios, the held-out split asks what training never asks and its answers are in its instructions, exact-match
scoring, and the written files load back as `messages`."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from imtune.stats import dataset_stats
from imtune.synth import ATTRS, FAMILIES, WORDS, exact_match, exact_match_rate, normalize, synthesize
from imtune.templates import Renderer
from imtune.types import UsageError

FAMS = list(FAMILIES)


def texts(convs):
    return [(c.messages[0].content, c.messages[1].content) for c in convs]


def ratio(convs) -> float:
    return dataset_stats(convs, unit="words")["ratio"]


@pytest.mark.parametrize("fam", FAMS)
def test_deterministic_and_seeds_differ(fam):
    a = synthesize(fam, 30, seed=7, heldout=10)
    b = synthesize(fam, 30, seed=7, heldout=10)
    assert texts(a[0]) == texts(b[0]) and texts(a[1]) == texts(b[1])
    c = synthesize(fam, 30, seed=8, heldout=10)
    assert not set(texts(a[0])) & set(texts(c[0]))  # another seed, another world: nothing in common
    # The train split does not depend on how many held-out examples are asked for.
    assert texts(synthesize(fam, 30, seed=7, heldout=0)[0]) == texts(a[0])
    assert synthesize(fam, 30, seed=7)[1] == []


@pytest.mark.parametrize("fam", FAMS)
def test_distinct_and_varied(fam):
    train, held = synthesize(fam, 200, seed=0, heldout=50)
    assert len(train) == 200 and len(held) == 50
    both = texts(train) + texts(held)
    assert len(set(both)) == 250  # no duplicates within or across splits
    assert len({t.split(".")[0] for t, _ in both}) > 3  # instructions are not one sentence repeated
    for c in train + held:
        assert [m.role for m in c.messages] == ["user", "assistant"] and c.messages[1].content.strip()


@pytest.mark.parametrize("fam,lo,hi", [("rule", 20, 40), ("lookup", 20, 45), ("reverse", 0.15, 0.6)])
def test_ratio_knob_moves_the_measured_ratio(fam, lo, hi):
    r_lo, r_hi = ratio(synthesize(fam, 150, lo, seed=1)[0]), ratio(synthesize(fam, 150, hi, seed=1)[0])
    assert r_lo < r_hi
    assert r_lo == pytest.approx(lo, rel=0.15) and r_hi == pytest.approx(hi, rel=0.15)
    default = FAMILIES[fam].default_ratio
    assert ratio(synthesize(fam, 150, seed=1)[0]) == pytest.approx(default, rel=0.15)


def test_families_sit_where_the_paper_puts_them():
    """Long-instruction families land on IM's side of the recommendation, the contrast family on IT's."""
    for fam, mode in (("rule", "im"), ("lookup", "im"), ("reverse", "it")):
        s = dataset_stats(synthesize(fam, 100, seed=0)[0], unit="words")
        assert s["recommendation"]["mode"] == mode, (fam, s["ratio"])


@pytest.mark.parametrize("fam", FAMS)
@pytest.mark.parametrize("template", ["model", "tulu"])
def test_short_enough_for_cpu_training(tok, fam, template):
    train, held = synthesize(fam, 100, seed=0, heldout=30)
    s = dataset_stats(train + held, tok, Renderer(template, tok), unit="tokens")
    assert s["sequence_tokens"]["max"] <= 256


def rule_input(c) -> tuple[str, ...]:
    """The plain words asked about (the last line is the question; no question template uses a vocabulary word)."""
    return tuple(w for w in re.findall(r"[a-z]+", c.messages[0].content.rsplit("\n", 1)[-1]) if w in WORDS)


def lookup_key(c) -> tuple[str, str]:
    """(town, fact) asked about, read back from the question with the family's own templates."""
    q = c.messages[0].content.rsplit("Question: ", 1)[1]
    for attr, (_, _, questions, _) in ATTRS.items():
        for t in questions:
            m = re.fullmatch(re.escape(t).replace(re.escape("{t}"), r"(\w+)"), q)
            if m:
                return m.group(1), attr
    raise AssertionError(q)


def test_heldout_asks_what_training_never_asks():
    # rule: every held-out input has a word no training input has (reserved), yet training instructions teach it
    train, held = synthesize("rule", 200, seed=2, heldout=40)
    train_words = {w for c in train for w in rule_input(c)}
    assert all(rule_input(c) and set(rule_input(c)) - train_words for c in held)
    taught = " ".join(c.messages[0].content for c in train)
    for w in {w for c in held for w in rule_input(c)} - train_words:
        assert re.search(rf"\b{w}\b", taught)  # a reserved word appears in training instructions (entries, examples)

    # lookup: held-out (town, fact) pairs are never asked in training, but are notes in training instructions
    train, held = synthesize("lookup", 300, seed=2, heldout=60)
    train_keys = {lookup_key(c) for c in train}
    for c in held:
        town, _ = lookup_key(c)
        answer = c.messages[1].content
        assert lookup_key(c) not in train_keys
        assert answer in c.messages[0].content  # the answer is in its own instruction
        assert any(town in line and answer in line for t in train for line in t.messages[0].content.splitlines())

    # reverse (contrast): the knowledge is in training outputs: held-out sentences were output sentences in training
    train, held = synthesize("reverse", 300, seed=2, heldout=30)
    seen = {s for c in train for s in c.messages[1].content.split(". ")}
    held_sentences = [s for c in held for s in c.messages[1].content.split(". ")]
    assert sum(s in seen for s in held_sentences) / len(held_sentences) > 0.9
    requests = {c.messages[0].content for c in train}
    assert not any(c.messages[0].content in requests for c in held)


def test_recall_heldout_answers_are_only_in_training_instructions():
    """recall: a held-out instruction states no entry (nor worked example) of the words it asks, so its answer cannot
    be copied from it; every training instruction states them; the answer is the code read back from training."""
    train, held = synthesize("recall", 8, seed=5, heldout=12)
    train_inputs = {w for c in train for w in rule_input(c)}
    code = {}  # word -> code word, read back from the training instructions' entries
    for c in train:
        text = c.messages[0].content
        for pattern in (r"'(\w+)' is written as '(\w+)'", r"The code word for (\w+) is (\w+)",
                        r"Whenever you see (\w+), write (\w+)", r"In this code, (\w+) becomes (\w+)",
                        r"(\w+) is encoded as (\w+)"):
            code.update(re.findall(pattern, text))
    for c in held:
        asked = rule_input(c)
        instruction, answer = c.messages[0].content, c.messages[1].content
        assert asked and not set(asked) & train_inputs  # never asked in training
        assert answer == " ".join(code[w] for w in asked)  # checkable from what training instructions state
        assert not any(cw in instruction for cw in answer.split())  # not copyable: no entry, no worked example
        for t in train:
            assert all(cw in t.messages[0].content for cw in answer.split())  # every training instruction has it


def test_rule_answers_are_in_the_instruction():
    for c in synthesize("rule", 50, seed=3, heldout=20)[1]:
        instruction, answer = c.messages[0].content, c.messages[1].content
        assert all(code in instruction for code in answer.split())


def test_exact_match():
    assert exact_match("Figir Tule.", "figir tule")
    assert exact_match("  figir\n tule ", "figir tule.")
    assert exact_match("PURPLE", "purple")
    assert not exact_match("figir", "figir tule")
    assert not exact_match("figir tule rolin", "figir tule")
    assert normalize("A  b. ") == "a b"
    held = synthesize("lookup", 10, seed=0, heldout=4)[1]
    refs = [c.messages[1].content for c in held]
    assert exact_match_rate([r.upper() + "." for r in refs], held) == 1.0
    assert exact_match_rate(["nope"] * 3 + refs[3:], held) == 0.25
    with pytest.raises(ValueError):
        exact_match_rate(refs[:2], held)


def test_errors():
    with pytest.raises(UsageError, match="rule, lookup, reverse"):
        synthesize("cipher", 3)
    with pytest.raises(UsageError):
        synthesize("rule", 0)
    with pytest.raises(UsageError):
        synthesize("rule", 3, ratio=0)


# ----------------------------------------------------------------------------------------------------------------
# The command

def test_cli_writes_messages_that_load_back(tmp_path, capsys):
    from imtune.cli import main
    from imtune.load import load_conversations

    out = tmp_path / "d" / "rule.jsonl"
    assert main(["data", "synth", "--family", "rule", "--n", "20", "--heldout", "5", "--seed", "4",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    held_path = tmp_path / "d" / "rule.heldout.jsonl"
    assert str(out) in printed and str(held_path) in printed and "ratio (words)" in printed
    train, held = synthesize("rule", 20, seed=4, heldout=5)
    for path, expect in ((out, train), (held_path, held)):
        res = load_conversations(str(path))
        assert res.format == "messages" and not res.skipped
        assert [c.messages for c in res.conversations] == [c.messages for c in expect]

    assert main(["data", "synth", "--family", "nope", "--n", "2", "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "valid: rule, lookup, reverse" in capsys.readouterr().err


def test_cli_same_bytes_across_processes(tmp_path):
    """Python's hash randomisation must not reach the data: two processes with different hash seeds agree."""
    outs = []
    for hash_seed in ("1", "2"):
        out = tmp_path / f"h{hash_seed}" / "lookup"  # not .jsonl: held-out goes to lookup.heldout.jsonl
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        subprocess.run([sys.executable, "-m", "imtune.cli", "data", "synth", "--family", "lookup", "--n", "15",
                        "--heldout", "5", "--seed", "9", "--out", str(out)], env=env, check=True, capture_output=True)
        outs.append((out.read_bytes(), (out.parent / "lookup.heldout.jsonl").read_bytes()))
    assert outs[0] == outs[1]
