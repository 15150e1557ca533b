"""Data preparation: LIMA conversations -> token ids + loss weights, imtune vs TRL's own preparation vs the tokenizer.

Sides (each starts from the JSONL file, except the two tokenizer-only limits, which get the rendered texts):
  imtune         prepare_examples(lima.jsonl, tokenizer, loss "it", template = the tokenizer's own, cache off):
                 load, validate, render with exact spans, one batched tokenisation, classes and weights
  imtune-before  the same with weights.tokenize as it was before this work (the ordinary tokenizer call, then a
                 numpy pass per example): the before/after figure of the batched fast path
  imtune-cached  the same as imtune with the preparation cache on and holding the data (a repeated run)
  trl-assistant  TRL's SFTTrainer._prepare_dataset (its own code, unchanged) with assistant_only_loss=True on the
                 `messages` records: apply_chat_template per example with a copy of the same chat template that
                 marks assistant content + <|im_end|> with {% generation %}, so TRL renders the same text and masks
                 the same tokens imtune's `it` mode weighs (checked below, outside the timer)
  trl-completion the same with completion_only_loss=True on prompt/completion records (prompt = all messages but
                 the last; completion = the last assistant message): TRL tokenizes prompt and prompt+completion
  tokenizer      tokenizer(rendered_texts, add_special_tokens=False): the limit the goal refers to
  backend        tokenizer.backend_tokenizer.encode_batch(rendered_texts): the Rust tokenizer alone

Every side gets a freshly loaded tokenizer (loaded outside the timer), so none profits from another's warm BPE
cache. TOKENIZERS_PARALLELISM is on (the library default), so batched calls use every core; TRL's per-example
apply_chat_template inside datasets.map cannot. datasets' progress bars are off.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import types

sys.path.insert(0, os.path.dirname(__file__))
from common import GENERATION_TEMPLATE, LIMA, alternate, child_main, fresh_tokenizer, ratios, scratch  # noqa: E402


def read_records() -> list[dict]:
    with open(LIMA, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def trl_prepare(tok, mode: str):
    """TRL's own preparation, as SFTTrainer.__init__ runs it (minus building the model)."""
    from datasets import Dataset
    from trl import SFTTrainer

    records = read_records()
    if mode == "assistant":
        ds = Dataset.from_list([{"messages": r["messages"]} for r in records])
    else:
        ds = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in records])
    args = _trl_args(mode)
    # The three attributes _prepare_dataset reads from the trainer, as __init__ sets them for these arguments.
    stub = types.SimpleNamespace(_tokenizer=tok, completion_only_loss=(mode == "completion"), chat_template=None)
    return SFTTrainer._prepare_dataset(stub, ds, tok, args, False, None, "train")


_ARGS: dict = {}


def _trl_args(mode: str):
    if mode not in _ARGS:
        from trl import SFTConfig

        _ARGS[mode] = SFTConfig(output_dir=tempfile.mkdtemp(prefix="trl-bench-"), report_to=[], max_length=None,
                                assistant_only_loss=(mode == "assistant"),
                                completion_only_loss=(mode == "completion"), use_cpu=True)
    return _ARGS[mode]


def imtune_prepare(tok, cache: bool):
    from imtune.data.prepare import prepare_examples
    from imtune.data.weights import loss_spec

    return prepare_examples(str(LIMA), tok, loss_spec("it"), cache=cache)


def imtune_before(tok):
    """prepare_examples with the tokenize() that preceded the batched fast path (kept here as the 'before')."""
    import numpy as np

    from imtune.data.prepare import load
    from imtune.data.templates import Renderer
    from imtune.data.tokenize import _class_ids
    from imtune.data.weights import loss_spec
    from imtune.types import CLASSES, TokenizedExample

    spec = loss_spec("it")
    convs, _ = load(str(LIMA))
    renderer = Renderer(None, tok)
    rendered = [renderer.render(c) for c in convs]
    enc = tok([r.text for r in rendered], add_special_tokens=False, return_offsets_mapping=True,
              return_attention_mask=False)
    table = np.array([spec.table[c] for c in CLASSES], dtype=np.float64)
    out = []
    for r, ids, offs in zip(rendered, enc["input_ids"], enc["offset_mapping"]):
        cls, _ = _class_ids(r, np.asarray(offs, dtype=np.int64).reshape(-1, 2), False)
        w = table[cls]
        if (w[1:] > 0).any():
            out.append(TokenizedExample(list(ids), w.tolist(), cls.tolist(), r.source, False))
    return out


