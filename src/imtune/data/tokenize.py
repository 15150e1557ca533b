"""Rendered -> Encoded: the one tokenisation of the rendered texts, and each token's class from character spans.

The rendered text is tokenized once (one batched call per ENCODE_CHUNK texts); every token's class comes from the
character spans of that same pass, via each token's start: its offset, or where that is exact the bytes its id
stands for laid end to end (_byte_starts; no offsets read), then one numpy reduceat over all examples. The result,
`Encoded`, is flat arrays over all examples and does not depend on the loss mode: imtune.data.cache stores it, and
imtune.data.weights turns it into weighted examples. imtune.data.prepare.prepare_examples is the one entry that calls
this.

The rule for a token that covers characters of several classes: it takes the highest class among them in the order
eot > assistant > user > system > template (types.CLASSES, last wins). So every token that holds any data content
carries its content's weight, and only tokens made purely of template text are `template`.
"""
from __future__ import annotations

import gc
import re
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain

import numpy as np
from tokenizers import pre_tokenizers

from imtune.types import CLASS_ID, OUTPUT, DataError, Problem, Rendered, UsageError


def _class_ids(r: Rendered, offsets: np.ndarray, last_turn_only: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-token class ids and per-token 'is history' flags from character spans (see the module docstring).

    The reference for one example; encode() computes the same for a whole batch at once (tests compare the two)."""
    n_chars = len(r.text)
    char_cls = np.zeros(n_chars + 1, dtype=np.int8)  # +1: a sentinel for tokens that start at the end
    hist = np.zeros(n_chars + 1, dtype=np.int8)
    last_asst = max((s.turn for s in r.spans if s.cls == "assistant"), default=-1)
    for s in r.spans:
        char_cls[s.start:s.end] = CLASS_ID[s.cls]
        if last_turn_only and s.cls in OUTPUT and s.turn != last_asst:
            hist[s.start:s.end] = 1
    if len(offsets) == 0:
        return np.zeros(0, np.int8), np.zeros(0, np.int8)
    # Token i owns characters [start_i, start_{i+1}) (so gaps such as a space a tokenizer leaves out of the offsets
    # belong to the token before them); reduceat takes the maximum class over each range.
    starts = np.minimum(offsets[:, 0], n_chars)
    starts = np.maximum.accumulate(starts)  # offsets are non-decreasing; guard against odd tokenizers
    cls = np.maximum.reduceat(char_cls, starts)
    his = np.maximum.reduceat(hist, starts)
    # reduceat gives char_cls[start] for an empty range (start_i == start_{i+1}): a byte-split character, right.
    return cls, his


@contextmanager
def gc_paused():
    """Pause the cyclic garbage collector while millions of small containers are built (token lists, offset tuples,
    examples: none of them can form a reference cycle). The collections they would trigger cost ~8% of preparing
    LIMA (BENCHMARKS.md); the collector is re-enabled, as it was, on the way out."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@dataclass(frozen=True)
class Encoded:
    """The loss-mode-independent result of tokenizing a list of Rendered, flat over all examples (what the cache
    stores). Example k owns the slice [bounds[k], bounds[k+1]) of every array."""

    input_ids: np.ndarray  # [N] int32
    classes: np.ndarray  # [N] int8, indices into CLASSES
    history: np.ndarray  # [N] int8: 1 where an assistant/eot token belongs to an earlier turn than the last one
    lengths: np.ndarray  # [K] int64 tokens per example

    @property
    def bounds(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.lengths)])

    def rows(self, a: int, b: int) -> Encoded:
        """Examples a..b-1 (b past the end: to the end), as views."""
        b = min(b, len(self.lengths))
        bounds = self.bounds
        s, e = int(bounds[a]), int(bounds[b])
        return Encoded(self.input_ids[s:e], self.classes[s:e], self.history[s:e], self.lengths[a:b])

    @staticmethod
    def join(parts: list[Encoded]) -> Encoded:
        return Encoded(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("input_ids", "classes", "history",
                                                                                 "lengths")))


