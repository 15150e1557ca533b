"""Rendered -> TokenizedExample: one tokenisation of the rendered text, a class per token, a weight per class.

The rule for a token that covers characters of several classes: it takes the highest class among them in the order
eot > assistant > user > system > template (types.CLASSES, last wins). So every token that holds any data content
carries its content's weight, and only tokens made purely of template text are `template`.
"""
from __future__ import annotations

import gc
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain

import numpy as np

from .types import CLASS_ID, CLASSES, DataError, Problem, Rendered, TokenizedExample, UsageError

# Loss modes are tables: class -> weight. `weighted` takes λ (the prompt weight) for system and user.
LOSS_MODES: dict[str, dict[str, float]] = {
    "it": {"template": 0.0, "system": 0.0, "user": 0.0, "assistant": 1.0, "eot": 1.0},
    "im": {"template": 0.0, "system": 1.0, "user": 1.0, "assistant": 1.0, "eot": 1.0},
    "all": {"template": 1.0, "system": 1.0, "user": 1.0, "assistant": 1.0, "eot": 1.0},
    "weighted": {"template": 0.0, "system": None, "user": None, "assistant": 1.0, "eot": 1.0},  # None = λ
}


@dataclass(frozen=True)
class LossSpec:
    """A resolved loss mode: the class -> weight table, and whether only the last assistant turn is the output."""

    mode: str
    table: dict[str, float]
    last_turn_only: bool = False

    @property
    def prompt_weight(self) -> float:
        return self.table["user"]

    def describe(self) -> str:
        w = ", ".join(f"{c}={self.table[c]:g}" for c in CLASSES)
        return f"{self.mode} ({w}{', last turn only' if self.last_turn_only else ''})"


def parse_weights(text: str | None) -> dict[str, float]:
    """`user=0.1,system=0` -> {"user": 0.1, "system": 0.0}."""
    out: dict[str, float] = {}
    for item in filter(None, (t.strip() for t in (text or "").split(","))):
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in CLASS_ID:
            raise UsageError(f"--weights: unknown class {name!r}; valid: {', '.join(CLASSES)}")
        try:
            out[name] = float(value)
        except ValueError:
            raise UsageError(f"--weights: {item!r}: the weight must be a number, e.g. {name}=0.1") from None
        if not np.isfinite(out[name]) or out[name] < 0:
            raise UsageError(f"--weights: {item!r}: weights must be finite and >= 0 (the loss trains only on "
                             "tokens of positive weight; a negative one would be silently ignored)")
    return out


def loss_spec(mode: str = "it", prompt_weight: float | None = None, weights: dict[str, float] | str | None = None,
              last_turn_only: bool = False) -> LossSpec:
    if mode not in LOSS_MODES:
        raise UsageError(f"unknown loss mode {mode!r}; valid: {', '.join(LOSS_MODES)}")
    table = dict(LOSS_MODES[mode])
    if mode == "weighted":
        if prompt_weight is None:
            raise UsageError("--loss weighted needs --prompt-weight λ (e.g. 0.1)")
    if prompt_weight is not None:
        if not (0.0 <= prompt_weight) or not np.isfinite(prompt_weight):
            raise UsageError("--prompt-weight must be a finite number >= 0 (the loss trains only on tokens of "
                             "positive weight; a negative one would be silently ignored)")
        if mode != "weighted":
            raise UsageError(f"--prompt-weight applies to --loss weighted (got --loss {mode})")
        table["user"] = table["system"] = float(prompt_weight)
    table.update(parse_weights(weights) if isinstance(weights, (str, type(None))) else weights)
    return LossSpec(mode, table, last_turn_only)


