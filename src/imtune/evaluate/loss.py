"""Per-token-class loss of any model on any data: the paper's overfitting measure.

Every token of every example is scored once (the NLL of predicting it from the tokens before it) and the NLLs are
summed by the token's class. `output` = assistant + eot (the tokens IT trains on), `instruction` = user + system;
`template` tokens (role tags) are reported per class only. Means are per token over the whole data set (micro
average), so long outputs weigh more than short ones, exactly as in training."""
from __future__ import annotations

import math
from pathlib import Path

from imtune.data.pack import collate
from imtune.data.prepare import DataSpec, prepare_examples
from imtune.data.weights import loss_spec
from imtune.model.objective import Objective, score_examples
from imtune.types import CLASSES, INSTRUCTION, OUTPUT, Conversation

GROUPS: dict[str, tuple[str, ...]] = {
    "output": OUTPUT,
    "instruction": INSTRUCTION,
    "all": CLASSES,
}


def _stat(nll_sum: float, tokens: int) -> dict:
    if tokens == 0:
        return {"nll": None, "ppl": None, "tokens": 0}
    mean = nll_sum / tokens
    return {"nll": mean, "ppl": math.exp(min(mean, 700.0)), "tokens": int(tokens)}


def class_sums(model, examples, pad_id: int, batch_size: int = 8,
               progress: bool = False, per_example: bool = False) -> tuple:
    """Sum of NLL and number of tokens per class (indexed like CLASSES) over `examples` (TokenizedExample).

    Token 0 of an example is never predicted, so it counts nowhere. Examples are batched by length, right-padded,
    and scored by the one evaluation loop training uses (model.objective.score_examples) through an Objective around
    the model. per_example=True also returns the same sums per example, [n][len(CLASSES)] each, in the order of
    `examples` (the paired intervals of imtune.analysis.evidence resample them)."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]))  # similar lengths share a batch
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    device = next(model.parameters()).device
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(batches), desc="loss", unit="batch")
    try:
        scores = score_examples(Objective(model, chunk_size=1024, neftune_alpha=0.0), examples, batches,
                                lambda idx, ex: collate([ex[i] for i in idx], packed=False, pad_id=pad_id).to(device),
                                CLASSES, on_batch=None if bar is None else bar.update)
    finally:
        if bar is not None:
            bar.close()
    sums, counts = scores.totals()
    if per_example:
        return sums, counts, scores.nll, scores.tokens
    return sums, counts


def summarize(sums: list[float], counts: list[int]) -> dict:
    """Class sums -> {"output": {...}, "instruction": {...}, "all": {...}, "per_class": {cls: {...}}}."""
    out = {}
    for group, members in GROUPS.items():
        idx = [CLASSES.index(c) for c in members]
        out[group] = _stat(sum(sums[i] for i in idx), sum(counts[i] for i in idx))
    out["per_class"] = {c: _stat(sums[i], counts[i]) for i, c in enumerate(CLASSES)}
    return out


def evaluate_loss(model, tokenizer, renderer, data: str | Path | list[Conversation], max_length: int | None = None,
                  batch_size: int = 8, limit: int | None = None, truncation: str = "truncate", format: str = "auto",
                  fields: dict | None = None, on_invalid: str = "error", progress: bool = False,
                  per_example: bool = False, special_tokens_in_content: str = "split") -> dict:
    """Mean NLL and perplexity per token class of `model` on `data` (a path/hub spec or conversations).

    Returns {"n", "tokens", "output": {"nll", "ppl", "tokens"}, "instruction": {...}, "all": {...},
    "per_class": {class: {...}}, "truncated", "skipped"}. Over-long examples are truncated to `max_length` by
    default (truncation="drop" leaves them out); either way the count is reported. per_example=True adds
    "per_example": {"source": [str], "output_nll": [Σ nll of output tokens], "output_tokens": [count]} per scored
    example, in data order. The examples are rendered by `renderer` (its template and system prompt)."""
    # Loss mode `all` weights every class, so no example is left out for lack of weight; weights are unused here.
    reading = DataSpec(template=renderer.name, max_length=max_length, truncation=truncation, format=format,
                       fields=fields, on_invalid=on_invalid, limit=limit,
                       special_tokens_in_content=special_tokens_in_content, system_prompt=renderer.system_prompt)
    prep = prepare_examples(list(data) if isinstance(data, (list, tuple)) else str(data), tokenizer,
                            loss_spec("all"), reading)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sums, counts, *ex = class_sums(model, prep.examples, pad_id, batch_size, progress, per_example)
    result = {"n": len(prep.examples), "tokens": int(sum(len(e) for e in prep.examples))}
    result.update(summarize(sums, counts))
    if per_example:
        idx = [CLASSES.index(c) for c in GROUPS["output"]]
        result["per_example"] = {"source": [str(e.source) for e in prep.examples],
                                 "output_nll": [sum(r[i] for i in idx) for r in ex[0]],
                                 "output_tokens": [int(sum(r[i] for i in idx)) for r in ex[1]]}
    result["truncated"] = prep.report.truncated
    result["skipped"] = [str(p) for p in prep.load_skipped] + prep.report.as_dict()["dropped_too_long"] \
        + prep.report.as_dict()["dropped_no_weight"]
    return result


def gap(train: dict, heldout: dict) -> dict:
    """Held-out minus train mean NLL, per group and per class: the paper's overfitting gap (IM narrows it on
    outputs). None where either side has no tokens."""
    diff = lambda a, b: None if a["nll"] is None or b["nll"] is None else b["nll"] - a["nll"]  # noqa: E731
    out = {g: diff(train[g], heldout[g]) for g in GROUPS}
    out["per_class"] = {c: diff(train["per_class"][c], heldout["per_class"][c]) for c in CLASSES}
    return out