def check_same_work(texts, tok) -> dict:
    """Outside the timer: TRL renders the same texts and trains the same tokens as imtune `it` (or says how not)."""
    prep = imtune_prepare(fresh_tokenizer(), cache=False)
    trl_a = trl_prepare(fresh_tokenizer(GENERATION_TEMPLATE), "assistant")
    trl_c = trl_prepare(fresh_tokenizer(GENERATION_TEMPLATE), "completion")
    t = fresh_tokenizer(GENERATION_TEMPLATE)
    same_text = all(t.apply_chat_template(r["messages"], tokenize=False) == x for r, x in zip(read_records(), texts))
    out = {"same_rendered_text": same_text, "examples": len(prep.examples),
           "tokens": int(sum(len(e) for e in prep.examples))}
    for name, ds in (("trl-assistant", trl_a), ("trl-completion", trl_c)):
        same_ids = same_mask = 0
        for e, row in zip(prep.examples, ds):
            ids, labels = row["input_ids"], row["labels"]
            same_ids += ids == e.input_ids.tolist()
            same_mask += ids == e.input_ids.tolist() and ([lab != -100 for lab in labels]
                                                          == [w > 0 for w in e.weights.tolist()])
        out[name] = {"same_ids": same_ids, "same_trained_tokens": same_mask, "of": len(prep.examples)}
    return out


def main(repeats: int = 3) -> dict:
    with scratch("imtune-bench-cache-") as cache:  # imtune's cache for this run only (imtune-cached reads it)
        os.environ["IMTUNE_CACHE"] = cache
        return measure(repeats)


def measure(repeats: int) -> dict:
    import datasets

    datasets.disable_progress_bars()
    from imtune.data.prepare import load
    from imtune.data.templates import Renderer

    tok0 = fresh_tokenizer()
    texts = [Renderer(None, tok0).render(c).text for c in load(str(LIMA))[0]]
    n_tokens = sum(len(x) for x in tok0(texts, add_special_tokens=False)["input_ids"])
    same = check_same_work(texts, tok0)
    imtune_prepare(fresh_tokenizer(), cache=True)  # fills the cache for imtune-cached

    sides = {
        "imtune": lambda tok: imtune_prepare(tok, cache=False),
        "imtune-before": imtune_before,
        "imtune-cached": lambda tok: imtune_prepare(tok, cache=True),
        "trl-assistant": lambda tok: trl_prepare(tok, "assistant"),
        "trl-completion": lambda tok: trl_prepare(tok, "completion"),
        "tokenizer": lambda tok: tok(texts, add_special_tokens=False),
        "backend": lambda tok: tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False),
    }
    for mode in ("assistant", "completion"):
        _trl_args(mode)  # build the configs outside the timer
    times = alternate(sides, repeats,
                      setup=lambda n: fresh_tokenizer(GENERATION_TEMPLATE if n.startswith("trl") else None))
    trl_best = [min(a, b) for a, b in zip(times["trl-assistant"], times["trl-completion"])]
    r = {
        "n_examples": len(texts), "n_tokens": n_tokens, "repeats": repeats, "same_work": same,
        "seconds": {k: v for k, v in times.items()},
        "tokens_per_s": {k: [n_tokens / t for t in v] for k, v in times.items()},
        # speedups > 1 mean imtune is faster; "over_limit" is imtune's time / the tokenizer's (goal <= 1.3)
        "speedup_vs_trl": ratios(trl_best, times["imtune"]).as_dict(),
        "speedup_vs_trl_assistant": ratios(times["trl-assistant"], times["imtune"]).as_dict(),
        "speedup_vs_trl_completion": ratios(times["trl-completion"], times["imtune"]).as_dict(),
        "imtune_over_tokenizer": ratios(times["imtune"], times["tokenizer"]).as_dict(),
        "imtune_over_backend": ratios(times["imtune"], times["backend"]).as_dict(),
        "before_over_tokenizer": ratios(times["imtune-before"], times["tokenizer"]).as_dict(),
        "speedup_vs_before": ratios(times["imtune-before"], times["imtune"]).as_dict(),
        "cached_over_tokenizer": ratios(times["imtune-cached"], times["tokenizer"]).as_dict(),
        "speedup_cached_vs_trl": ratios(trl_best, times["imtune-cached"]).as_dict(),
        "trl_over_tokenizer": ratios(trl_best, times["tokenizer"]).as_dict(),
        "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM", "(unset: on)"),
    }
    return r


if __name__ == "__main__":
    child_main(main)
    print(json.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else 3), indent=1))