class Appended:
    """Encoded chunks joined as they come: each flat array grows in place (realloc; for a large array the kernel
    moves its pages, nothing is copied), so the chunks and one joined copy of them are never held together (6 bytes
    a token twice: ~0.27 GB more at a million small records, before the weights are made)."""

    def __init__(self):
        self.arrays = (np.zeros(0, np.int32), np.zeros(0, np.int8), np.zeros(0, np.int8), np.zeros(0, np.int64))

    def add(self, e: Encoded) -> None:
        for a, part in zip(self.arrays, (e.input_ids, e.classes, e.history, e.lengths)):
            n = len(a)
            a.resize(n + len(part), refcheck=False)  # no view of these arrays exists until result()
            a[n:] = part

    def result(self) -> Encoded:
        return Encoded(*self.arrays)


# ---- content that spells control tokens -------------------------------------------------------------------------
# A user message holding the literal text `<|im_end|>` would become the real end-of-turn token if the rendered text
# were tokenized as it is: data could inject control tokens. The policy (--special-tokens-in-content):
#   split (default)  such content is tokenized as plain text; the template's own control tokens stay special.
#   keep             the old behaviour: the tokenizer sees control tokens wherever they are spelled.
#   error            such a record is a DataError (path:line).
# How `split` stays one tokenisation: the rendered text is tokenized once, as always; an occurrence of a special
# token inside a content span is one special-token id there (added tokens are cut out of the text before any other
# step, so the text around them tokenizes independently of them), and only that id is replaced by the plain-text
# tokens of its characters. So the ids equal one tokenisation of the rendered string everywhere except exactly
# inside those occurrences, and only the (rare) examples that have one cost anything extra.
SPECIAL_TOKENS_IN_CONTENT = ("split", "keep", "error")
CONTENT_CLASSES = (CLASS_ID["system"], CLASS_ID["user"], CLASS_ID["assistant"])

_CONTROL: dict[int, tuple[object, re.Pattern | None]] = {}  # id(tokenizer) -> (tokenizer, pattern)


def check_special_policy(policy: str) -> None:
    if policy not in SPECIAL_TOKENS_IN_CONTENT:
        raise UsageError(f"--special-tokens-in-content must be one of {', '.join(SPECIAL_TOKENS_IN_CONTENT)}, "
                         f"not {policy!r}")


def control_pattern(tokenizer) -> re.Pattern | None:
    """A regex matching any special (control) token's text, longest first; None when the tokenizer has none."""
    hit = _CONTROL.get(id(tokenizer))
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    texts = {t.content for t in decoder.values() if getattr(t, "special", False) and t.content}
    texts |= {t for t in getattr(tokenizer, "all_special_tokens", []) if t}
    pattern = re.compile("|".join(map(re.escape, sorted(texts, key=len, reverse=True)))) if texts else None
    _CONTROL[id(tokenizer)] = (tokenizer, pattern)
    return pattern


def content_specials(r: Rendered, pattern: re.Pattern | None) -> list[tuple[int, int]]:
    """Character ranges [start, end) of control-token text inside the content spans of r (system/user/assistant)."""
    if pattern is None:
        return []
    return [m.span() for s in r.spans if s.cls in ("system", "user", "assistant") and s.end > s.start
            for m in pattern.finditer(r.text, s.start, s.end)]


def find_content_specials(rendered: list[Rendered], tokenizer) -> dict[int, list[tuple[int, int]]]:
    """Example index -> the control-token ranges its content spells (only the examples that have any)."""
    pattern = control_pattern(tokenizer)
    found = {}
    if pattern is None:
        return found
    for k, r in enumerate(rendered):
        ranges = content_specials(r, pattern)
        if ranges:
            found[k] = ranges
    return found


def special_problem(r: Rendered, ranges: list[tuple[int, int]]) -> Problem:
    spelled = sorted({r.text[a:b] for a, b in ranges})
    return Problem(r.source, "", f"content spells the control token(s) {', '.join(spelled)} "
                                 f"({len(ranges)} time(s))")


def content_policy(rendered: list[Rendered], tokenizer, policy: str = "split",
                   ) -> tuple[dict[int, list[tuple[int, int]]] | None, list[Problem]]:
    """(what encode() should split, one Problem per example whose content spells a control token) under policy;
    policy "error" raises them as a DataError."""
    check_special_policy(policy)
    found = find_content_specials(rendered, tokenizer)
    problems = [special_problem(rendered[k], ranges) for k, ranges in found.items()]
    if policy == "error":
        refuse_specials(problems)
    return (found if policy == "split" else None), problems


