"""The preparation cache (imtune.data.cache) and the batched fast path of tokenize.encode it stores.

- A second prepare_examples on unchanged data is a cache hit: the tokenizer is never called.
- Changing the template, the data or the tokenizer misses; changing the loss mode reuses the tokenisation (the cache
  holds the mode-independent ids and classes) and gives exactly what an uncached run gives.
- A corrupt or truncated entry is ignored and rebuilt.
- encode() (all examples at once, Rust backend called directly) equals the per-example reference (_class_ids over
  the ordinary tokenizer call) on every LIMA conversation and on a tokenizer of another family.
"""
from __future__ import annotations

import numpy as np
import pytest

import imtune.data.tokenize
from conftest import shared_file, tokenize
from imtune.data import cache
from imtune.data.prepare import prepare_examples
from imtune.data.templates import Renderer
from imtune.data.tokenize import _class_ids, encode
from imtune.data.weights import loss_spec
from imtune.types import Conversation, Message, Where


@pytest.fixture
def counting(monkeypatch):
    """Counts calls of tokenize.encode as seen by the cache module (every tokenisation goes through it)."""
    calls = []
    real = cache.encode

    def counted(rendered, tokenizer, split=None):
        calls.append(len(rendered))
        return real(rendered, tokenizer, split)

    monkeypatch.setattr(cache, "encode", counted)
    return calls


def convs(n: int = 12, salt: str = "") -> list[Conversation]:
    return [Conversation((Message("system", f"Be brief{salt}."), Message("user", f"What is {i} + {i}?"),
                          Message("assistant", f"{2 * i}, of course. " * (1 + i % 3))), Where("m.jsonl", i + 1, i))
            for i in range(n)]


def as_tuples(prep):
    return [(e.input_ids.tolist(), e.weights.tolist(), e.classes.tolist(), e.source, e.truncated)
            for e in prep.examples]


def test_second_run_is_a_hit_without_any_tokenizer_call(tok, cache_dir, counting, monkeypatch):
    lima = str(shared_file("train/lima.jsonl"))
    first = prepare_examples(lima, tok, loss_spec("it"), max_length=1024)
    assert first.cache == "miss" and counting == [1030] and len(list(cache_dir.glob("*.npz"))) == 1

    def no_tokenizer(*a, **k):
        raise AssertionError("the data was tokenized on a cache hit")

    # the one place encode() calls the tokenizer
    monkeypatch.setattr(imtune.data.tokenize, "_batch_encode", no_tokenizer)
    second = prepare_examples(lima, tok, loss_spec("it"), max_length=1024)
    assert second.cache == "hit" and counting == [1030]
    assert as_tuples(second) == as_tuples(first)
    assert second.report.as_dict() == first.report.as_dict()


def test_changing_template_data_or_tokenizer_misses(tok, sp_tok, cache_dir, counting):
    base = prepare_examples(convs(), tok, loss_spec("it"), template="tulu")
    assert base.cache == "miss"
    assert prepare_examples(convs(), tok, loss_spec("it"), template="tulu").cache == "hit"
    assert prepare_examples(convs(), tok, loss_spec("it"), template="chatml").cache == "miss"
    assert prepare_examples(convs(salt="!"), tok, loss_spec("it"), template="tulu").cache == "miss"
    assert prepare_examples(convs(), sp_tok, loss_spec("it"), template="tulu").cache == "miss"
    assert prepare_examples(convs()[:5], tok, loss_spec("it"), template="tulu").cache == "miss"
    assert len(counting) == 5


@pytest.mark.parametrize("kw", [dict(spec=loss_spec("im")), dict(spec=loss_spec("weighted", prompt_weight=0.3)),
                                dict(spec=loss_spec("it", last_turn_only=True)),
                                dict(spec=loss_spec("it"), max_length=20, truncation="truncate"),
                                dict(spec=loss_spec("it"), max_length=30, truncation="drop")])
def test_another_mode_reuses_the_tokenisation_and_equals_an_uncached_run(tok, cache_dir, counting, kw):
    data = convs() + [Conversation((Message("user", "a"), Message("assistant", "b"), Message("user", "c"),
                                    Message("assistant", "d")), Where("m.jsonl", 99, 12))]
    prepare_examples(data, tok, loss_spec("it"), template="tulu")
    spec = kw.pop("spec")
    hit = prepare_examples(data, tok, spec, template="tulu", on_invalid="skip", **kw)
    fresh = prepare_examples(data, tok, spec, template="tulu", on_invalid="skip", cache=False, **kw)
    assert hit.cache == "hit" and fresh.cache == "off" and len(counting) == 2  # the first run and the uncached one
    assert as_tuples(hit) == as_tuples(fresh) and hit.report.as_dict() == fresh.report.as_dict()


