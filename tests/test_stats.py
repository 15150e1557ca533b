"""imtune.analysis.stats and `imtune data stats`: statistics on hand-made data whose answers are worked out here by
hand, the paper's Table 5 rows on the real LIMA and AlpaGasus-Dolly files (words mode), token counts that agree with one
tokenisation under every template, the recommendation rule at its thresholds, and the CLI (table, JSON, plots)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import shared_file
from imtune.analysis.advice import RULE, recommend
from imtune.analysis.stats import dataset_stats, format_one, measure, summarize, supervised_share
from imtune.data.load import load_conversations
from imtune.data.templates import Renderer
from imtune.types import CLASS_ID, CLASSES, Conversation, DataError, Message, UsageError, Where

TEMPLATES = ["tulu", "chatml", "alpaca", "model"]


def conv(*pairs, i: int = 0) -> Conversation:
    return Conversation(tuple(Message(r, c) for r, c in pairs), Where("t.jsonl", i + 1, i))


# Four conversations. Words are counted on "<|role|>\n" + content, so each message adds its tag as one word.
#   instruction (system + user words):  [3, 2, 2, 9]   -> e.g. #0: user "a b" = 1 + 2
#   output (assistant words):           [2, 3, 3, 6]
HAND = [
    conv(("user", "a b"), ("assistant", "x")),
    conv(("user", "c"), ("assistant", "y z")),
    conv(("user", "d"), ("assistant", "y\nz")),  # a newline separates words too
    conv(("system", "be brief"), ("user", "e f"), ("assistant", "p q"), ("user", "g h"), ("assistant", "r s"), i=3),
]


def test_summarize_by_hand():
    s = summarize([1, 2, 2, 5])
    # mean 10/4; population variance ((1.5)^2 + 0.5^2 + 0.5^2 + 2.5^2) / 4 = 9/4; p90 at rank 0.9 * 3 = 2.7:
    # 2 + 0.7 * (5 - 2) = 4.1
    assert s == pytest.approx({"mean": 2.5, "std": 1.5, "median": 2.0, "mode": 2, "p90": 4.1, "max": 5})
    assert isinstance(s["mode"], int) and isinstance(s["max"], int)
    assert summarize([3, 1, 3, 1])["mode"] == 1  # ties: the smallest of the most common values
    assert summarize([7])["std"] == 0.0


def test_words_mode_by_hand():
    s = dataset_stats(HAND, unit="words")
    assert s["n_examples"] == 4 and s["unit"] == "words"
    assert s["n_turns"] == 5 and s["multi_turn_share"] == 0.25
    assert s["roles"] == {"system": 1, "user": 5, "assistant": 5}
    # instruction [3, 2, 2, 9]: #3 = system (1 + 2) + user (1 + 2) + user (1 + 2)
    ins = np.array([3, 2, 2, 9])
    assert s["instruction"] == pytest.approx({"mean": 4.0, "std": math.sqrt((1 + 4 + 4 + 25) / 4), "median": 2.5,
                                              "mode": 2, "p90": 3 + 0.7 * 6, "max": 9})
    assert s["instruction"]["std"] == pytest.approx(ins.std())
    # output [2, 3, 3, 6]: #3 = (1 + 2) + (1 + 2)
    assert s["output"] == pytest.approx({"mean": 3.5, "std": 1.5, "median": 3.0, "mode": 3, "p90": 5.1, "max": 6})
    assert s["ratio"] == pytest.approx(4.0 / 3.5) and s["inverse_ratio"] == pytest.approx(3.5 / 4.0)
    assert s["ratio_words"] == pytest.approx(s["ratio"])
    # Without a tokenizer the shares are in words, role tags as template: 11 tags, content words: system 2,
    # user 2+1+1+2+2 = 8, assistant 1+2+2+2+2 = 9; total 30.
    assert s["share_unit"] == "words"
    assert s["supervised_share"] == pytest.approx({"it": 9 / 30, "im": 19 / 30, "all": 1.0})
    assert s["im_over_it"] == pytest.approx(19 / 9)
    assert s["sequence_tokens"] is None and s["max_length"] is None


def test_supervised_share_by_hand():
    counts = np.zeros((2, len(CLASSES)), dtype=int)
    counts[0, [CLASS_ID["template"], CLASS_ID["user"], CLASS_ID["assistant"], CLASS_ID["eot"]]] = [4, 3, 2, 1]
    counts[1, [CLASS_ID["template"], CLASS_ID["system"], CLASS_ID["assistant"], CLASS_ID["eot"]]] = [2, 5, 2, 1]
    assert supervised_share(counts) == pytest.approx({"it": 6 / 20, "im": 14 / 20, "all": 1.0})


def test_errors():
    with pytest.raises(UsageError, match="tokenizer"):
        dataset_stats(HAND)  # tokens without a tokenizer
    with pytest.raises(UsageError, match="unit"):
        dataset_stats(HAND, unit="chars")
    with pytest.raises(UsageError, match="max_length"):
        dataset_stats(HAND, unit="words", max_length=10)
    with pytest.raises(DataError, match="no conversations"):
        dataset_stats([], unit="words")


@pytest.mark.parametrize("template", TEMPLATES)
def test_tokens_mode_is_one_tokenisation(tok, template):
    """Counts are the classes of one tokenisation of the rendered text: the sequence lengths are its lengths, the
    class counts cover every predicted position, and (chatml keeps content tokens apart: '\\n' before, a special
    token after) the user/assistant counts equal tokenizing each content alone."""
    r = Renderer(template, tok)
    s = dataset_stats(HAND, tok, r, unit="tokens", max_length=12)
    lengths = measure(HAND, tok, r, "tokens")
    rendered = [r.render(c) for c in HAND]
    n_tokens = [len(tok(x.text, add_special_tokens=False).input_ids) for x in rendered]
    assert lengths.sequence.tolist() == n_tokens
    assert (lengths.instruction + lengths.output <= lengths.sequence).all()
    assert lengths.class_counts.sum() == sum(n - 1 for n in n_tokens)  # predicted positions only
    assert s["sequence_tokens"]["max"] == max(n_tokens)
    assert s["template"] == template
    over = [n for n in n_tokens if n > 12]
    assert s["max_length"] == {"limit": 12, "over": len(over), "over_share": len(over) / 4,
                               "tokens_beyond": sum(n - 12 for n in over)}
    sh = s["supervised_share"]
    assert sh["all"] == 1.0 and 0 < sh["it"] < sh["im"] < 1.0
    assert s["ratio_words"] == pytest.approx(4.0 / 3.5)  # the rule's unit does not move with the tokenizer
    if template == "chatml":
        n = lambda text: len(tok(text, add_special_tokens=False).input_ids)  # noqa: E731
        expect_out = [sum(n(m.content) for m in c.messages if m.role == "assistant") for c in HAND]
        expect_ins = [sum(n(m.content) for m in c.messages if m.role != "assistant") for c in HAND]
        assert lengths.output.tolist() == expect_out
        assert lengths.instruction.tolist() == expect_ins


def test_words_mode_with_tokenizer_gives_token_shares(tok):
    s = dataset_stats(HAND, tok, unit="words")
    assert s["unit"] == "words" and s["share_unit"] == "tokens"
    assert s["template"] == "model"  # no renderer given: the tokenizer's own chat template, as everywhere
    assert s["instruction"]["mean"] == 4.0 and s["output"]["mean"] == 3.5  # lengths stay in words


def stats_for(ratio, n):
    return {"ratio_words": ratio, "ratio": ratio, "n_examples": n, "unit": "words",
            "supervised_share": {"it": 0.5, "im": 0.8, "all": 1.0}, "share_unit": "tokens"}


@pytest.mark.parametrize("ratio,n,mode,weight", [
    (0.6439, 2996, "im", None),  # AlpaGasus-Dolly
    (0.0942, 1030, "it", None),  # LIMA
    (RULE["high_ratio"], 10**6, "im", None),  # the threshold itself belongs to im
    (RULE["low_ratio"] - 1e-9, 10, "it", None),
    (RULE["low_ratio"], RULE["small_n"], "im", None),  # intermediate ratio, few examples
    (0.3, RULE["small_n"] + 1, "weighted", RULE["prompt_weight"]),  # intermediate ratio, many examples
])
def test_recommend_rule(ratio, n, mode, weight):
    rec = recommend(stats_for(ratio, n))
    assert (rec["mode"], rec["prompt_weight"]) == (mode, weight)
    assert any(f"{ratio:.3g}" in r for r in rec["reasons"])  # the reasons carry the numbers they rest on
    assert "advice" in rec["note"]


def test_recommend_reads_words_ratio_over_tokens():
    s = stats_for(0.65, 2000)
    s.update(ratio=0.42, unit="tokens")  # Code Alpaca: 0.65 in words, 0.42 in tokens
    assert recommend(s)["mode"] == "im"


def load_messages(path):
    return [Conversation(tuple(Message(m["role"], m["content"]) for m in json.loads(line)["messages"]),
                         Where(str(path), i + 1, i))
            for i, line in enumerate(open(path, encoding="utf-8"))]


@pytest.mark.parametrize("name,n,out,out_std,ins,ins_std,ratio,mode", [
    ("lima.jsonl", 1030, 442.75, 491.34, 41.72, 79.28, 0.0942, "it"),
    ("alpagasus_dolly_3k.jsonl", 2996, 68.08, 106.38, 43.83, 107.53, 0.6439, "im"),
])
def test_paper_table5(name, n, out, out_std, ins, ins_std, ratio, mode):
    """The IM paper's Table 5 rows, to two decimals, in words mode."""
    convs = load_messages(shared_file(f"train/{name}"))
    s = dataset_stats(convs, unit="words")
    assert s["n_examples"] == n
    assert (round(s["output"]["mean"], 2), round(s["output"]["std"], 2)) == (out, out_std)
    assert (round(s["instruction"]["mean"], 2), round(s["instruction"]["std"], 2)) == (ins, ins_std)
    assert round(s["ratio"], 4) == ratio
    assert s["recommendation"]["mode"] == mode


