"""Rendered -> TokenizedExample: one tokenisation of the rendered text, a class per token, a weight per class.

The rule for a token that covers characters of several classes: it takes the highest class among them in the order
eot > assistant > user > system > template (types.CLASSES, last wins). So every token that holds any data content
carries its content's weight, and only tokens made purely of template text are `template`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

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
            raise UsageError(f"--weights: {item!r}: weights must be finite and >= 0")
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
            raise UsageError("--prompt-weight must be a finite number >= 0")
        if mode != "weighted":
            raise UsageError(f"--prompt-weight applies to --loss weighted (got --loss {mode})")
        table["user"] = table["system"] = float(prompt_weight)
    table.update(parse_weights(weights) if isinstance(weights, (str, type(None))) else weights)
    return LossSpec(mode, table, last_turn_only)


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
    """Per-token class ids and per-token 'is history' flags from character spans (see the module docstring)."""
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


def tokenize(rendered: list[Rendered], tokenizer, spec: LossSpec, max_length: int | None = None,
             truncation: str = "drop", on_empty: str = "skip") -> tuple[list[TokenizedExample], TokenizeReport]:
    """Tokenize each rendered text once (in one batch call) and weight every token by its class.

    truncation: "drop" (skip over-long examples) or "truncate" (keep the first max_length tokens).
    on_empty: "skip" (count and report) or "error" when no token of an example carries weight."""
    if truncation not in ("drop", "truncate"):
        raise UsageError(f"--truncation must be drop or truncate, not {truncation!r}")
    report = TokenizeReport(n_in=len(rendered))
    if not rendered:
        return [], report
    enc = tokenizer([r.text for r in rendered], add_special_tokens=False, return_offsets_mapping=True,
                    return_attention_mask=False)
    table = np.array([spec.table[c] for c in CLASSES], dtype=np.float64)
    hist_w = np.float64(spec.table["user"])
    out: list[TokenizedExample] = []
    for r, ids, offs in zip(rendered, enc["input_ids"], enc["offset_mapping"]):
        offsets = np.asarray(offs, dtype=np.int64).reshape(-1, 2)
        cls, hist = _class_ids(r, offsets, spec.last_turn_only)
        w = np.where(hist.astype(bool), hist_w, table[cls]) if spec.last_turn_only else table[cls]
        truncated = False
        if max_length is not None and len(ids) > max_length:
            if truncation == "drop":
                report.dropped_too_long.append(
                    Problem(r.source, "", f"{len(ids)} tokens > --max-length {max_length}: dropped"))
                continue
            ids, cls, w, truncated = ids[:max_length], cls[:max_length], w[:max_length], True
            report.truncated += 1
        if not (w[1:] > 0).any():
            p = Problem(r.source, "", "no token carries loss weight under this loss mode"
                        + (" after truncation" if truncated else ""))
            if on_empty == "error":
                raise DataError([p])
            report.dropped_no_weight.append(p)
            continue
        out.append(TokenizedExample(list(ids), w.tolist(), cls.tolist(), r.source, truncated))
    return out, report
