"""The data half of the flow in one call: load -> formats -> template -> tokenize -> weights.

`prepare_examples` is what train, eval, stats and inspect call; it returns the examples plus everything a person
should be told about what happened to their data (skipped records, truncations, examples without weight).
Tokenisation goes through a disk cache (imtune.data.cache): unchanged data with the same template and tokenizer is never
tokenized twice, whatever the loss mode.

Memory (1M small records): records are streamed from the file (never all parsed first), the frozen dataclasses
have __slots__, conversations are rendered, fitted and tokenized (through the cache, one entry a chunk)
ENCODE_CHUNK at a time, so the rendered texts (~0.5 KB a record) and the tokenizer's per-token offset tuples of one
chunk only are alive at once, and the examples are flat numpy arrays (types.Examples: 13 bytes a token), not
per-token Python lists.
Training calls Prepared.release() once the examples exist: the conversations of every record (~0.5 KB each) go,
and only the counts (records_loaded, the system-prompt count) and the in-training train sample's conversations stay.

A record too long to ever fit is found before tokenizing: a token covers at most `chars_per_token(tokenizer)`
characters (twice the longest vocabulary entry), so a rendered text longer than max_length times that cannot fit in
max_length tokens. With truncation "drop" it is dropped (`path:line`, counted); with "truncate" its text is cut to
that many characters first (the first max_length tokens are unchanged: the cut lies far beyond them). Without
max_length the bound is findings.MAX_CHARS characters (tokenizers abort natively on a 200 MB line)."""
from __future__ import annotations

import dataclasses
import hashlib
import weakref
from dataclasses import dataclass

from imtune.data import tokenize
from imtune.data.cache import encode_cached
from imtune.data.formats import Understood
from imtune.data.load import stream_conversations
from imtune.data.templates import Renderer
from imtune.data.tokenize import Encoded, check_special_policy, content_policy, gc_paused, refuse_specials
from imtune.data.validate import MAX_CHARS
from imtune.data.weights import LossSpec, TokenizeReport, check_truncation, weigh
from imtune.types import Conversation, Examples, Problem, Rendered, Span, Where

_CPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> chars_per_token's bound


@dataclass
class Prepared:
    examples: Examples  # flat numpy arrays; examples[k] is a TokenizedExample
    report: TokenizeReport
    renderer: Renderer
    conversations: list[Conversation]  # every record loaded, until release() lets them go
    load_skipped: list[Problem]
    cache: str = "off"  # "hit" (no tokenizer call), "miss" (tokenized and stored) or "off"
    understood: Understood | None = None  # how the file was read (None for conversations given in code)
    records_loaded: int = 0  # len(conversations) before release()
    without_system: int = 0  # records loaded with no system message of their own (for system_note)
    kept_without_system: int | None = None  # of them, examples kept (the tokens the share is of)

    def system_note(self) -> dict:
        """The system prompt the template adds (or --system-prompt sets), and its share of the tokens."""
        return self.renderer.system_note_counts(self.without_system, self.records_loaded,
                                                int(self.examples.bounds[-1]), self.kept_without_system)

    def release(self, keep=()) -> list[Conversation]:
        """The conversations of examples[k] for k in `keep` (in that order); all the conversations are let go
        (a Python object graph of ~0.5 KB a record, which training no longer needs once the examples exist)."""
        wanted = {self.examples.sources[k] for k in keep}
        found = {c.source: c for c in self.conversations if c.source in wanted}
        self.conversations = []
        return [found[self.examples.sources[k]] for k in keep]

    def notes(self) -> list[str]:
        """What a person should be told about how their data was read: format, field mapping, system prompt."""
        return [*(self.understood.lines() if self.understood else []), self.system_note()["line"]]

    @property
    def rendered(self) -> list[Rendered]:
        """Every conversation rendered (computed when asked: not held, a million of them cost ~0.5 GB)."""
        return [self.renderer.render(c) for c in self.conversations]

    def summary(self) -> str:
        s = self.report.summary()
        if self.load_skipped:
            s = f"{len(self.load_skipped)} invalid records skipped; " + s
        if self.report.dropped_unfit:
            s += f" (first too long: {self.report.dropped_unfit[0]})"
        return s