# ----------------------------------------------------------------------------------------------------------------
# The command

def write_jsonl(path, convs):
    with open(path, "w", encoding="utf-8") as f:
        for c in convs:
            f.write(json.dumps({"messages": [{"role": m.role, "content": m.content} for m in c.messages]}) + "\n")
    return str(path)


@pytest.fixture
def cli(capsys):
    pytest.importorskip("imtune.data.load", reason="imtune.data.load (the data loader) has not landed yet")
    from imtune.cli import main

    def call(*argv):
        rc = main(["data", "stats", *argv])
        return rc, capsys.readouterr()

    return call


def test_cli_json_one_file_is_the_object(cli, tmp_path):
    f = write_jsonl(tmp_path / "hand.jsonl", HAND)
    rc, io = cli(f, "--unit", "words", "--json", "--template", "tulu")
    assert rc == 0
    s = json.loads(io.out)
    assert isinstance(s, dict) and s["path"] == f
    for key in ("n_examples", "unit", "instruction", "output", "ratio", "supervised_share", "recommendation"):
        assert key in s
    assert s["instruction"]["mean"] == 4.0 and s["output"]["mode"] == 3
    assert set(s["recommendation"]) >= {"mode", "prompt_weight", "reasons"}
    assert s.pop("format") == "messages" and not any(f["count"] for f in s.pop("findings").values())
    read = {k: s.pop(k) for k in ("data_format", "system_prompt")}  # how the file was read (the command adds it)
    assert read["data_format"]["format"] == "messages" and read["system_prompt"]["mode"] == "default"
    assert s == {**dataset_stats(HAND, _tok(), Renderer("tulu", _tok()), unit="words"), "path": f, "skipped": 0}


