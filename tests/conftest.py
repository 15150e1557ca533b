"""Shared fixtures: the real data beside the repo (../shared/data), the default tokenizer, and a second tokenizer of
another family (SentencePiece-style Metaspace BPE that adds BOS), so mask invariants are checked on more than one."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `--precision auto` measures bf16 against fp32 on a CPU (imtune.model.precision); the suite's equalities are fp32's,
# so on
# a bf16-fast CPU (AMX) they must not silently switch. Tests of the probe itself clear this.
os.environ.setdefault("IMTUNE_CPU_PRECISION", "fp32")
# Every plan measures this machine afresh (imtune.train.cost keeps its rates a day otherwise: tests would share them).
os.environ["IMTUNE_MEASURE_HOURS"] = "0"
# A developer's own server key or probe stand-in must not change what the tests' servers and runs do.
os.environ.pop("IMTUNE_API_KEY", None)
os.environ.pop("IMTUNE_CPU_PROBE", None)


def shared_file(rel: str) -> Path:
    p = SHARED / rel
    if not p.exists():
        pytest.skip(f"{p} is absent: the shared reference data is not beside this checkout")
    return p


@pytest.fixture(scope="session")
def tok():
    from imtune.model.models import load_tokenizer

    return load_tokenizer("default")


@pytest.fixture(scope="session")
def sp_tok(tmp_path_factory):
    """A small SentencePiece-style tokenizer (Metaspace pre-tokenizer, BPE) that adds <s> by itself."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    t.pre_tokenizer = pre_tokenizers.Metaspace()
    t.decoder = decoders.Metaspace()
    corpus = ["Hello world, this is a tiny corpus for a tiny tokenizer.",
              "The quick brown fox jumps over the lazy dog.\nWhat is 2+2? It is 4.",
              "<|user|> <|assistant|> instruction output answer question"] * 50
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(corpus, trainer)
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", t.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")
    d = tmp_path_factory.mktemp("sp_tok")
    fast.save_pretrained(d)
    return PreTrainedTokenizerFast.from_pretrained(d)


@pytest.fixture(scope="session")
def judge_server():
    """One `imtune serve random:tiny --name judge-tiny` process for every judge test: (process, URL, stderr)."""
    from helpers import serving

    with serving("random:tiny", "--name", "judge-tiny") as s:
        yield s


def tokenize(rendered, tokenizer, spec, max_length=None, truncation="drop", on_empty="skip",
             special_tokens_in_content="split"):
    """The tokenize and weights stages on texts a test rendered itself (prepare_examples' steps after the template,
    without its cache): tokenize.content_policy + tokenize.encode, then weights.weigh. -> (Examples, TokenizeReport)"""
    from imtune.data.tokenize import content_policy, encode
    from imtune.data.weights import weigh

    split, specials = content_policy(rendered, tokenizer, special_tokens_in_content)
    examples, report = weigh(encode(rendered, tokenizer, split), [r.source for r in rendered], spec, max_length,
                             truncation, on_empty)
    report.content_specials, report.special_tokens_in_content = specials, special_tokens_in_content
    return examples, report


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """The preparation cache on for this test, in its own folder, for inputs of any size (test_cache*)."""
    from imtune.data import cache

    monkeypatch.setenv("IMTUNE_CACHE", str(tmp_path))
    monkeypatch.delenv("IMTUNE_NO_CACHE", raising=False)
    monkeypatch.setattr(cache, "MIN_CHARS", 0)
    return tmp_path / "prep"
