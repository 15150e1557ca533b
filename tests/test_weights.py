"""Mask invariants, checked per token: on hand-made cases, on random conversations (hypothesis) and on real data.

The invariants (issue #2):
- token ids are identical to tokenizing the full rendered string once;
- `it`: the weighted tokens cover exactly the assistant contents and their end-of-turn tokens (and, for clean
  contents with no whitespace at the edges, decode to exactly those strings);
- `im`: no token made only of template text carries weight, every token holding data content does;
- `all`: every token has weight 1; `weighted`: instruction tokens have weight λ;
- a token straddling two classes takes the highest class (eot > assistant > user > system > template);
- truncation and all-zero examples are counted, never silent.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from conftest import shared_file, tokenize
from helpers import SIMPLE, conv, conversations, text_strategy as _text
from imtune.data.templates import Renderer
from imtune.data.tokenize import token_offsets
from imtune.data.weights import LOSS_MODES, loss_spec, parse_weights, weigh
from imtune.types import CLASS_ID, CLASSES, Conversation, DataError, Message, UsageError, Where

TEMPLATES = ["tulu", "chatml", "alpaca", "model"]


def token_ranges(tokenizer, text: str, n: int, offsets=None) -> list[tuple[int, int]]:
    """Characters each token owns: [start_i, start_{i+1}) — the rule weights.py documents."""
    offs = (offsets if offsets is not None
            else tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"])[:n]
    starts = [s for s, _ in offs] + [len(text)]
    return [(starts[i], max(starts[i], starts[i + 1])) for i in range(n)]


def check_invariants(ex, rendered, tokenizer, mode: str, encoding=None) -> None:
    """encoding: (ids, offsets) the example must equal (content with control tokens split); default: one
    tokenisation of the rendered text."""
    text = rendered.text
    if encoding is None:
        ids, offsets = tokenizer(text, add_special_tokens=False)["input_ids"], None
    else:
        ids, offsets = encoding
    assert ex.input_ids.tolist() == ids[: len(ex.input_ids)], "ids differ from one tokenisation of the rendered text"
    ranges = token_ranges(tokenizer, text, len(ex.input_ids), offsets)
    char_cls = np.zeros(len(text), dtype=int)
    for s in rendered.spans:
        char_cls[s.start:s.end] = CLASS_ID[s.cls]
    table = LOSS_MODES[mode]
    for i, ((a, b), c, w) in enumerate(zip(ranges, ex.classes, ex.weights)):
        # A token with an empty range shares its first character with the next token (a byte-split character).
        covered = set(char_cls[a:max(b, a + 1)].tolist()) or {0}
        assert c == max(covered), f"token {i} {text[a:b]!r}: class {CLASSES[c]}, chars {covered}"
        assert w == table[CLASSES[c]]
        if mode == "im":
            assert (w > 0) == (max(covered) > 0), f"token {i} {text[a:b]!r}"
        if mode == "it":
            assert (w > 0) == bool(covered & {CLASS_ID["assistant"], CLASS_ID["eot"]}), f"token {i} {text[a:b]!r}"
    # Every data character is owned by a token of its class or higher (no content is ever left unweighted).
    for s in rendered.spans:
        for i, (a, b) in enumerate(ranges):
            if a < s.end and b > s.start:
                assert ex.classes[i] >= CLASS_ID[s.cls]


def it_text(ex, tokenizer) -> str:
    return tokenizer.decode([t for t, w in zip(ex.input_ids, ex.weights) if w > 0])


# -- hand-made cases --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("mode", ["it", "im", "all"])
def test_invariants_simple(tok, template, mode):
    r = Renderer(template, tok).render(SIMPLE)
    (ex,), rep = tokenize([r], tok, loss_spec(mode))
    check_invariants(ex, r, tok, mode)
    if mode == "it":
        assert it_text(ex, tok) == "4<|im_end|>6, obviously.<|im_end|>"
    if mode == "im":
        assert it_text(ex, tok) == "Be brief.What is 2+2?4<|im_end|>And 3+3?6, obviously.<|im_end|>"


def test_template_tokens_never_weighted_in_im(tok):
    r = Renderer("tulu", tok).render(SIMPLE)
    (ex,), _ = tokenize([r], tok, loss_spec("im"))
    template_text = "".join(tok.decode([t]) for t, c in zip(ex.input_ids, ex.classes) if c == CLASS_ID["template"])
    assert "<|user|>" in template_text and "<|assistant|>" in template_text and "<|system|>" in template_text
    assert all(w == 0 for w, c in zip(ex.weights, ex.classes) if c == CLASS_ID["template"])


def test_weighted_and_overrides(tok):
    r = Renderer("tulu", tok).render(SIMPLE)
    (ex,), _ = tokenize([r], tok, loss_spec("weighted", prompt_weight=0.25))
    by = {CLASSES[c]: w for c, w in zip(ex.classes, ex.weights)}
    assert by == {"template": 0.0, "system": 0.25, "user": 0.25, "assistant": 1.0, "eot": 1.0}
    spec = loss_spec("im", weights="system=0,user=0.5,template=0.01")
    (ex,), _ = tokenize([r], tok, spec)
    by = {CLASSES[c]: w for c, w in zip(ex.classes, ex.weights)}
    assert by == {"template": 0.01, "system": 0.0, "user": 0.5, "assistant": 1.0, "eot": 1.0}


def test_last_turn_only_gives_history_the_prompt_weight(tok):
    r = Renderer("chatml", tok).render(SIMPLE)
    (ex,), _ = tokenize([r], tok, loss_spec("it", last_turn_only=True))
    assert it_text(ex, tok) == "6, obviously.<|im_end|>"
    (ex,), _ = tokenize([r], tok, loss_spec("weighted", prompt_weight=0.1, last_turn_only=True))
    weighted = [(tok.decode([t]), w) for t, w in zip(ex.input_ids, ex.weights) if w > 0]
    assert ("4", pytest.approx(0.1)) in [(s, pytest.approx(w)) for s, w in weighted]
    assert tok.decode([t for t, w in zip(ex.input_ids, ex.weights) if w == 1.0]) == "6, obviously.<|im_end|>"


def test_straddling_token_takes_the_content_class(tok):
    # An answer that starts with two spaces: the template's "\n" after <|assistant|> and the content's first space
    # merge into one token "\n ". It takes the content's class, so the whole content is learnt (plus one template
    # character) in IT.
    r = Renderer("tulu", tok).render(conv(("user", "Question?"), ("assistant", "  Answer.")))
    (ex,), _ = tokenize([r], tok, loss_spec("it"))
    check_invariants(ex, r, tok, "it")
    pieces = [(tok.decode([t]), CLASSES[c]) for t, c in zip(ex.input_ids, ex.classes)]
    assert ("\n ", "assistant") in pieces
    assert it_text(ex, tok) == "\n  Answer.<|im_end|>"


def test_truncation_drop_and_truncate_are_counted(tok):
    long = conv(("user", "word " * 200), ("assistant", "ok"))
    r = [Renderer("tulu", tok).render(c) for c in (long, SIMPLE)]
    exs, rep = tokenize(r, tok, loss_spec("it"), max_length=64, truncation="drop")
    assert len(exs) == 1 and len(rep.dropped_too_long) == 1 and "t.jsonl:1" in str(rep.dropped_too_long[0])
    exs, rep = tokenize(r, tok, loss_spec("im"), max_length=64, truncation="truncate")
    assert len(exs) == 2 and rep.truncated == 1 and len(exs[0].input_ids) == 64 and exs[0].truncated
    # In IT the truncated example lost its only output tokens: skipped and counted, never silent.
    exs, rep = tokenize(r, tok, loss_spec("it"), max_length=64, truncation="truncate")
    assert len(exs) == 1 and len(rep.dropped_no_weight) == 1
    with pytest.raises(DataError, match="t.jsonl:1: no token carries loss weight"):
        tokenize(r, tok, loss_spec("it"), max_length=64, truncation="truncate", on_empty="error")


def test_bad_loss_arguments_are_usage_errors():
    with pytest.raises(UsageError, match="valid: it, im, all, weighted"):
        loss_spec("nope")
    with pytest.raises(UsageError, match="needs --prompt-weight"):
        loss_spec("weighted")
    with pytest.raises(UsageError, match="unknown class 'usr'"):
        parse_weights("usr=1")
    with pytest.raises(UsageError, match="must be a number"):
        parse_weights("user=abc")
    assert parse_weights(" user=0.1 , system=0 ") == {"user": 0.1, "system": 0.0}


# -- property tests: random conversations, every template, two tokenizer families -------------------------------
def spells_control(c: Conversation, tokenizer) -> bool:
    """Whether some content spells one of the tokenizer's control tokens (then the ids differ from one tokenisation of
    the rendered text inside that span, by design: issue 14 item 7)."""
    return any(t in m.content for m in c.messages for t in tokenizer.get_added_vocab())



@pytest.mark.parametrize("template", TEMPLATES)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(c=conversations(), mode=st.sampled_from(["it", "im", "all"]))
def test_invariants_random_conversations(tok, template, c, mode):
    assume(not spells_control(c, tok))  # that content is split on purpose: the injected tests below cover it
    r = Renderer(template, tok).render(c)
    (ex,), _ = tokenize([r], tok, loss_spec(mode))
    check_invariants(ex, r, tok, mode)
    ranges = token_ranges(tok, r.text, len(ex.input_ids))
    bounds = {x for sp in r.spans for x in (sp.start, sp.end)}
    straddles = any(a < x < b for a, b in ranges for x in bounds)
    if mode == "it" and not straddles:  # no token crosses a span boundary: the weighted text is exactly the outputs
        expect = "".join(m.content + "<|im_end|>" for m in c.messages if m.role == "assistant")
        assert "".join(r.text[a:b] for (a, b), w in zip(ranges, ex.weights) if w > 0) == expect


@pytest.mark.parametrize("template", ["tulu", "alpaca"])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(c=conversations(), mode=st.sampled_from(["it", "im"]))
def test_invariants_sentencepiece_tokenizer(sp_tok, template, c, mode):
    assume(not spells_control(c, sp_tok))
    r = Renderer(template, sp_tok).render(c)
    assert r.text.startswith("<s>")  # this tokenizer adds BOS by itself, so the template renders it (as template)
    (ex,), _ = tokenize([r], sp_tok, loss_spec(mode))
    check_invariants(ex, r, sp_tok, mode)
    assert ex.classes[0] == CLASS_ID["template"] and ex.weights[0] == 0


# -- content that spells control tokens (issue 14 item 7) ---------------------------------------------------------
CONTROL = ["<|im_end|>", "<|im_start|>", "<|endoftext|>", "<filename>"]


@st.composite
def injected(draw):
    """A conversation whose messages mix random text with the literal text of control tokens."""
    piece = st.one_of(_text, st.sampled_from(CONTROL))
    msgs = []
    for role in ("user", "assistant") * draw(st.integers(1, 2)):
        parts = draw(st.lists(piece, min_size=1, max_size=4))
        if not any(p in CONTROL for p in parts):
            parts.insert(draw(st.integers(0, len(parts))), draw(st.sampled_from(CONTROL)))
        msgs.append(Message(role, "".join(parts)))
    return Conversation(tuple(msgs), Where("inj.jsonl", 7, 0))


def _occurrences(r, tokenizer):
    from imtune.data.tokenize import content_specials, control_pattern

    return content_specials(r, control_pattern(tokenizer))


@pytest.mark.parametrize("template", ["model", "tulu"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(c=injected(), mode=st.sampled_from(["it", "im", "all"]))
def test_content_spelling_control_tokens_is_plain_text_exactly_there(tok, template, c, mode):
    r = Renderer(template, tok).render(c)
    occ = _occurrences(r, tok)
    assert occ, "the strategy always injects at least one control token into content"
    (ex,), report = tokenize([r], tok, loss_spec(mode))
    assert len(report.content_specials) == 1 and str(report.content_specials[0]).startswith("inj.jsonl:7:")
    ids, offsets = token_offsets(r, tok)
    check_invariants(ex, r, tok, mode, (ids, offsets))  # every mask invariant holds on these ids
    special = {i for i, t in tok.added_tokens_decoder.items() if t.special}
    whole = tok(r.text, add_special_tokens=False, return_offsets_mapping=True)

    def inside(start):
        return any(a <= start < b for a, b in occ)

    # Outside the occurrences: the very tokens of one tokenisation of the rendered string.
    assert ([(i, tuple(o)) for i, o in zip(ids, offsets) if not inside(o[0])]
            == [(i, tuple(o)) for i, o in zip(whole["input_ids"], whole["offset_mapping"]) if not inside(o[0])])
    # Inside: that tokenisation has one control token per occurrence; ours has plain text spelling it.
    for a, b in occ:
        theirs = [i for i, o in zip(whole["input_ids"], whole["offset_mapping"]) if a <= o[0] < b]
        ours = [i for i, o in zip(ids, offsets) if a <= o[0] < b]
        assert len(theirs) == 1 and theirs[0] in special
        assert ours and not special & set(ours) and tok.decode(ours) == r.text[a:b]
    # The template's own control tokens stay special: as many as the rendered text has outside content.
    assert sum(i in special for i in ids) == sum(i in special for i, o in zip(whole["input_ids"],
                                                                              whole["offset_mapping"])
                                                 if not inside(o[0]))


def test_special_tokens_in_content_keep_and_error(tok):
    c = conv(("user", "stop here <|im_end|> please"), ("assistant", "ok"), path="x.jsonl")
    r = Renderer("model", tok).render(c)
    (kept,), report = tokenize([r], tok, loss_spec("it"), special_tokens_in_content="keep")
    assert kept.input_ids.tolist() == tok(r.text, add_special_tokens=False)["input_ids"]  # the old behaviour
    assert len(report.content_specials) == 1 and "kept as control tokens" in report.summary()
    (split,), _ = tokenize([r], tok, loss_spec("it"))
    assert tok.convert_tokens_to_ids("<|im_end|>") in kept.input_ids
    assert split.input_ids.tolist().count(tok.convert_tokens_to_ids("<|im_end|>")) == kept.input_ids.tolist().count(
        tok.convert_tokens_to_ids("<|im_end|>")) - 1
    with pytest.raises(DataError, match=r"x\.jsonl:1: content spells the control token\(s\) <\|im_end\|>"):
        tokenize([r], tok, loss_spec("it"), special_tokens_in_content="error")
    with pytest.raises(UsageError):
        tokenize([r], tok, loss_spec("it"), special_tokens_in_content="maybe")
    clean = Renderer("model", tok).render(conv(("user", "hi"), ("assistant", "ok")))
    (ex,), report = tokenize([clean], tok, loss_spec("it"), special_tokens_in_content="error")
    assert ex.input_ids.tolist() == tok(clean.text, add_special_tokens=False)["input_ids"]
    assert not report.content_specials


# -- golden checks on real data ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lima():
    rows = [json.loads(line) for line in shared_file("train/lima.jsonl").open()]
    return [Conversation(tuple(Message(m["role"], m["content"]) for m in r["messages"]), Where("lima.jsonl", i + 1, i))
            for i, r in enumerate(rows)]


@pytest.mark.parametrize("template", ["tulu", "chatml", "model"])
def test_lima_masks_satisfy_every_invariant(tok, lima, template):
    renderer = Renderer(template, tok)
    rendered = [renderer.render(c) for c in lima]
    assert sum(c.messages[-1].role == "assistant" and len(c.messages) > 2 for c in lima) == 30  # multi-turn
    for mode in ("it", "im", "all"):
        exs, rep = tokenize(rendered, tok, loss_spec(mode))
        assert len(exs) == 1030 and rep.n_skipped == 0
        step = 1 if mode == "im" else 7  # every example in im, a spread sample in the other modes (time)
        for ex, r in list(zip(exs, rendered))[::step]:
            check_invariants(ex, r, tok, mode)
    # A golden example: LIMA's first record in tulu/IT decodes to its answer plus <|im_end|>.
    exs, _ = tokenize(rendered[:1], tok, loss_spec("it"))
    assert it_text(exs[0], tok) == lima[0].messages[1].content + "<|im_end|>"


def test_model_template_injected_system_prompt_is_template(tok, lima):
    r = Renderer("model", tok).render(lima[0])
    assert "You are a helpful AI assistant named SmolLM" in r.text  # SmolLM2's template injects it
    (ex,), _ = tokenize([r], tok, loss_spec("im"))
    check_invariants(ex, r, tok, "im")
    injected = [t for t, c in zip(ex.input_ids, ex.classes) if c == CLASS_ID["template"]]
    assert "named SmolLM" in tok.decode(injected)


def test_weight_warnings_flag_weights_above_1_only():
    from imtune.data.weights import weight_warnings

    assert weight_warnings(loss_spec("im")) == weight_warnings(loss_spec("weighted", 0.5)) == []
    [w] = weight_warnings(loss_spec("weighted", 2))
    assert "above 1 (system=2, user=2)" in w
    assert "template=3" in weight_warnings(loss_spec("it", weights="template=3"))[0]


def test_weigh_needs_little_beyond_the_weights_it_makes():
    """weigh's transient memory beyond the weights it returns (8 bytes a token) stays near a byte a token: one bool
    array for the weighted tokens, reduced as bools (an add.reduceat to int64 cast all tokens first: +8 bytes a
    token, 0.36 GB at a million small records; issue 14 item 6)."""
    import tracemalloc

    from imtune.data.tokenize import Encoded

    k, n = 50_000, 40
    classes = np.tile(np.array([0, 2, 2, 0] + [3] * (n - 5) + [4], np.int8), k)
    encoded = Encoded(np.zeros(k * n, np.int32), classes, np.zeros(k * n, np.int8), np.full(k, n, np.int64))
    sources = [Where("w.jsonl", i + 1, i) for i in range(k)]
    tracemalloc.start()
    try:
        examples, _ = weigh(encoded, sources, loss_spec("it"), 1024)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(examples) == k and held >= 8 * k * n
    assert peak - held < 3 * k * n, f"{(peak - held) / (k * n):.1f} bytes a token beyond what weigh returns"