def _tok():
    from imtune.model.models import load_tokenizer

    return load_tokenizer("default")


def test_cli_several_files_table_json_and_plots(cli, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", HAND)
    b = write_jsonl(tmp_path / "b.jsonl", HAND[:2])
    rc, io = cli(a, b, "--max-length", "8")
    assert rc == 0
    header, rule, row_a, row_b = io.out.splitlines()[:4]
    assert "ratio" in header and "advice" in header
    assert row_a.startswith("a.jsonl") and row_b.startswith("b.jsonl")
    assert "recommendation (advice" in io.out and "--max-length 8" in io.out

    rc, io = cli(a, b, "--json", "--plot", str(tmp_path / "plots"))
    rows = json.loads(io.out)
    assert [r["path"] for r in rows] == [a, b] and [r["n_examples"] for r in rows] == [4, 2]
    for name in ("a", "b"):
        for kind in ("lengths", "scatter"):
            png = tmp_path / "plots" / f"{name}.{kind}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_bad_max_length(cli, tmp_path):
    rc, io = cli(write_jsonl(tmp_path / "a.jsonl", HAND), "--max-length", "0")
    assert rc == 2 and "--max-length" in io.err


# -- data as it is: quality problems are findings (issue 14 item 8) ---------------------------------------------
def test_code_alpaca_empty_outputs_are_findings_and_every_record_counts(tmp_path):
    from conftest import shared_file
    from imtune.analysis.stats import analyse

    path = str(shared_file("train/code_alpaca_2k.json"))
    stats, lengths, skipped = analyse(path, None, None, unit="words")
    assert stats["n_examples"] == 2017 and not skipped  # the two empty outputs are in the statistics
    f = stats["findings"]["empty_output"]
    assert f["count"] == 2 and f["first"] == [f"{path}:1187", f"{path}:9297"]
    assert sorted(lengths.output.tolist())[:2] == [1, 1]  # "<|assistant|>\n" + "": the tag's word, 0 of content
    with pytest.raises(DataError, match=r"code_alpaca_2k\.json:1187: output: empty text"):
        load_conversations(path)  # what train reads: empty outputs are still refused by default


def test_duplicates_near_duplicates_and_control_tokens_are_counted(tmp_path):
    from imtune.analysis.findings import NEAR_CHARS
    from imtune.analysis.stats import analyse

    context = "The shared document. " * (NEAR_CHARS // 10)
    rows = [{"instruction": "Add 1 and 1.", "output": "2"},                     # line 1
            {"instruction": context + "Question one?", "output": "a"},         # line 2
            {"instruction": "Add 1 and 1.", "output": "2"},                     # line 3: duplicate of 1
            {"instruction": context.upper() + "Question two?", "output": "b"},  # line 4: near duplicate of 2
            {"instruction": "stop <|im_end|> here", "output": "   "},           # line 5: control token, empty output
            {"instruction": context + "Question one?", "output": "a"}]          # line 6: duplicate of 2 (not near)
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    stats, _, _ = analyse(str(path), _tok(), Renderer("tulu", _tok()))
    f = stats["findings"]
    assert stats["n_examples"] == 6
    assert (f["duplicate"]["count"], f["duplicate"]["first"]) == (2, [f"{path}:3 (like line 1)",
                                                                     f"{path}:6 (like line 2)"])
    assert (f["near_duplicate"]["count"], f["near_duplicate"]["first"]) == (1, [f"{path}:4 (like line 2)"])
    assert f["control_tokens"]["count"] == 1 and f["control_tokens"]["first"][0].startswith(f"{path}:5:")
    assert f["empty_output"]["first"] == [f"{path}:5"] and f["empty_instruction"]["count"] == 0
    assert "finding: 2 records that repeat an earlier record exactly" in format_one(stats, "d")


def test_streamed_stats_say_how_the_file_was_read_and_what_the_system_prompt_costs(tmp_path):
    from imtune.analysis.stats import analyse

    turns = [{"from": "person", "value": "hi there"}, {"from": "bot", "value": "yo"}]
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"conversations": turns}) + "\n"
                    + json.dumps({"conversations": [{"from": "system", "value": "Be brief."}, *turns]}) + "\n")
    tok = _tok()
    stats, lengths, _ = analyse(str(path), tok, Renderer(None, tok), roles={"person": "user", "bot": "assistant"})
    assert stats["data_format"]["format"] == "sharegpt" and stats["data_format"]["detected"]
    assert "person → user, bot → assistant" in stats["data_format"]["mapping"]
    note = stats["system_prompt"]  # the record with its own system message gets no default
    assert note["mode"] == "default" and note["examples"] == 1 and "to 1 of 2 examples" in note["line"]
    assert note["share"] == note["tokens_each"] / int(lengths.sequence.sum())