def test_corrupt_entry_is_ignored_and_rebuilt(tok, cache_dir, counting):
    first = prepare_examples(convs(), tok, loss_spec("it"), template="tulu")
    (entry,) = cache_dir.glob("*.npz")
    good = entry.read_bytes()
    for bad in (good[: len(good) // 2], b"not a zip file", good[:-40] + bytes(40)):
        entry.write_bytes(bad)
        again = prepare_examples(convs(), tok, loss_spec("it"), template="tulu")
        assert again.cache == "miss" and as_tuples(again) == as_tuples(first)
    assert prepare_examples(convs(), tok, loss_spec("it"), template="tulu").cache == "hit"
    assert not list(cache_dir.glob(".tmp-*"))  # no temporary file left behind


def test_flipped_array_byte_fails_the_checksum(tok, cache_dir):
    prepare_examples(convs(), tok, loss_spec("it"), template="tulu")
    (entry,) = cache_dir.glob("*.npz")
    with np.load(entry) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["input_ids"] = arrays["input_ids"].copy()
    arrays["input_ids"][3] += 1
    np.savez(entry, **arrays)
    assert cache.read(entry, len(convs())) is None


def test_off_switches(tok, cache_dir, counting, monkeypatch):
    assert prepare_examples(convs(), tok, loss_spec("it"), template="tulu", cache=False).cache == "off"
    monkeypatch.setenv("IMTUNE_NO_CACHE", "1")
    assert prepare_examples(convs(), tok, loss_spec("it"), template="tulu").cache == "off"
    assert not cache_dir.exists()


# -- the batched fast path equals the per-example reference ------------------------------------------------------
def reference(rendered, tokenizer, spec):
    """tokenisation as it was before batching: the ordinary tokenizer call, then _class_ids per example."""
    enc = tokenizer([r.text for r in rendered], add_special_tokens=False, return_offsets_mapping=True)
    table = np.array([spec.table[c] for c in ("template", "system", "user", "assistant", "eot")])
    out = []
    for r, ids, offs in zip(rendered, enc["input_ids"], enc["offset_mapping"]):
        cls, hist = _class_ids(r, np.asarray(offs, dtype=np.int64).reshape(-1, 2), spec.last_turn_only)
        w = np.where(hist.astype(bool), spec.table["user"], table[cls]) if spec.last_turn_only else table[cls]
        out.append((list(ids), w.tolist(), cls.tolist()))
    return out


@pytest.mark.parametrize("template", [None, "alpaca"])
def test_encode_equals_the_reference_on_lima(tok, template):
    import json

    rows = [json.loads(line) for line in shared_file("train/lima.jsonl").open()]
    data = [Conversation(tuple(Message(m["role"], m["content"]) for m in r["messages"]), Where("l", i + 1, i))
            for i, r in enumerate(rows)]
    rendered = [Renderer(template, tok).render(c) for c in data]
    for spec in (loss_spec("im"), loss_spec("it", last_turn_only=True)):
        got, _ = tokenize(rendered, tok, spec)
        got = [(e.input_ids.tolist(), e.weights.tolist(), e.classes.tolist()) for e in got]
        assert got == reference(rendered, tok, spec)


def test_encode_equals_the_reference_on_odd_texts(tok, sp_tok):
    texts = ["", "\x06", " a", "a\u0301\u0301 b", "日本語 😀 \t\n", "<|im_end|>x", " " * 5]
    data = [Conversation((Message("user", t or "u"), Message("assistant", t), Message("user", "q"),
                          Message("assistant", "z" + t)), Where("o", i + 1, i)) for i, t in enumerate(texts)]
    for tk in (tok, sp_tok):
        for template in ("tulu", "chatml"):
            rendered = [Renderer(template, tk).render(c) for c in data]
            spec = loss_spec("it", last_turn_only=True)
            enc = encode(rendered, tk)
            assert enc.lengths.tolist() == [len(x[0]) for x in reference(rendered, tk, spec)]
            got, _ = tokenize(rendered, tk, spec, on_empty="skip", special_tokens_in_content="keep")  # as reference
            ref = [x for x in reference(rendered, tk, spec) if any(w > 0 for w in x[1][1:])]
            assert [(e.input_ids.tolist(), e.weights.tolist(), e.classes.tolist()) for e in got] == ref


def test_the_key_holds_the_special_tokens_policy(tok):
    """split and keep tokenize content that spells a control token differently: they must not share an entry."""
    rendered = [Renderer(None, tok).render(c) for c in convs(3)]
    assert cache.key(rendered, tok, "split") != cache.key(rendered, tok, "keep")
    assert cache.key(rendered, tok, "split") == cache.key(rendered, tok)


def test_each_chunk_is_an_entry_hit_again_and_missed_only_where_changed(tok, cache_dir, counting, monkeypatch):
    """prepare_examples tokenizes ENCODE_CHUNK examples at a time, one entry a chunk: a repeated run hits every chunk
    (however small: MIN_CHARS applies to single-chunk inputs only), a changed record re-tokenizes its chunk only, and
    what comes back always equals an uncached run."""
    monkeypatch.setattr(imtune.data.tokenize, "ENCODE_CHUNK", 5)
    monkeypatch.setattr(cache, "MIN_CHARS", 10**9)
    first = prepare_examples(convs(), tok, loss_spec("it"), template="tulu")
    assert first.cache == "miss" and counting == [5, 5, 2] and len(list(cache_dir.glob("*.npz"))) == 3
    again = prepare_examples(convs(), tok, loss_spec("it"), template="tulu")
    assert again.cache == "hit" and counting == [5, 5, 2] and as_tuples(again) == as_tuples(first)
    changed = convs()
    changed[7] = Conversation((Message("user", "Something else?"), Message("assistant", "Yes.")),
                              Where("m.jsonl", 8, 7))
    third = prepare_examples(changed, tok, loss_spec("it"), template="tulu")
    assert third.cache == "miss" and counting == [5, 5, 2, 5]
    fresh = prepare_examples(changed, tok, loss_spec("it"), template="tulu", cache=False)
    assert as_tuples(third) == as_tuples(fresh) and as_tuples(third) != as_tuples(first)
    assert prepare_examples(convs()[:5], tok, loss_spec("it"), template="tulu").cache == "off"  # one small chunk