def refuse_specials(problems: list[Problem]) -> None:
    """Policy "error": the examples whose content spells a control token, as one DataError (none: nothing)."""
    if problems:
        hint = ("; remove the text, or pass --special-tokens-in-content split (train on it as plain text) or keep "
                "(as control tokens)")
        raise DataError([Problem(p.where, p.field, p.message + hint) for p in problems[:20]], total=len(problems))


def token_offsets(r: Rendered, tokenizer, policy: str = "split") -> tuple[list[int], list[tuple[int, int]]]:
    """One example's ids and character offsets exactly as encode() tokenizes it under policy (for display)."""
    ids, offsets = _batch_encode([r.text], tokenizer)
    ranges = content_specials(r, control_pattern(tokenizer)) if policy == "split" else []
    if ranges:
        return split_specials(ids[0], offsets[0], ranges, r.text, tokenizer)
    return list(ids[0]), [tuple(o) for o in offsets[0]]


def _plain(texts: list[str], tokenizer) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """ids and offsets of texts with special tokens treated as plain text (the tokenizer's split_special_tokens)."""
    bk = getattr(tokenizer, "backend_tokenizer", None)
    if bk is not None:
        was = bk.encode_special_tokens
        bk.encode_special_tokens = True
        try:
            encs = bk.encode_batch(texts, add_special_tokens=False)
        finally:
            bk.encode_special_tokens = was
        return [(e.ids, e.offsets) for e in encs]
    enc = tokenizer(texts, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
    return list(zip(enc["input_ids"], enc["offset_mapping"]))


def split_specials(ids: list[int], offsets: list, ranges: list[tuple[int, int]], text: str,
                   tokenizer) -> tuple[list[int], list[tuple[int, int]]]:
    """One example's ids/offsets with the tokens inside each range replaced by the plain-text tokens of the range."""
    plain = _plain([text[a:b] for a, b in ranges], tokenizer)
    out_ids, out_off, j = [], [], 0
    for (a, b), (p_ids, p_off) in zip(ranges, plain):
        while j < len(ids) and offsets[j][0] < a:
            out_ids.append(ids[j])
            out_off.append(tuple(offsets[j]))
            j += 1
        while j < len(ids) and offsets[j][0] < b:  # the control-token id(s) covering this range
            j += 1
        out_ids += p_ids
        out_off += [(a + min(s, b - a), a + min(e, b - a)) for s, e in p_off]
    out_ids += ids[j:]
    out_off += [tuple(o) for o in offsets[j:]]
    return out_ids, out_off


def _batch_encode(texts: list[str], tokenizer, offsets: bool = True) -> tuple[list[list[int]], list | None]:
    """ids and offsets of every text from one batched call, without special tokens: (ids per text, offsets per text,
    each a sequence of (start, end)). offsets=False: the offsets may be None (the backend's encode_batch_fast, which
    does not track them: ~3% faster on LIMA).

    Calls the Rust backend directly when its state is what `tokenizer(texts, add_special_tokens=False)` would set
    (no truncation, no padding, special tokens recognised as such): the same encodings, without building transformers'
    BatchEncoding (~15% of the call); the offsets are then the Encoding objects' own, read when asked (_tokens reads
    only each token's start: making every (start, end) list first took as long again, 0.12 s of LIMA). Otherwise, the
    ordinary call."""
    bk = getattr(tokenizer, "backend_tokenizer", None)
    split = bool(getattr(tokenizer, "split_special_tokens", False))
    if bk is not None and bk.truncation is None and bk.padding is None and bk.encode_special_tokens == split:
        if not offsets and hasattr(bk, "encode_batch_fast"):
            return [e.ids for e in bk.encode_batch_fast(texts, add_special_tokens=False)], None
        encs = bk.encode_batch(texts, add_special_tokens=False)
        return [e.ids for e in encs], _Offsets(encs)
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False)
    return enc["input_ids"], enc["offset_mapping"]


class _Offsets:
    """The offsets of a list of tokenizers.Encoding, per text, read from the encoding when indexed."""

    def __init__(self, encs):
        self.encs = encs

    def __len__(self) -> int:
        return len(self.encs)

    def __getitem__(self, k: int):
        return self.encs[k].offsets


