"""Exact match of a greedy answer against the reference: the answer normalised (case, spaces, a final full stop)."""
from __future__ import annotations

from imtune.types import Conversation


def normalize(text: str) -> str:
    """What exact match compares: whitespace collapsed and stripped, case-folded, trailing periods removed."""
    return " ".join(text.split()).casefold().rstrip(".").rstrip()


def exact_match(prediction: str, reference: str) -> bool:
    return normalize(prediction) == normalize(reference)


def exact_match_rate(predictions: list[str], heldout: list[Conversation]) -> float:
    """Share of predictions that exactly match the last assistant message of each held-out conversation."""
    if len(predictions) != len(heldout):
        raise ValueError(f"{len(predictions)} predictions for {len(heldout)} held-out examples")
    refs = [c.messages[-1].content for c in heldout]
    return sum(map(exact_match, predictions, refs)) / max(len(refs), 1)
