"""imtune.data.synth and `imtune data synth`: deterministic for a seed (also across processes with other hash seeds),
seeds differ, the ratio knob moves the ratio measured by imtune.analysis.stats (words), examples stay short in tokens
at the default ratios, the fair families are fair (an oracle answers every example from its own instruction; no held-out
answer occurs in training), `recall` is the labelled exception, exact-match scoring, and the written files load back
as `messages`."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from imtune.analysis.stats import dataset_stats
from imtune.data.synth import (
    ATTRS,
    COLOURS,
    FAMILIES,
    GOODS,
    REVERSE_ASKS,
    RULE_ENTRIES,
    RULE_QUESTIONS,
    WORDS,
    synthesize,
)
from imtune.data.templates import Renderer
from imtune.evaluate.exact import exact_match, exact_match_rate, normalize
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
    assert s["sequence_tokens"]["max"] <= (512 if fam == "reverse" else 256)  # reverse: eight long passages


def rule_input(c) -> tuple[str, ...]:
    """The plain words asked about (the last line is the question; no question template uses a vocabulary word)."""
    return tuple(w for w in re.findall(r"[a-z]+", c.messages[0].content.rsplit("\n", 1)[-1]) if w in WORDS)


def _pattern(template: str, **groups: str) -> re.Pattern:
    """A family's sentence template as a regex whose {fields} are capture groups."""
    rx = re.escape(template)
    for name, g in groups.items():
        rx = rx.replace(re.escape("{" + name + "}"), f"(?P<{name}>{g})")
    return re.compile(rx)


def oracle(fam: str, instruction: str) -> str:
    """The answer, read from the instruction alone with the family's own templates: what makes a family fair is that
    this works for every held-out example (nothing it needs lives in other records)."""
    if fam == "rule":
        code = {}
        for t in RULE_ENTRIES:
            code.update((m["w"], m["c"]) for m in _pattern(t, w="[a-z]+", c="[a-z]+").finditer(instruction))
        question = instruction.rsplit("\n", 1)[-1]
        for t in RULE_QUESTIONS:
            m = _pattern(t, x="[a-z ]+").fullmatch(question)
            if m:
                return " ".join(code[w] for w in m["x"].split())
    if fam == "lookup":
        notes, question = instruction.rsplit("Question: ", 1)
        for _, note_ts, question_ts, _ in ATTRS.values():
            for qt in question_ts:
                m = _pattern(qt, t="[A-Z][a-z]+").fullmatch(question)
                if m:
                    for nt in note_ts:
                        hit = _pattern(nt, t=m["t"], v="[A-Z][a-z]+(?: [A-Z][a-z]+)?").search(notes)
                        if hit:
                            return hit["v"]
    if fam == "reverse":
        request, notes = instruction.split("\n\n", 1)
        for ask in REVERSE_ASKS:
            m = _pattern(ask, t="[A-Z][a-z]+", a="[a-z ,]+?").match(request)
            if m:
                nouns = {ATTRS[a][0]: a for a in ATTRS}
                asked = [nouns[x] for x in re.split(r", | and ", m["a"])]
                line = next(x for x in notes.splitlines() if x.startswith(m["t"] + ": "))
                facts = dict(item.split(" ", 1) for item in line[len(m["t"]) + 2:].rstrip(".").split("; "))
                return " ".join(ATTRS[a][3].format(t=m["t"], v=facts[ATTRS[a][0]]) for a in asked)
    raise AssertionError(f"{fam}: the oracle cannot read {instruction!r}")


@pytest.mark.parametrize("fam", [f for f in FAMS if FAMILIES[f].fair])
@pytest.mark.parametrize("ratio", [None, "low", "high"])
def test_fair_heldout_answers_come_from_their_own_instruction_only(fam, ratio):
    """Fairness, the property issue 24 asks for: an oracle answers every example (held-out and training) from its own
    instruction alone, and no held-out answer, nor any invented name it states, occurs in any training record."""
    r = {None: None, "low": {"rule": 12, "lookup": 8, "reverse": 0.15}[fam],
         "high": {"rule": 40, "lookup": 45, "reverse": 3}[fam]}[ratio]
    train, held = synthesize(fam, 150, r, seed=2, heldout=60)
    for c in train + held:
        assert oracle(fam, c.messages[0].content) == c.messages[1].content
    corpus = "\n".join(m.content for c in train for m in c.messages)
    for c in held:
        answer = c.messages[1].content
        assert not re.search(rf"\b{re.escape(answer)}\b", corpus), answer
        invented = {w for w in re.findall(r"[A-Za-z]+", answer) if w.lower() not in ENGLISH}
        assert invented, answer  # every answer states at least one invented name
        for w in invented:
            assert not re.search(rf"\b{w}\b", corpus, re.IGNORECASE), (w, answer)


ENGLISH = set(" ".join(t for _, ts, qs, passage in ATTRS.values() for t in [*ts, *qs, passage]).lower()
              .replace("{t}", " ").replace("{v}", " ").replace(".", " ").replace(",", " ").split())
ENGLISH |= {*WORDS, *GOODS, *COLOURS}


def test_recall_is_labelled_an_illustration():
    assert not FAMILIES["recall"].fair and "ILLUSTRATION" in FAMILIES["recall"].about
    assert all(FAMILIES[f].fair for f in ("rule", "lookup", "reverse"))


def test_reverse_spans_the_papers_thresholds():
    """One family crosses both thresholds of the advice (0.15 and 0.5 in words) for `study --factor ratio`."""
    lo, hi = ratio(synthesize("reverse", 80, 0.1, seed=0)[0]), ratio(synthesize("reverse", 80, 3, seed=0)[0])
    assert lo < 0.15 and hi > 2.5


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
    from imtune.data.load import load_conversations

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
