"""The judge: the AlpacaEval 1.0 prompt, reply parsing and win-rate arithmetic on hand-made replies, and end to end
against a real `imtune serve random:tiny` process (its replies are gibberish, so they are unparseable and counted:
the plumbing is what is tested — both orders requested, counts, the cache making a re-run free; one pair's replies
are put in the cache by hand, so one pair is scored through the whole path)."""
from __future__ import annotations

import json
import math

import pytest

from helpers import get
from imtune.cli import main
from imtune.evaluate.judge import (
    JudgeCache,
    JudgeClient,
    JudgeError,
    cache_key,
    chat_url,
    head2head,
    judge_messages,
    pair_preference,
    pair_up,
    parse_ranking,
    read_outputs,
)
from imtune.types import DataError

JUDGE = "judge-tiny"


def test_prompt_is_alpaca_eval_gpt4_verbatim():
    system, user = judge_messages("Name a colour.", "Red.", "Blue, of course.")
    assert system == {"role": "system",
                      "content": "You are a helpful assistant, that ranks models by the quality of their answers."}
    assert user["role"] == "user" and user["content"].startswith("I want you to create a leaderboard")
    assert '"instruction": """Name a colour.""",' in user["content"]
    assert user["content"].index('"answer": """Red."""') < user["content"].index('"answer": """Blue, of course."""')
    assert user["content"].endswith("Please provide the ranking that the majority of humans would give.")
    # Braces in the texts are left alone (placeholders are replaced, not str.format-ted).
    assert '"""f(x) = {x: 1}"""' in judge_messages("q", "f(x) = {x: 1}", "b")[1]["content"]


@pytest.mark.parametrize("reply, expected", [
    ("[{'model': 'model_1', 'rank': 1}, {'model': 'model_2', 'rank': 2}]", 1),
    ("[{'model': 'model_1', 'rank': 2}, {'model': 'model_2', 'rank': 1}]", 2),
    ("[\n    {'model': 'model_2', 'rank': 1},\n    {'model': 'model_1', 'rank': 2}\n]", 2),
    ('[{"model": "model_1", "rank": 1}, {"model": "model_2", "rank": 2}]', 1),
    ("[{'model': 'model_1', 'rank': 3}, {'model': 'model_2', 'rank': 1}]", None),  # ranking_parser: nan
    ("[{'model': 'model_2', 'rank': 1}]", None), ("Output (a)", None), ("model_1", None), ("", None), (None, None),
    ("[{'model': 'model_1', 'rank': True}]", None), ("__import__('os').system('true')", None),
])
def test_parse_ranking_follows_ranking_parser(reply, expected):
    assert parse_ranking(reply) == expected


def test_pair_preference_needs_both_orders():
    # reference_first: the reference was model_1 (2 = model better); model_first: the model was model_1 (1 = better).
    assert pair_preference(2, 1) == 2 and pair_preference(1, 2) == 1
    assert pair_preference(2, 2) == 1.5 and pair_preference(1, 1) == 1.5  # the orders disagree: a tie
    assert pair_preference(None, 1) == 2 and pair_preference(1, None) == 1  # the one parseable reply
    assert pair_preference(None, None) is None


def test_head2head_arithmetic():
    r = head2head([2, 2, 1.5, 1, None])
    assert (r["n"], r["wins"], r["losses"], r["ties"], r["unparseable_pairs"]) == (4, 2, 1, 1, 1)
    assert r["win_rate"] == pytest.approx((2 + 0.5) / 4)
    scores = [1, 1, 0.5, 0]
    var = sum((s - 0.625) ** 2 for s in scores) / 3
    assert r["standard_error"] == pytest.approx(math.sqrt(var / 4))
    assert head2head([1.5] * 3)["win_rate"] == 0.5 and head2head([1.5] * 3)["standard_error"] == 0
    assert head2head([None])["win_rate"] is None and head2head([])["n"] == 0


def test_chat_url_accepts_base_or_full_urls():
    full = "http://127.0.0.1:8000/v1/chat/completions"
    for base in ["http://127.0.0.1:8000", "http://127.0.0.1:8000/", "http://127.0.0.1:8000/v1", full]:
        assert chat_url(base) == full
    with pytest.raises(Exception, match="http"):
        chat_url("127.0.0.1:8000")