def _ev(ratio: float, final: tuple, best: tuple = (-0.01, -0.05, 0.03), data: str = "x.jsonl"):
    from imtune.analysis.advice import Evidence

    return Evidence(source="s", command="imtune compare --data x.jsonl", data=data, ratio_words=ratio, n=8, seeds=3,
                    final=final, best=best, it_final=1.0, it_best=1.0)


def test_the_advice_cites_only_measurements_in_the_datas_ratio_band_and_says_whether_they_agree(monkeypatch):
    from imtune.analysis import advice

    base = {"n_examples": 8, "ratio": 30.0, "unit": "tokens"}
    monkeypatch.setattr(advice, "EVIDENCE", (_ev(25.0, (-0.3, -0.5, -0.1), data="synth:lookup"),
                                             _ev(0.1, (0.2, 0.1, 0.3), data="lima.jsonl")))
    near = recommend({**base, "ratio_words": 0.9})  # same band as 25 (long instructions)
    assert near["mode"] == "im"
    said = near["reasons"][-1]
    assert "synth:lookup" in said and "lima" not in said  # never data of another band
    assert "final -0.300" in said and "agrees with this advice" in said and "decides nothing" in said  # best ties
    mid = recommend({**base, "ratio_words": 0.3})  # nothing measured in the intermediate band
    assert "no imtune measurement in this ratio band, intermediate" in mid["reasons"][-1]
    low = recommend({**base, "ratio_words": 0.05})
    assert low["mode"] == "it" and "lima.jsonl" in low["reasons"][-1]
    assert "disagrees with this advice (it favours it)" not in low["reasons"][-1]  # it favours it: agrees
    assert "agrees with this advice" in low["reasons"][-1]
    monkeypatch.setattr(advice, "EVIDENCE", (_ev(25.0, (0.5, 0.2, 0.8)),))
    assert "disagrees with this advice (it favours it)" in recommend({**base, "ratio_words": 25.0})["reasons"][-1]


