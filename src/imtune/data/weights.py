"""Encoded -> Examples: the loss mode's class -> weight table applied to every token of one tokenisation.

Tokenisation (imtune.data.tokenize) gives every token a class; this module owns the loss modes (tables of class ->
weight), applies one to the tokens, drops or truncates examples longer than --max-length, and skips examples where no
token carries weight. The result is types.Examples: flat numpy arrays (a few bytes a token), never per-token Python
lists (those cost ~25 bytes a token more: gigabytes on a million records).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from imtune.data.tokenize import Encoded
from imtune.types import CLASS_ID, CLASSES, DataError, Examples, Problem, Sources, UsageError, Where

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
    # examples whose content spells a control token, and what --special-tokens-in-content did (split / keep)
    content_specials: list[Problem] = field(default_factory=list)
    special_tokens_in_content: str = "split"
    dropped_unfit: list[Problem] = field(default_factory=list)  # too many characters to ever fit --max-length

    @property
    def n_skipped(self) -> int:
        return len(self.dropped_too_long) + len(self.dropped_no_weight) + len(self.dropped_unfit)

    def summary(self) -> str:
        parts = [f"{self.n_in - self.n_skipped}/{self.n_in} examples kept"]
        if self.truncated:
            parts.append(f"{self.truncated} truncated to --max-length")
        if self.dropped_too_long:
            parts.append(f"{len(self.dropped_too_long)} dropped as longer than --max-length")
        if self.dropped_unfit:
            parts.append(f"{len(self.dropped_unfit)} dropped before tokenizing: too many characters to fit "
                         "--max-length")
        if self.dropped_no_weight:
            parts.append(f"{len(self.dropped_no_weight)} skipped: no token carries loss weight")
        if self.content_specials:
            how = ("tokenized as plain text" if self.special_tokens_in_content == "split"
                   else "kept as control tokens")
            parts.append(f"{len(self.content_specials)} with content that spells a control token ({how}; first: "
                         f"{self.content_specials[0].where})")
        return ", ".join(parts)

    def as_dict(self) -> dict:
        return {"n_in": self.n_in, "n_kept": self.n_in - self.n_skipped, "truncated": self.truncated,
                "dropped_too_long": [str(p) for p in self.dropped_too_long],
                "dropped_no_weight": [str(p) for p in self.dropped_no_weight],
                "dropped_unfit": [str(p) for p in self.dropped_unfit],
                "special_tokens_in_content": self.special_tokens_in_content,
                "content_specials": len(self.content_specials),
                "content_specials_first": [str(p) for p in self.content_specials[:20]]}


def check_truncation(truncation: str) -> None:
    if truncation not in ("drop", "truncate"):
        raise UsageError(f"--truncation must be drop or truncate, not {truncation!r}")



def weigh(encoded: Encoded, sources: Sequence[Where], spec: LossSpec, max_length: int | None = None,
          truncation: str = "drop", on_empty: str = "skip") -> tuple[Examples, TokenizeReport]:
    """Encoded (and each example's source) -> Examples: the loss mode's table applied, over-long examples dropped or
    truncated, and examples where no token carries weight skipped (on_empty "skip", counted) or refused (on_empty
    "error"). All in numpy; no temporary larger than a byte a token besides the weights themselves."""
    check_truncation(truncation)
    report = TokenizeReport(n_in=len(sources))
    table = np.array([spec.table[c] for c in CLASSES], dtype=np.float64)
    w = table[encoded.classes]  # [N] float64: the exact table values (collate casts to float32, as ever)
    if spec.last_turn_only:
        w = np.where(encoded.history.astype(bool), np.float64(spec.table["user"]), w)
    bounds = encoded.bounds
    starts, ends, lengths = bounds[:-1], bounds[1:].copy(), encoded.lengths
    keep = np.ones(len(sources), dtype=bool)
    truncated = np.zeros(len(sources), dtype=bool)
    if max_length is not None:
        over = lengths > max_length
        if truncation == "drop":
            keep &= ~over
            report.dropped_too_long = [Problem(sources[k], "", f"{lengths[k]} tokens > --max-length "
                                               f"{max_length}: dropped") for k in np.flatnonzero(over)]
        else:
            ends[over] = starts[over] + max_length
            truncated, report.truncated = over, int(over.sum())
    # weighted[t]: token t carries weight and is not its example's first token (nothing predicts that one); any of
    # them in each example's [start, end), by one logical_or.reduceat over interleaved bounds (a sentinel makes
    # index N valid). Bools throughout: an add.reduceat to int64 casts all of them first (8 bytes a token).
    weighted = np.zeros(len(w) + 1, dtype=bool)  # one array, not w > 0 and its appended copy (a byte a token each)
    np.greater(w, 0, out=weighted[:-1])
    weighted[starts[lengths > 0]] = False
    has_weight = np.logical_or.reduceat(weighted, np.stack([starts, ends], 1).ravel())[0::2]
    has_weight[ends == starts] = False  # reduceat gives the element itself for an empty range
    del weighted
    for k in np.flatnonzero(keep & ~has_weight):
        p = Problem(sources[k], "", "no token carries loss weight under this loss mode"
                    + (" after truncation" if truncated[k] else ""))
        if on_empty == "error":
            raise DataError([p])
        report.dropped_no_weight.append(p)
        keep[k] = False
    # The kept tokens: +1 where a kept example's range starts, -1 where it ends; the running sum marks them.
    if keep.all() and not truncated.any():
        tokens = slice(None)
    else:
        edge = np.zeros(len(w) + 1, dtype=np.int8)
        np.add.at(edge, starts[keep], 1)
        np.add.at(edge, ends[keep], -1)
        tokens = np.cumsum(edge[:-1], dtype=np.int8).astype(bool)
    kept = np.flatnonzero(keep)
    examples = Examples(input_ids=encoded.input_ids[tokens], weights=w[tokens], classes=encoded.classes[tokens],
                        bounds=np.concatenate([[0], np.cumsum(ends[kept] - starts[kept])]).astype(np.int64),
                        sources=Sources.of(sources).select(kept), truncated=truncated[kept])
    return examples, report
