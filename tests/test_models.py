"""Model sources: default (converted once from the embedded GGUF), random sizes, directories, run dirs, hub ids."""
from __future__ import annotations

import pytest

from imtune.model import models
from imtune.types import UsageError


def test_resolve_kinds(tmp_path):
    assert models.resolve(None).kind == "default"
    assert models.resolve("random:tiny").size == "tiny"
    assert models.resolve("HuggingFaceTB/SmolLM2-360M").kind == "hub"
    (tmp_path / "final").mkdir()
    assert models.resolve(str(tmp_path)).path == str(tmp_path / "final")  # a run directory
    with pytest.raises(UsageError, match="unknown random model size 'huge'; valid: tiny"):
        models.resolve("random:huge")
    with pytest.raises(UsageError, match="no such directory"):
        models.resolve("./nope/model")


def test_default_tokenizer_is_prepared_and_cached(tok):
    d = models.prepare_default()
    assert (d / "model.safetensors").exists() and (d / "tokenizer.json").exists()
    assert len(tok) == 49152 and tok.eos_token == "<|im_end|>"
    assert models.load_tokenizer("default") is tok


def test_random_tiny_is_seeded_llama(tok):
    a, b = models.load_model("random:tiny", seed=1), models.load_model("random:tiny", seed=1)
    assert a.config.model_type == "llama" and a.config.vocab_size == len(tok)
    assert all((p == q).all() for p, q in zip(a.parameters(), b.parameters()))
    c = models.load_model("random:tiny", seed=2)
    assert not all((p == q).all() for p, q in zip(a.parameters(), c.parameters()))


def test_tokenizer_only_directory_needs_no_weights(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    t = models.load_tokenizer(str(tmp_path))
    assert t("hello").input_ids == tok("hello").input_ids


def test_unknown_or_missing_attention_kernel_is_a_usage_error():
    import importlib.util

    from imtune.model.models import load_model
    from imtune.types import UsageError

    with pytest.raises(UsageError, match=r"--attn-implementation bogus: .*not supported"):
        load_model("random:tiny", attn_implementation="bogus")
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(UsageError, match="--attn-implementation flash_attention_2: .*FlashAttention2"):
            load_model("random:tiny", attn_implementation="flash_attention_2")
    assert load_model("random:tiny", attn_implementation="eager").config._attn_implementation == "eager"


def test_generic_tokenizer_skips_auto_tokenizer_and_matches_it(tok):
    from transformers import AutoTokenizer

    d = models.default_dir()
    assert models._tokenizer_class(d).__name__ in ("PreTrainedTokenizerFast", "TokenizersBackend")
    auto = AutoTokenizer.from_pretrained(d)
    assert type(auto) is type(tok)  # the class AutoTokenizer picks, without importing torch for it
    text = "<|im_start|>user\nHello, wörld!<|im_end|>\n"
    assert auto(text).input_ids == tok(text).input_ids and auto.chat_template == tok.chat_template