def test_every_evidence_entry_is_fair_and_names_a_command_that_parses():
    """stats.EVIDENCE: typed fields, intervals around their values, never the `recall` illustration, and a command
    the real CLI parser accepts (the flags exist; nothing is run)."""
    import shlex

    from imtune.analysis.advice import EVIDENCE
    from imtune.cli import COMMANDS, build_parser

    assert EVIDENCE, "no measurement recorded"
    for e in EVIDENCE:
        assert "recall" not in e.command and "recall" not in e.data and "recall" not in e.source
        assert e.n >= 1 and e.seeds >= 2 and e.ratio_words > 0 and e.it_final > 0 and e.it_best > 0
        for value, low, high in (e.final, e.best):
            assert low <= value <= high
        argv = shlex.split(e.command)
        assert argv[0] == "imtune"
        words = next(w for w in COMMANDS if argv[1:1 + len(w.split())] == w.split())
        build_parser(words).parse_args(argv[1 + len(words.split()):])  # SystemExit on an unknown flag


def test_cli_ends_with_the_compare_that_tests_its_advice(cli, tmp_path):
    import shlex

    from imtune.cli import build_parser
    from imtune.commands.compare import settings_from

    f = write_jsonl(tmp_path / "hand data.jsonl", HAND)  # a space: the command must quote the path
    rc, io = cli(f, "--template", "tulu")
    assert rc == 0
    line = next(x for x in io.out.splitlines() if x.strip().startswith("imtune compare "))
    argv = shlex.split(line)
    s = settings_from(build_parser("compare").parse_args(argv[2:]))  # the command parses and means what it says
    assert s.base.data == f and [a.spec for a in s.arms] == ["it", "im"] and s.seeds == [0, 1, 2]
    assert s.base.template == "tulu"