def weight_warnings(spec: LossSpec) -> list[str]:
    """Warnings about a loss table a person may not have meant: weights above 1 make those tokens count more than
    the output's (weight 1). The one check for every caller (inspect, train, compare's arms); negative weights never
    get this far (loss_spec and parse_weights refuse them)."""
    high = {c: w for c, w in spec.table.items() if w > 1}
    if not high:
        return []
    listed = ", ".join(f"{c}={w:g}" for c, w in high.items())
    return [f"warning: class weight(s) above 1 ({listed}) under --loss {spec.mode}: these tokens count more than "
            "the output tokens (weight 1) in the loss; the usual range is 0 to 1 (IM: 1, weighted: e.g. 0.1)"]


@dataclass
class TokenizeReport:
    """What tokenisation did besides producing examples: truncations and skips, with reasons."""

    n_in: int = 0
    truncated: int = 0
    dropped_too_long: list[Problem] = field(default_factory=list)
    dropped_no_weight: list[Problem] = field(default_factory=list)

    @property
    def n_skipped(self) -> int:
        return len(self.dropped_too_long) + len(self.dropped_no_weight)

    def summary(self) -> str:
        parts = [f"{self.n_in - self.n_skipped}/{self.n_in} examples kept"]
        if self.truncated:
            parts.append(f"{self.truncated} truncated to --max-length")
        if self.dropped_too_long:
            parts.append(f"{len(self.dropped_too_long)} dropped as longer than --max-length")
        if self.dropped_no_weight:
            parts.append(f"{len(self.dropped_no_weight)} skipped: no token carries loss weight")
        return ", ".join(parts)

    def as_dict(self) -> dict:
        return {"n_in": self.n_in, "n_kept": self.n_in - self.n_skipped, "truncated": self.truncated,
                "dropped_too_long": [str(p) for p in self.dropped_too_long],
                "dropped_no_weight": [str(p) for p in self.dropped_no_weight]}


def _class_ids(r: Rendered, offsets: np.ndarray, last_turn_only: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-token class ids and per-token 'is history' flags from character spans (see the module docstring).

    The reference for one example; encode() computes the same for a whole batch at once (tests compare the two)."""
    n_chars = len(r.text)
    char_cls = np.zeros(n_chars + 1, dtype=np.int8)  # +1: a sentinel for tokens that start at the end
    hist = np.zeros(n_chars + 1, dtype=np.int8)
    last_asst = max((s.turn for s in r.spans if s.cls == "assistant"), default=-1)
    for s in r.spans:
        char_cls[s.start:s.end] = CLASS_ID[s.cls]
        if last_turn_only and s.cls in ("assistant", "eot") and s.turn != last_asst:
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


def check_truncation(truncation: str) -> None:
    if truncation not in ("drop", "truncate"):
        raise UsageError(f"--truncation must be drop or truncate, not {truncation!r}")


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


def _batch_encode(texts: list[str], tokenizer) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    """ids and offsets of every text from one batched call, without special tokens.

    Calls the Rust backend directly when its state is what `tokenizer(texts, add_special_tokens=False)` would set
    (no truncation, no padding, special tokens recognised as such): the same encodings, without building transformers'
    BatchEncoding (~15% of the call). Otherwise, the ordinary call."""
    bk = getattr(tokenizer, "backend_tokenizer", None)
    split = bool(getattr(tokenizer, "split_special_tokens", False))
    if bk is not None and bk.truncation is None and bk.padding is None and bk.encode_special_tokens == split:
        encs = bk.encode_batch(texts, add_special_tokens=False)
        return [e.ids for e in encs], [e.offsets for e in encs]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False)
    return enc["input_ids"], enc["offset_mapping"]


def _tokens(texts: list[str], tokenizer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids [N] int32, start offset of every token [N] int64, tokens per text [K] int64) for all texts, from one
    batched call. (Chunking the call to overlap this conversion with the tokenizer in a worker thread was measured
    slower on a busy 2-core machine; see BENCHMARKS.md.)"""
    ids, offsets = _batch_encode(texts, tokenizer)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    n = int(lengths.sum())
    input_ids = np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=n)
    starts = np.fromiter(chain.from_iterable(chain.from_iterable(offsets)), dtype=np.int64, count=2 * n)[0::2]
    return input_ids, starts, lengths


