"""imtune.evaluate.answers: greedy answers kept per (weights, prompt, settings) in RUN/eval/answers.json. The same
weights are
never asked the same prompt twice (a benchmark included); other weights, other settings or sampling are asked
afresh; a damaged file costs only its answers."""
from __future__ import annotations

import json

import pytest

from imtune.evaluate.answers import FILE, Answers
from imtune.model.generate import GenerationConfig, generate


@pytest.fixture(scope="module")
def tiny_models():
    from imtune.model.models import load_model, load_tokenizer

    return load_model("random:tiny", seed=0), load_model("random:tiny", seed=1), load_tokenizer("random:tiny")


def counted(model, asked: list):
    real = model.generate
    model.generate = lambda **k: asked.append(k["input_ids"].shape[0]) or real(**k)
    return model


def test_the_same_weights_are_asked_a_prompt_once(tmp_path, tiny_models):
    from imtune.data.templates import Renderer

    a, b, tok = tiny_models
    renderer, asked = Renderer(None, tok), []
    model = counted(a, asked)
    cfg = GenerationConfig(max_new_tokens=3, batch_size=2)
    prompts = ["one two", "three four five", "six"]
    first = generate(model, tok, renderer, prompts, cfg, answers=Answers.of(tmp_path, model))
    assert sum(asked) == 3 and (tmp_path / FILE).is_file()
    again = generate(model, tok, renderer, [*prompts, "seven"], cfg, answers=Answers.of(tmp_path, model))
    assert again[:3] == first and sum(asked) == 4  # only "seven" was new
    generate(model, tok, renderer, prompts, GenerationConfig(max_new_tokens=4), answers=Answers.of(tmp_path, model))
    assert sum(asked) == 7  # other settings: another answer
    generate(model, tok, renderer, prompts, GenerationConfig(max_new_tokens=3, temperature=0.7),
             answers=Answers.of(tmp_path, model))
    assert sum(asked) == 10  # sampled answers are never taken from the file
    other = counted(b, asked)
    generate(other, tok, renderer, prompts, cfg, answers=Answers.of(tmp_path, other))
    assert sum(asked) == 13  # other weights: asked again
    (tmp_path / FILE).write_text('{"version": 1, "answers": [{"weights": 3}')  # damaged: asked again, rewritten
    assert generate(model, tok, renderer, prompts, cfg, answers=Answers.of(tmp_path, model)) == first
    assert sum(asked) == 16 and len(json.loads((tmp_path / FILE).read_text())["answers"]) == 3


def test_a_benchmark_answered_again_by_the_same_weights_generates_nothing(tmp_path, tiny_models):
    from imtune.data.templates import Renderer
    from imtune.tasks import run_benchmark

    a, _, tok = tiny_models
    data = tmp_path / "gsm.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": f"#### {2 * i}"}) + "\n"
                            for i in range(3)), encoding="utf-8")
    asked = []
    model = counted(a, asked)
    run = lambda: run_benchmark("gsm8k", model, tok, Renderer(None, tok), str(data),  # noqa: E731
                                gen_cfg=GenerationConfig(max_new_tokens=3), answers=Answers.of(tmp_path, model))
    assert run()["n"] == 3 and sum(asked) == 3
    assert run()["n"] == 3 and sum(asked) == 3