def test_read_outputs_and_pair_up(tmp_path):
    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps([{"instruction": f"q{i}", "output": f"ref {i}", "generator": "r"} for i in range(4)]))
    outs = tmp_path / "outs.jsonl"
    outs.write_text("\n".join(json.dumps(r) for r in [
        {"instruction": "q2 ", "output": "mine 2"},
        {"prompt": [{"role": "user", "content": "q0"}], "output": "mine 0"},
        {"prompt": "q9", "output": "no reference"}]) + "\n")
    pairs, unmatched = pair_up(read_outputs(outs), read_outputs(refs))
    assert [(p["instruction"], p["output"], p["reference"]) for p in pairs] == [("q0", "mine 0", "ref 0"),
                                                                                ("q2", "mine 2", "ref 2")]
    assert unmatched == 1
    assert len(pair_up(read_outputs(outs), read_outputs(refs), limit=1)[0]) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "output": "y"}\n{"instruction": "x"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: output"):
        read_outputs(bad)


def test_cache_roundtrip(tmp_path):
    msgs = judge_messages("q", "A", "B")
    k = cache_key("judge", msgs)
    assert k != cache_key("other-judge", msgs) and k != cache_key("judge", judge_messages("q", "B", "A"))
    c = JudgeCache(tmp_path / "c.sqlite")
    assert c.get(k) is None
    c.put(k, "judge", "Output (a)")
    c.close()
    assert JudgeCache(tmp_path / "c.sqlite").get(k) == "Output (a)"


def test_unreachable_judge_is_a_clear_error():
    client = JudgeClient("http://127.0.0.1:9/v1/chat/completions", "m", retries=0, timeout=5)
    with pytest.raises(JudgeError, match="cannot reach the judge"):
        client.ask(judge_messages("q", "a", "b"))


def _requests(url: str) -> int:
    return get(url.removesuffix("/v1") + "/health")["requests"]["chat_completions"]


def test_judge_end_to_end_against_imtune_serve(tmp_path, capsys, judge_server):
    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps([{"dataset": "t", "instruction": q, "output": a, "generator": "ref"} for q, a in [
        ("Name a primary colour.", "Red."), ("What is 2 + 2?", "4"), ("Say hi in French.", "Bonjour"),
        ("Unused reference?", "yes")]]))
    outs = tmp_path / "model.jsonl"
    outs.write_text("\n".join(json.dumps({"instruction": q, "output": a}) for q, a in [
        ("Name a primary colour.", "Blue is one."), ("What is 2 + 2?", "Four."), ("Say hi in French.", "Salut"),
        ("Not in the references", "x")]) + "\n")
    out_dir, cache = tmp_path / "eval", tmp_path / "cache.sqlite"
    seeded = JudgeCache(cache)  # the first pair's two replies, as a good judge would give them: the model wins
    model_2_first = "[{'model': 'model_1', 'rank': 2}, {'model': 'model_2', 'rank': 1}]"
    model_1_first = "[{'model': 'model_1', 'rank': 1}, {'model': 'model_2', 'rank': 2}]"
    for first, second, reply in [("Red.", "Blue is one.", model_2_first), ("Blue is one.", "Red.", model_1_first)]:
        seeded.put(cache_key(JUDGE, judge_messages("Name a primary colour.", first, second)), JUDGE, reply)
    seeded.close()
    url = judge_server[1]
    before = _requests(url)
    args = ["judge", "--outputs", str(outs), "--references", str(refs), "--judge-model", JUDGE,
            "--cache", str(cache), "--out", str(out_dir), "--max-tokens", "4"]
    assert main([*args, "--judge-url", url.removesuffix("/v1")]) == 0
    s = json.loads((out_dir / "judge-model.json").read_text())
    assert (s["judgements"], s["unique_prompts"], s["unmatched_outputs"]) == (6, 6, 1)
    assert s["requests"] == 4 and s["cache_hits"] == 2
    assert _requests(url) - before == 4  # both orders of the two pairs not in the cache reached the server
    assert s["n"] + s["unparseable_pairs"] == 3 and s["wins"] >= 1  # the seeded pair is a win
    assert s["wins"] + s["losses"] + s["ties"] == s["n"]
    assert s["win_rate"] == pytest.approx((s["wins"] + 0.5 * s["ties"]) / s["n"])
    pairs = [json.loads(line) for line in (out_dir / "judge-model.jsonl").read_text().splitlines()]
    assert [p["instruction"] for p in pairs] == ["Name a primary colour.", "What is 2 + 2?", "Say hi in French."]
    assert pairs[0]["preference"] == 2
    for p in pairs:
        assert p["preference_model_first"] == parse_ranking(p["reply_model_first"])
        assert p["preference"] == pair_preference(p["preference_reference_first"], p["preference_model_first"])
    assert "alpaca_eval_gpt4" in (out_dir / "judge-model.md").read_text()

    # Re-run, with the /v1 form of the URL: everything comes from the cache, no request reaches the server.
    before = _requests(url)
    assert main([*args, "--judge-url", url]) == 0
    s2 = json.loads((out_dir / "judge-model.json").read_text())
    assert s2["requests"] == 0 and s2["cache_hits"] == 6 and _requests(url) == before
    assert {k: s2[k] for k in ("n", "wins", "losses", "ties")} == {k: s[k] for k in ("n", "wins", "losses", "ties")}

    # A judge slower than --timeout is an error that says what to do, not a retry that queues the work again.
    with pytest.raises(JudgeError, match="did not answer within"):
        JudgeClient(chat_url(url), JUDGE, max_tokens=4, timeout=0.001).ask(judge_messages("a fresh question", "x", "y"))

    # --generate: the model's answers to the reference instructions first, then the judgement.
    gen_out = tmp_path / "gen"
    assert main(["judge", "--generate", "--model", "random:tiny", "--references", str(refs), "--limit", "2",
                 "--max-new-tokens", "4", "--judge-url", url, "--judge-model", JUDGE, "--cache", str(cache),
                 "--out", str(gen_out), "--max-tokens", "4"]) == 0
    rows = [json.loads(line) for line in (gen_out / "alpaca_eval-outputs.jsonl").read_text().splitlines()]
    assert [r["instruction"] for r in rows] == ["Name a primary colour.", "What is 2 + 2?"]
    assert all(r["generator"] == "random:tiny" for r in rows)
    g = json.loads((gen_out / "judge-alpaca_eval-outputs.json").read_text())
    assert g["judgements"] == 4 and g["n"] + g["unparseable_pairs"] == 2


def test_judge_usage_errors(tmp_path, capsys):
    assert main(["judge", "--references", "x.json", "--judge-url", "http://127.0.0.1:9"]) == 2
    assert "--outputs" in capsys.readouterr().err
    assert main(["judge", "--outputs", "a.jsonl", "--references", "x.json", "--judge-url", "http://127.0.0.1:9"]) == 2
    assert "--judge-model" in capsys.readouterr().err
