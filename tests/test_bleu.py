"""BLEU: identical text scores 100, unrelated text about 0; prompts/references split from conversations;
memorisation BLEU runs end to end on a tiny model."""
from __future__ import annotations

import pytest

from imtune.evaluate.bleu import bleu, memorisation_bleu, split_prompt
from imtune.model.generate import GenerationConfig
from imtune.types import Conversation, Message

TEXT = ["The quick brown fox jumps over the lazy dog near the river bank.",
        "Photosynthesis converts light energy into chemical energy stored in glucose."]


def test_identical_text_is_100_and_unrelated_is_0():
    same = bleu(TEXT, TEXT)
    assert same["corpus_bleu"] == pytest.approx(100.0) and same["sentence_bleu_mean"] == pytest.approx(100.0)
    other = bleu(["Seven purple elephants dance quietly tonight", "Zebra quantum xylophone marmalade"], TEXT)
    assert other["corpus_bleu"] < 1.0 and other["sentence_bleu_mean"] < 1.0
    half = bleu(["The quick brown fox jumps over the lazy cat far from any river."], TEXT[:1])
    assert 5 < half["corpus_bleu"] < 100 and half["n"] == 1
    assert "tok:13a" in same["signature"]
    assert bleu([], [])["corpus_bleu"] is None
    with pytest.raises(ValueError):
        bleu(["a"], [])


def test_split_prompt_takes_the_last_assistant_message():
    conv = Conversation((Message("user", "a"), Message("assistant", "b"), Message("user", "c"),
                         Message("assistant", "d")))
    prompt, ref = split_prompt(conv)
    assert ref == "d" and [m.content for m in prompt] == ["a", "b", "c"]
    assert split_prompt(Conversation((Message("user", "q"),))) == ((Message("user", "q"),), None)


def test_memorisation_bleu_on_a_tiny_model():
    from imtune.data.templates import Renderer
    from imtune.model.models import load_model, load_tokenizer

    tok, model = load_tokenizer("random:tiny"), load_model("random:tiny")
    convs = [Conversation((Message("user", f"Question {i}?"), Message("assistant", TEXT[i % 2]))) for i in range(3)]
    convs.append(Conversation((Message("user", "No answer here."),)))  # no reference: not scored
    res = memorisation_bleu(model, tok, Renderer("tulu", tok), convs, limit=None,
                            gen_cfg=GenerationConfig(max_new_tokens=4, temperature=1.0, batch_size=2))
    assert res["n"] == 3 and len(res["rows"]) == 3 and 0 <= res["corpus_bleu"] <= 100
    assert [r["reference"] for r in res["rows"]] == [TEXT[0], TEXT[1], TEXT[0]]
    assert all(r["bleu"] == s for r, s in zip(res["rows"], res["sentence_bleu"]))
    assert memorisation_bleu(model, tok, Renderer("tulu", tok), convs, limit=2,
                             gen_cfg=GenerationConfig(max_new_tokens=2))["n"] == 2