def load(data: str | list[Conversation], format: str = "auto", fields: dict | None = None,
         on_invalid: str = "error", limit: int | None = None,
         roles: dict | None = None) -> tuple[list[Conversation], list[Problem]]:
    """Conversations (streamed from a file, stopping after `limit`) and the records skipped as invalid."""
    convs, skipped, _ = _load(data, format, fields, on_invalid, limit, roles)
    return convs, skipped


def _load(data, format, fields, on_invalid, limit, roles) -> tuple[list[Conversation], list[Problem],
                                                                    Understood | None]:
    """load(), and how the file was read (None for conversations given in code)."""
    if isinstance(data, (list, tuple)):
        convs = list(data)
        return (convs[:limit] if limit else convs), [], None
    stream = stream_conversations(data, format=format, fields=fields, on_invalid=on_invalid, limit=limit or None,
                                  roles=roles)
    return list(stream), stream.skipped, stream.understood()


def chars_per_token(tokenizer) -> int:
    """An upper bound on the characters one token covers: twice the longest vocabulary entry (a byte-level entry has
    one character per byte, so it covers at most that many characters; the factor 2 leaves room for normalizers).
    Found once per tokenizer object."""
    return tokenize.once_per_tokenizer(_CPT, tokenizer, _chars_per_token)


def _chars_per_token(tokenizer) -> int:
    bk = getattr(tokenizer, "backend_tokenizer", None)
    if bk is not None:  # the vocabulary without a fresh copy (tokenize reads the same one), plus the added tokens
        texts = [*tokenize.model_vocabulary(tokenizer), *(t.content for t in bk.get_added_tokens_decoder().values())]
    else:
        texts = list(tokenizer.get_vocab())
    return 2 * max(max(map(len, texts), default=16), 8)


def fit_before_tokenizing(rendered: list[Rendered], tokenizer, max_length: int | None,
                          truncation: str) -> tuple[list[Rendered], list[Problem]]:
    """Drop (or, with truncation "truncate", cut) the texts too long to ever fit max_length tokens, before the
    tokenizer sees them. Returns the texts to tokenize and one Problem per dropped record."""
    per = chars_per_token(tokenizer) if max_length else 0
    limit = max_length * per if max_length else MAX_CHARS
    if all(len(r.text) <= limit for r in rendered):
        return rendered, []
    kept, dropped = [], []
    for r in rendered:
        if len(r.text) <= limit:
            kept.append(r)
        elif truncation == "truncate" and max_length:
            kept.append(_cut(r, limit))
        else:
            why = (f"cannot fit in --max-length {max_length} tokens (a token covers at most {per} characters)"
                   if max_length else "too long to tokenize")
            dropped.append(Problem(r.source, "", f"{len(r.text):,} characters {why}: dropped before tokenizing"))
    return kept, dropped


def _cut(r: Rendered, n: int) -> Rendered:
    spans = tuple(Span(s.start, min(s.end, n), s.cls, s.turn) for s in r.spans if s.start < n)
    return Rendered(r.text[:n], spans, r.source, r.n_messages)


@dataclass(frozen=True)
class Tokenized:
    """Every conversation rendered, fitted and tokenized: the Encoded of the ones kept, their sources, and what
    happened on the way."""

    encoded: Encoded
    sources: list[Where]  # of each kept example, in order
    unfit: list[Problem]  # dropped before tokenizing (fit_before_tokenizing)
    specials: list[Problem]  # content that spells a control token (tokenize.content_policy)
    cache: str  # "hit" | "miss" | "off": "miss" when any chunk was tokenized and stored


def tokenize_chunks(convs: list[Conversation], renderer: Renderer, tokenizer, max_length: int | None,
                    truncation: str, use_cache: bool, policy: str) -> Tokenized:
    """Render, fit, check and tokenize (through the cache) ENCODE_CHUNK conversations at a time: the rendered texts
    of one chunk only are alive at once. Policy "error" refuses once every chunk is checked (the count covers all)."""
    size = tokenize.ENCODE_CHUNK
    joined, sources, unfit, specials, statuses = tokenize.Appended(), [], [], [], set()
    for a in range(0, len(convs), size):
        rendered, dropped = fit_before_tokenizing([renderer.render(c) for c in convs[a:a + size]], tokenizer,
                                                  max_length, truncation)
        split, found = content_policy(rendered, tokenizer, "keep" if policy == "error" else policy)
        unfit += dropped
        specials += found
        if not (policy == "error" and specials):  # once one is found, "error" refuses below: nothing to tokenize
            encoded, status = encode_cached(rendered, tokenizer, use_cache, split, policy, part=len(convs) > size)
            joined.add(encoded)
            sources += [r.source for r in rendered]
            statuses.add(status)
        del rendered  # before the next chunk is rendered
    if policy == "error":
        refuse_specials(specials)
    cache = "miss" if "miss" in statuses else "hit" if "hit" in statuses else "off"
    return Tokenized(joined.result(), sources, unfit, specials, cache)


