"""AlpacaEval 1.0 end to end: a tiny model answers real AlpacaEval instructions and a real `imtune serve` process
judges them (a weak judge: its replies are gibberish, so they are counted as unparseable); one pair's two replies
are put in the judge cache by hand, so the scoring path is exercised with parseable rankings too."""
from __future__ import annotations

import json

import pytest

from conftest import shared_file
from helpers import get
from imtune.cli import main
from imtune.evaluate.judge import JudgeCache, cache_key, judge_messages
from imtune.model.generate import GenerationConfig
from imtune.tasks import run_benchmark

JUDGE = "judge-tiny"


@pytest.fixture(scope="module")
def judge_url(judge_server):
    return judge_server[1]


def _requests(url: str) -> int:
    return get(url.removesuffix("/v1") + "/health")["requests"]["chat_completions"]


def test_alpacaeval_end_to_end(judge_url, tmp_path):
    from imtune.data.templates import Renderer
    from imtune.model.models import load_model, load_tokenizer

    data = str(shared_file("eval/alpaca_eval/text_davinci_003_outputs.json"))
    refs = json.loads(open(data, encoding="utf-8").read())[:2]
    model, tok = load_model("random:tiny"), load_tokenizer("random:tiny")
    renderer = Renderer(None, tok)
    cfg = GenerationConfig(max_new_tokens=4)
    from imtune.model.generate import generate

    first_answer = generate(model, tok, renderer, [refs[0]["instruction"]], cfg)[0]
    cache = tmp_path / "judge.sqlite"
    seeded = JudgeCache(cache)  # pair 0 as a good judge would rank it in both orders: the reference wins
    model_1_first = "[{'model': 'model_1', 'rank': 1}, {'model': 'model_2', 'rank': 2}]"
    model_2_first = "[{'model': 'model_1', 'rank': 2}, {'model': 'model_2', 'rank': 1}]"
    for a, b, reply in [(refs[0]["output"], first_answer, model_1_first),
                        (first_answer, refs[0]["output"], model_2_first)]:
        seeded.put(cache_key(JUDGE, judge_messages(refs[0]["instruction"], a, b)), JUDGE, reply)
    seeded.close()

    before = _requests(judge_url)
    out = tmp_path / "out"
    r = run_benchmark("alpacaeval", model, tok, renderer, data, limit=2, gen_cfg=cfg, out_dir=out,
                      model_name="random:tiny", judge_url=judge_url, judge_model=JUDGE, judge_cache=str(cache),
                      judge_max_tokens=4)
    assert _requests(judge_url) - before == 2  # pair 1 in both orders; pair 0 came from the cache
    assert (r["instructions"], r["judgements"], r["requests"], r["cache_hits"]) == (2, 4, 2, 2)
    assert r["n"] + r["unparseable_pairs"] == 2 and r["losses"] >= 1  # the seeded pair is a loss
    assert r["win_rate"] == pytest.approx((r["wins"] + r["ties"] / 2) / r["n"])
    assert r["reference_avg_length"] == pytest.approx(sum(len(x["output"]) for x in refs) / 2)
    rows = [json.loads(line) for line in (out / "alpacaeval.samples.jsonl").read_text().splitlines()]
    assert rows[0]["output"] == first_answer and rows[0]["preference"] == 1
    assert r["avg_length"] == pytest.approx(sum(len(x["output"]) for x in rows) / 2)
    assert r["judge"]["model"] == JUDGE and "alpaca_eval_gpt4" in (out / "alpacaeval.md").read_text()

    # The command line: same numbers from the cache, the JSON has the promised keys.
    js = tmp_path / "r.json"
    assert main(["bench", "alpacaeval", "--model", "random:tiny", "--data", data, "--limit", "2",
                 "--max-new-tokens", "4", "--judge-url", judge_url, "--judge-model", JUDGE, "--judge-cache",
                 str(cache), "--judge-max-tokens", "4", "--out", str(tmp_path / "cli"), "--json", str(js)]) == 0
    got = json.loads(js.read_text())
    assert {"n", "win_rate", "standard_error", "avg_length"} <= set(got) and got["requests"] == 0
    assert (got["n"], got["wins"], got["losses"], got["ties"]) == (r["n"], r["wins"], r["losses"], r["ties"])


def test_alpacaeval_needs_a_judge(capsys):
    assert main(["bench", "alpacaeval", "--model", "random:tiny", "--data", "x.json"]) == 2
    assert "--judge-url" in capsys.readouterr().err