def _tokens(texts: list[str], tokenizer,
            split: dict[int, list[tuple[int, int]]] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids [N] int32, start offset of every token [N] int64, tokens per text [K] int64) for all texts, from one
    batched call; `split`: example -> control-token ranges of its content, tokenized as plain text (see above).
    (Chunking the call to overlap this conversion with the tokenizer in a worker thread was measured slower on a
    busy 2-core machine; see BENCHMARKS.md.)"""
    exact = not split and _byte_lengths(tokenizer) is not None  # token starts likely from byte lengths: no offsets
    ids, offsets = _batch_encode(texts, tokenizer, offsets=not exact)
    replaced = {}
    if split:
        ids = list(ids)
        for k, ranges in split.items():
            ids[k], replaced[k] = split_specials(ids[k], offsets[k], ranges, texts[k], tokenizer)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    n = int(lengths.sum())
    input_ids = np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=n)
    starts = _byte_starts(texts, input_ids, lengths, tokenizer) if exact else None
    if starts is None and offsets is None:  # the byte lengths did not add up after all: the offsets say
        offsets = _batch_encode(texts, tokenizer)[1]
    if starts is None:
        starts = np.fromiter((o[0] for k in range(len(ids)) for o in (replaced[k] if k in replaced else offsets[k])),
                             dtype=np.int64, count=n)
    return input_ids, starts, lengths


def _byte_starts(texts: list[str], input_ids: np.ndarray, lengths: np.ndarray, tokenizer) -> np.ndarray | None:
    """Every token's start (characters into its text), from the bytes each id stands for (_byte_lengths) laid end to
    end, without reading the offsets (~0.1 s of LIMA's ~1.1 s); None unless that holds for every text: the tokens of a
    text must add up to exactly its UTF-8 bytes (a prefix space, an added token that strips spaces, a normalizer
    would not). A token that starts inside a character (byte-level BPE splits an emoji) starts at that character, as
    its offset does. Equal to the offsets' starts: tests/test_tokenize.py."""
    table = _byte_lengths(tokenizer)
    if table is None or (len(input_ids) and int(input_ids.max()) >= len(table)):
        return None
    try:
        encoded = [t.encode("utf-8") for t in texts]
    except UnicodeEncodeError:  # a lone surrogate: the offsets say what the tokenizer made of it
        return None
    blen = table[input_ids]
    csum = np.concatenate([[0], np.cumsum(blen)])  # byte starts of every token, texts laid end to end
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    nbytes = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    if (blen == 0).any() or not np.array_equal(csum[bounds[1:]] - csum[bounds[:-1]], nbytes):
        return None
    data = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    char_of = np.cumsum((data & 0xC0) != 0x80) - 1  # the character each byte belongs to (continuations: their own)
    chars = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    base = np.concatenate([[0], np.cumsum(chars)])[:-1]
    return char_of[csum[:-1]] - np.repeat(base, lengths)


_BYTE_ALPHABET = frozenset(pre_tokenizers.ByteLevel.alphabet())  # the 256 characters that stand for one byte each
_BYTE_LENGTHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> _byte_lengths' table


def _byte_lengths(tokenizer) -> np.ndarray | None:
    """Bytes of text each token id stands for, where a tokenizer's tokens are exactly their texts' bytes: a byte-level
    BPE without a normalizer, with a ByteLevel pre-tokenizer and a post-processor that does not trim offsets (each
    vocabulary character one byte; an added token its content's UTF-8). None for any other tokenizer. Computed once
    per tokenizer object (a token added later has an id past the table: the offsets are read then)."""
    return once_per_tokenizer(_BYTE_LENGTHS, tokenizer, _byte_length_table)


def _byte_length_table(tokenizer) -> np.ndarray | None:
    bk = getattr(tokenizer, "backend_tokenizer", None)
    kind = lambda part: type(part).__name__ if part is not None else None  # noqa: E731
    table = vocab = None
    if (bk is not None and kind(bk.normalizer) is None and kind(bk.pre_tokenizer) == "ByteLevel"
            and kind(bk.model) == "BPE" and kind(bk.post_processor) in (None, "TemplateProcessing")
            and not getattr(bk.pre_tokenizer, "add_prefix_space", True)):
        vocab, added = model_vocabulary(tokenizer), bk.get_added_tokens_decoder()
        if not set("".join(vocab)) <= _BYTE_ALPHABET:  # a vocabulary character that is not one byte: not such a BPE
            vocab = None
    if vocab:
        table = np.zeros(max([*vocab.values(), *added, -1]) + 1, dtype=np.int64)
        table[np.fromiter(vocab.values(), np.int64, len(vocab))] = np.fromiter(map(len, vocab), np.int64, len(vocab))
        for i, tok in added.items():
            table[i] = len(tok.content.encode("utf-8"))
    return table


_VOCABULARIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> model_vocabulary's dict


def model_vocabulary(tokenizer) -> dict[str, int]:
    """The backend model's vocabulary, token text -> id, without added tokens (asked once per tokenizer object: a
    fresh copy of SmolLM2's 49k entries takes ~25 ms)."""
    return once_per_tokenizer(_VOCABULARIES, tokenizer, _model_vocabulary)


def _model_vocabulary(tokenizer) -> dict[str, int]:
    return tokenizer.backend_tokenizer.get_vocab(with_added_tokens=False)


def once_per_tokenizer(cache: weakref.WeakKeyDictionary, tokenizer, make):
    """make(tokenizer), computed once per tokenizer object and kept while it lives (computed each time for an object
    that cannot be weakly referenced)."""
    try:
        return cache[tokenizer]
    except (KeyError, TypeError):
        pass
    value = make(tokenizer)
    try:
        cache[tokenizer] = value
    except TypeError:
        pass
    return value


ENCODE_CHUNK = 16384  # texts per tokenizer call: the call's Python ids/offsets lists (~1 KB per text) stay bounded


def encode(rendered: list[Rendered], tokenizer, split: dict[int, list[tuple[int, int]]] | None = None) -> Encoded:
    """Tokenize every rendered text and give each token its class: one batched call per ENCODE_CHUNK texts (all of
    LIMA is one), the results joined into flat arrays."""
    if len(rendered) <= ENCODE_CHUNK:
        return _encode(rendered, tokenizer, split)
    joined = Appended()
    for a in range(0, len(rendered), ENCODE_CHUNK):
        part = {k - a: v for k, v in (split or {}).items() if a <= k < a + ENCODE_CHUNK}
        joined.add(_encode(rendered[a:a + ENCODE_CHUNK], tokenizer, part))
    return joined.result()


def _encode(rendered: list[Rendered], tokenizer, split: dict[int, list[tuple[int, int]]] | None = None) -> Encoded:
    """Tokenize every rendered text (one batched call) and give each token its class, for all examples at once.

    Equal to _class_ids per example: the texts are laid end to end, each followed by one sentinel character of class
    0, and one reduceat runs over all token starts plus one extra start at each sentinel (whose segment, covering the
    characters before the next example's first token, is dropped)."""
    input_ids, first, lengths = _tokens([r.text for r in rendered], tokenizer, split)
    n_chars = np.fromiter((len(r.text) for r in rendered), dtype=np.int64, count=len(rendered))
    base = np.concatenate([[0], np.cumsum(n_chars + 1)])  # text k starts at base[k]; its sentinel at base[k+1]-1
    char_cls = np.zeros(int(base[-1]), dtype=np.int8)
    hist = np.zeros(int(base[-1]), dtype=np.int8)
    for k, r in enumerate(rendered):
        b = int(base[k])
        last_asst = max((s.turn for s in r.spans if s.cls == "assistant"), default=-1)
        for s in r.spans:
            char_cls[b + s.start:b + s.end] = CLASS_ID[s.cls]
            if s.cls in OUTPUT and s.turn != last_asst:
                hist[b + s.start:b + s.end] = 1
    n = len(input_ids)
    example = np.repeat(np.arange(len(rendered)), lengths)  # [N] example of each token
    starts = np.minimum(first, n_chars[example]) + base[example]
    starts = np.maximum.accumulate(starts)  # per example, as base[k] exceeds every start of earlier examples
    # Each example's token starts, then its sentinel: token j of example k sits at bounds[k] + k + j.
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    is_token = np.ones(n + len(rendered), dtype=bool)
    is_token[bounds[1:] + np.arange(len(rendered))] = False
    idx = np.empty(n + len(rendered), dtype=np.int64)
    idx[is_token] = starts
    idx[~is_token] = base[1:] - 1
    classes = np.maximum.reduceat(char_cls, idx)[is_token] if n else np.zeros(0, np.int8)
    history = np.maximum.reduceat(hist, idx)[is_token] if n else np.zeros(0, np.int8)
    return Encoded(input_ids, classes, history, lengths)


