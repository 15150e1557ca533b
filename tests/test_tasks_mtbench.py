"""MT-Bench: FastChat's judge prompts and rating parser on hand-made replies, the score arithmetic, and end to end
with a tiny model answering a writing and a math question (reference-guided) and a real `imtune serve` process as a
(weak) judge: two turns each, the second asked after the model's own first answer."""
from __future__ import annotations

import json
import math

import pytest

from conftest import shared_file
from helpers import get
from imtune.cli import main
from imtune.model.generate import GenerationConfig, generate
from imtune.tasks import mtbench, run_benchmark
from imtune.types import Message

JUDGE = "judge-tiny"


@pytest.mark.parametrize("reply, expected", [
    ("The answer is fine. Rating: [[7]]", 7.0), ("Rating: [[8.5]]", 8.5), ("[[10]] and later [[2]]", 10.0),
    ("no double brackets, but [6] here", 6.0), ("Rating: [[3]] though [9] was considered", 3.0),
    ("Rating: 7/10", None), ("[[seven]]", None), ("", None), (None, None),
])
def test_parse_rating_follows_fastchat(reply, expected):
    assert mtbench.parse_rating(reply) == expected


@pytest.fixture(scope="module")
def data():
    return str(shared_file("eval/mt_bench/question.jsonl").parent)


def test_judge_prompts_are_fastchats_single_grading(data):
    questions = {q.key[0]: q for q in mtbench.load(data, None)}
    assert len(questions) == 80 and sum(q.reference is not None for q in questions.values()) == 30
    prompts = mtbench.judge_prompts(data)
    writing, math_q = questions[81], questions[111]
    assert (writing.category, math_q.category) == ("writing", "math")
    sys1, user1 = mtbench.judge_messages(prompts, writing, ("ANSWER-ONE", "ANSWER-TWO"), 1)
    assert sys1 == {"role": "system", "content": "You are a helpful assistant."}
    assert user1["content"] == prompts["single-v1"]["prompt_template"].format(question=writing.turns[0],
                                                                             answer="ANSWER-ONE")
    sys2, user2 = mtbench.judge_messages(prompts, math_q, ("ANSWER-ONE", "ANSWER-TWO"), 2)
    assert sys2["content"] == prompts["single-math-v1-multi-turn"]["system_prompt"]
    for text in (math_q.turns[0], math_q.turns[1], "ANSWER-ONE", "ANSWER-TWO", *math_q.reference):
        assert text in user2["content"]  # the whole conversation, and GPT-4's reference answers to both turns
    assert "ANSWER-TWO" not in mtbench.judge_messages(prompts, writing, ("ANSWER-ONE", "ANSWER-TWO"), 1)[1]["content"]
    assert mtbench.TEMPERATURE == {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                                   "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}


def test_summarize_leaves_unparseable_out(data):
    qs = [q for q in mtbench.load(data, None) if q.key[0] in (81, 82, 111)]
    s = mtbench.summarize(qs, [(8.0, 6.0), (None, 4.0), (2.0, None)])
    assert s["n"] == 3 and s["judgements"] == 6 and s["unparseable_judgements"] == 2
    assert s["score"] == pytest.approx(5.0) and s["turn1"]["score"] == pytest.approx(5.0)
    assert s["turn2"]["score"] == pytest.approx(5.0) and s["turn2"]["n"] == 2
    assert s["standard_error"] == pytest.approx(math.sqrt((9 + 1 + 1 + 9) / 3 / 4))
    assert s["categories"]["writing"] == {"score": 6.0, "standard_error": pytest.approx(math.sqrt(8 / 2 / 3)), "n": 3}
    assert s["categories"]["math"]["n"] == 1 and set(s["categories"]) == {"writing", "math"}


def test_mtbench_end_to_end(data, tmp_path, judge_server):
    from imtune.data.templates import Renderer
    from imtune.model.models import load_model, load_tokenizer

    subset = tmp_path / "mt_bench"
    subset.mkdir()
    with open(f"{data}/question.jsonl", encoding="utf-8") as f:
        lines = [ln for ln in f if json.loads(ln)["question_id"] in (81, 111)]
    (subset / "question.jsonl").write_text("".join(lines))
    for name in ("reference_answer_gpt-4.jsonl", "judge_prompts.jsonl"):
        (subset / name).symlink_to(f"{data}/{name}")

    model, tok = load_model("random:tiny"), load_tokenizer("random:tiny")
    renderer = Renderer(None, tok)
    cfg = GenerationConfig(max_new_tokens=4)
    url = judge_server[1]
    before = get(url.removesuffix("/v1") + "/health")["requests"]["chat_completions"]
    r = run_benchmark("mtbench", model, tok, renderer, str(subset), gen_cfg=cfg, out_dir=tmp_path / "out",
                      model_name="random:tiny", judge_url=url, judge_model=JUDGE, judge_cache="none",
                      judge_max_tokens=4)
    assert get(url.removesuffix("/v1") + "/health")["requests"]["chat_completions"] - before == 4
    js = tmp_path / "r.json"
    assert main(["bench", "mtbench", "--model", "random:tiny", "--data", str(subset), "--limit", "1",
                 "--max-new-tokens", "4", "--judge-url", url, "--judge-model", JUDGE, "--judge-cache", "none",
                 "--judge-max-tokens", "4", "--out", str(tmp_path / "cli"), "--json", str(js)]) == 0
    assert (r["n"], r["judgements"], r["requests"]) == (2, 4, 4)
    assert r["turn1"]["n"] + r["turn2"]["n"] + r["unparseable_judgements"] == 4
    assert {"score", "turn1", "turn2", "categories", "n"} <= set(r) and r["judge"]["model"] == JUDGE
    rows = {row["question_id"]: row for row in map(json.loads, (tmp_path / "out" / "mtbench.samples.jsonl")
                                                   .read_text().splitlines())}
    # Math is greedy (temperature 0): its second answer is the model's reply after its own first answer.
    m = rows[111]
    again = generate(model, tok, renderer, [[Message("user", m["turns"][0]), Message("assistant", m["answers"][0]),
                                             Message("user", m["turns"][1])]], cfg)[0]
    assert m["answers"][1] == again and len(m["replies"]) == 2
    assert m["ratings"] == [mtbench.parse_rating(x) for x in m["replies"]]
    cli = json.loads(js.read_text())
    assert cli["n"] == 1 and cli["judgements"] == 2 and "writing" in cli["categories"]