def encode(rendered: list[Rendered], tokenizer) -> Encoded:
    """Tokenize every rendered text (one batched call) and give each token its class, for all examples at once.

    Equal to _class_ids per example: the texts are laid end to end, each followed by one sentinel character of class
    0, and one reduceat runs over all token starts plus one extra start at each sentinel (whose segment, covering the
    characters before the next example's first token, is dropped)."""
    input_ids, first, lengths = _tokens([r.text for r in rendered], tokenizer)
    n_chars = np.fromiter((len(r.text) for r in rendered), dtype=np.int64, count=len(rendered))
    base = np.concatenate([[0], np.cumsum(n_chars + 1)])  # text k starts at base[k]; its sentinel at base[k+1]-1
    char_cls = np.zeros(int(base[-1]), dtype=np.int8)
    hist = np.zeros(int(base[-1]), dtype=np.int8)
    for k, r in enumerate(rendered):
        b = int(base[k])
        last_asst = max((s.turn for s in r.spans if s.cls == "assistant"), default=-1)
        for s in r.spans:
            char_cls[b + s.start:b + s.end] = CLASS_ID[s.cls]
            if s.cls in ("assistant", "eot") and s.turn != last_asst:
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


def weigh(encoded: Encoded, rendered: list[Rendered], spec: LossSpec, max_length: int | None = None,
          truncation: str = "drop", on_empty: str = "skip") -> tuple[list[TokenizedExample], TokenizeReport]:
    """Encoded -> TokenizedExample: the loss mode's table applied, over-long examples dropped or truncated, and
    examples where no token carries weight skipped (or an error). See tokenize()."""
    check_truncation(truncation)
    report = TokenizeReport(n_in=len(rendered))
    if not rendered:
        return [], report
    table = np.array([spec.table[c] for c in CLASSES], dtype=np.float64)
    w = table[encoded.classes]
    if spec.last_turn_only:
        w = np.where(encoded.history.astype(bool), np.float64(spec.table["user"]), w)
    bounds = encoded.bounds.tolist()
    # weighted[t]: token t carries weight and is not its example's first token (nothing predicts that one)
    weighted = w > 0
    weighted[np.asarray(bounds[:-1])[encoded.lengths > 0]] = False
    n_weighted = np.concatenate([[0], np.cumsum(weighted)])
    ids_l, w_l, cls_l = encoded.input_ids.tolist(), w.tolist(), encoded.classes.tolist()
    out: list[TokenizedExample] = []
    for r, a, b in zip(rendered, bounds[:-1], bounds[1:]):
        n, truncated = b - a, False
        if max_length is not None and n > max_length:
            if truncation == "drop":
                report.dropped_too_long.append(
                    Problem(r.source, "", f"{n} tokens > --max-length {max_length}: dropped"))
                continue
            b, truncated = a + max_length, True
            report.truncated += 1
        if n_weighted[b] == n_weighted[a]:
            p = Problem(r.source, "", "no token carries loss weight under this loss mode"
                        + (" after truncation" if truncated else ""))
            if on_empty == "error":
                raise DataError([p])
            report.dropped_no_weight.append(p)
            continue
        out.append(TokenizedExample(ids_l[a:b], w_l[a:b], cls_l[a:b], r.source, truncated))
    return out, report


def tokenize(rendered: list[Rendered], tokenizer, spec: LossSpec, max_length: int | None = None,
             truncation: str = "drop", on_empty: str = "skip") -> tuple[list[TokenizedExample], TokenizeReport]:
    """Tokenize each rendered text once (in one batch call) and weight every token by its class.

    truncation: "drop" (skip over-long examples) or "truncate" (keep the first max_length tokens).
    on_empty: "skip" (count and report) or "error" when no token of an example carries weight."""
    check_truncation(truncation)
    with gc_paused():
        return weigh(encode(rendered, tokenizer), rendered, spec, max_length, truncation, on_empty)