@dataclass(frozen=True)
class DataSpec:
    """How a data set is read, rendered and fitted: everything between the file and the weighted examples except the
    tokenizer and the loss. TrainConfig carries the same fields (DataSpec.of(cfg) takes them from it)."""
    template: str | None = None  # None: the tokenizer's own chat template, else tulu
    max_length: int | None = None
    truncation: str = "drop"  # drop | truncate: what happens to an example longer than max_length
    format: str = "auto"
    fields: dict | None = None  # canonical field -> the record's field(s)
    on_invalid: str = "error"  # error | skip
    limit: int | None = None  # the first N records
    special_tokens_in_content: str = "split"  # split | keep | error (tokenize.content_policy)
    roles: dict | None = None  # the record's role name -> user | assistant | system
    system_prompt: str = "default"
    cache: bool = True  # False: always tokenize (never read or write the preparation cache)

    @classmethod
    def of(cls, cfg, **changes) -> DataSpec:
        """The spec of a TrainConfig (or anything with these attributes), with `changes` applied."""
        names = [f.name for f in dataclasses.fields(cls) if hasattr(cfg, f.name)]
        return dataclasses.replace(cls(**{n: getattr(cfg, n) for n in names}), **changes)


def prepare_examples(data: str | list[Conversation], tokenizer, spec: LossSpec, reading: DataSpec | None = None,
                     **changes) -> Prepared:
    """Data (a path/hub spec or conversations) -> tokenized, weighted examples, read as `reading` says (keyword
    arguments change single fields: prepare_examples(data, tok, spec, template="tulu")). Tokenizes once, a chunk at a
    time, or not at all when the cache holds these rendered texts for this tokenizer."""
    r = dataclasses.replace(reading or DataSpec(), **changes)
    check_truncation(r.truncation)  # before any work
    check_special_policy(r.special_tokens_in_content)
    convs, skipped, understood = _load(data, r.format, r.fields, r.on_invalid, r.limit, r.roles)
    renderer = Renderer(r.template, tokenizer, r.system_prompt)
    # Rendered texts and spans, token lists and offsets: millions of small objects, no reference cycles. (With the
    # collector on, its full passes over them stalled one render of a million records past the template's 10 s bound.)
    with gc_paused():
        done = tokenize_chunks(convs, renderer, tokenizer, r.max_length, r.truncation, r.cache,
                               r.special_tokens_in_content)
        examples, report = weigh(done.encoded, done.sources, spec, r.max_length, r.truncation,
                                 on_empty="error" if r.on_invalid == "error" else "skip")
    report.content_specials, report.special_tokens_in_content = done.specials, r.special_tokens_in_content
    report.dropped_unfit, report.n_in = done.unfit, report.n_in + len(done.unfit)
    status = done.cache
    del done  # the Encoded arrays (6 bytes a token): the examples own what they need
    without = kept_without = j = 0  # examples keep the records' order: one walk finds which were kept
    src = examples.sources
    path_no = {p: i for i, p in enumerate(src.paths)}
    kept_at = list(zip(src.path_of.tolist(), src.lines.tolist(), src.indices.tolist()))  # no Where made per example
    for c in convs:
        kept = j < len(kept_at) and kept_at[j] == (path_no.get(c.source.path, -1), c.source.line, c.source.index)
        j += kept
        if not c.messages or c.messages[0].role != "system":
            without, kept_without = without + 1, kept_without + kept
    return Prepared(examples, report, renderer, convs, skipped, status, understood, len(convs), without, kept_without)


def fingerprint(examples) -> str:
    """A hash of every example's ids and weights (as Python lists: the same value as before examples were flat)."""
    h = hashlib.sha256()
    ids, w, bounds = examples.input_ids, examples.weights, examples.bounds.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        h.update(repr((ids[a:b].tolist(), w[a:b].tolist())).encode())
    return h.hexdigest()[:16]
