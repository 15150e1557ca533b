"""compare's data: every arm trains on the same file and is evaluated on the same held-out file.

    materialise_data(settings, COMPARE_DIR) -> {paths, conversations, counts, stats, steps}
      COMPARE_DIR/data/train.jsonl, heldout.jsonl, val.jsonl (selects best/), test.jsonl (scores every run)

Deterministic for a seed; written in the `messages` format; data that arms were trained on is never overwritten with
other data. fixed_sample gives every arm the same evaluation sample."""
from __future__ import annotations

import json
import os
from pathlib import Path

from imtune import files
from imtune.analysis.stats import dataset_stats
from imtune.config import TrainConfig
from imtune.console import say
from imtune.data.prepare import DataSpec, load, tokenize_chunks
from imtune.data.templates import Renderer
from imtune.data.tokenize import Encoded
from imtune.data.weights import loss_spec, weigh
from imtune.experiments.arms import CompareSettings
from imtune.model.models import load_tokenizer
from imtune.train.plan import micro_batches_per_epoch, schedule
from imtune.types import Conversation, UsageError


def materialise_data(s: CompareSettings, out: Path) -> dict:
    """Load F (format, fields, limit as given), split off the held-out part unless G is given, and write both in the
    `messages` format to COMPARE_DIR/data/. Deterministic for a seed; refuses to overwrite different data that arms
    were trained on. Also measures F (imtune.analysis.stats) and estimates the optimizer steps (for the eval
    cadence). The records are read once and tokenized once."""
    import numpy as np

    b = s.base
    if not b.data:
        raise UsageError("no training data: give --data FILE")
    convs, skipped = load(b.data, b.format, b.fields, b.on_invalid, b.limit, roles=b.roles)
    if skipped:
        say(f"compare: {len(skipped)} invalid records of {b.data} skipped (first: {skipped[0]})")
    if b.eval_data:
        train, heldout = convs, load(b.eval_data, b.format, b.fields, b.on_invalid, roles=b.roles)[0]
        split = {"kind": "given", "heldout_source": b.eval_data}
    else:
        if not 0 < s.heldout_fraction < 1:
            raise UsageError(f"--heldout-fraction must be between 0 and 1, not {s.heldout_fraction}")
        if len(convs) < 2:
            raise UsageError(f"{b.data}: {len(convs)} example(s): too few to split off held-out data; give --eval-data")
        k = min(len(convs) - 1, max(1, round(s.heldout_fraction * len(convs))))
        pick = set(np.random.default_rng([b.seed, 1717]).permutation(len(convs))[:k].tolist())
        train = [c for i, c in enumerate(convs) if i not in pick]
        heldout = [c for i, c in enumerate(convs) if i in pick]
        split = {"kind": "split", "heldout_fraction": s.heldout_fraction, "seed": b.seed}
    if not heldout:
        raise UsageError(f"{b.eval_data}: no held-out examples")
    tok = load_tokenizer(b.model)
    renderer = Renderer(b.template, tok, b.system_prompt)
    val, test, split["val"] = validation_split(s, heldout)
    # One tokenisation of the records (the trainer's own: render, one batched encode, through the preparation cache),
    # one part per file the runs read (train, and val/test where they come from F), so a run's preparation of its
    # file meets the same cache entries (data under cache.MIN_CHARS is not cached: tokenizing it is faster). The
    # stats measure these tokens, untruncated; the training part is weighed from them (imtune.data.weights.weigh).
    from_f = [] if b.eval_data else [part for part in (val if not s.val_data else [], test) if part]
    spec = DataSpec.of(b)
    parts = [(convs_, tokenize_chunks(convs_, renderer, tok, None, b.truncation, spec.cache,
                                      spec.special_tokens_in_content)) for convs_ in (train, *from_f)]
    tokenized = parts[0][1]
    # Every arm must see the same examples: keep only those IT can train on (an output token within --max-length);
    # any other arm could train on them too. The trainer would drop the rest for IT alone.
    examples, report = weigh(tokenized.encoded, tokenized.sources, loss_spec("it"), b.max_length, b.truncation)
    report.dropped_unfit, report.n_in = tokenized.unfit, report.n_in + len(tokenized.unfit)
    kept = set(examples.sources)
    dropped = [str(c.source) for c in train if c.source not in kept]
    train = [c for c in train if c.source in kept]
    if dropped:
        say(f"compare: {len(dropped)} training examples left out for every arm ({report.summary()})")
    if not train:
        raise UsageError(f"{b.data}: no training example has an output token within --max-length {b.max_length}")
    paths = {}
    for name, part in (("train", train), ("heldout", heldout), ("val", val), ("test", test)):
        paths[name] = write_conversations(out / "data" / f"{name}.jsonl", part, out) if part else None
    measured = [[c for c in convs_ if c.source in tokenized_] for convs_, tokenized_ in
                ((convs_, set(t.sources)) for convs_, t in parts)]  # what was tokenized: all but records too long
    stats = dataset_stats([c for m in measured for c in m], tok, renderer, "tokens", b.max_length,
                          Encoded.join([t.encoded for _, t in parts]))
    return {"source": b.data, "format": b.format, "limit": b.limit, "records": len(convs),
            "skipped": [str(p) for p in skipped], "split": split, "n_train": len(train), "n_heldout": len(heldout),
            "n_val": len(val), "n_test": len(test), "dropped_train": dropped, "train_path": str(paths["train"]),
            "heldout_path": str(paths["heldout"]), "test_path": str(paths["test"]),
            "val_path": str(paths["val"]) if paths["val"] else None,
            "stats": stats, "steps": estimate_steps(b, examples), "train": train, "heldout": heldout, "val": val,
            "test": test}


def validation_split(s: CompareSettings, heldout: list[Conversation]) -> tuple[list, list, dict]:
    """(val, test, how): the validation part selects each run's best checkpoint, the test part scores every run.
    They never share an example: --val-data that repeats a held-out example is refused."""
    import numpy as np

    b = s.base
    key = lambda c: tuple((m.role, m.content) for m in c.messages)  # noqa: E731
    if s.val_data:
        val = load(s.val_data, b.format, b.fields, b.on_invalid, roles=b.roles)[0]
        both = {key(c) for c in val} & {key(c) for c in heldout}
        if both:
            raise UsageError(f"{s.val_data}: {len(both)} example(s) also in the held-out data; selection must never "
                             "see the data it is scored on: remove them or drop --val-data")
        return val, heldout, {"kind": "given", "source": s.val_data}
    if not 0 <= s.val_fraction < 1:
        raise UsageError(f"--val-fraction must be >= 0 and < 1, not {s.val_fraction}")
    if s.val_fraction == 0 or len(heldout) < 2:
        why = "--val-fraction 0" if s.val_fraction == 0 else "one held-out example: too few to split"
        return [], heldout, {"kind": "none", "why": why}
    k = min(len(heldout) - 1, max(1, round(s.val_fraction * len(heldout))))
    pick = set(np.random.default_rng([b.seed, 2929]).permutation(len(heldout))[:k].tolist())
    return ([c for i, c in enumerate(heldout) if i in pick], [c for i, c in enumerate(heldout) if i not in pick],
            {"kind": "split", "val_fraction": s.val_fraction, "seed": b.seed})


def write_conversations(path: Path, convs: list[Conversation], root: Path) -> Path:
    """`convs` in the `messages` format at `path` (inside the imtune directory `root`), unless a file there holds
    other data that arms were trained on."""
    text = "".join(json.dumps({"source": str(c.source), "messages": [{"role": m.role, "content": m.content}
                                                                      for m in c.messages]}, ensure_ascii=False) + "\n"
                   for c in convs)
    files.check_target(path, root)
    if path.exists() and path.read_text(encoding="utf-8") != text:
        if any((path.parent.parent / "arms").glob("*/config.yaml")):
            raise UsageError(f"{path} holds other data than this command makes (another --data, --limit, "
                             "--heldout-fraction or --seed?), and arms were trained on it; give another --out")
    return files.write_text(path, text, root)  # every process may write: the same bytes, an atomic rename


def estimate_steps(b: TrainConfig, examples) -> int:
    """Optimizer steps the trainer will take on `examples` (for the eval cadence and the --budget cap): the trainer's
    own arithmetic (imtune.train.plan), on as many processes as this command runs in."""
    return schedule(b, micro_batches_per_epoch(b, examples), int(os.environ.get("WORLD_SIZE", "1"))).total_steps


def fixed_sample(items: list, n: int | None, seed: int, salt: int) -> list:
    """The same n items for every arm (sorted back into file order); all of them when n is None or >= len."""
    import numpy as np

    if n is None or n >= len(items):
        return list(items)
    pick = np.random.default_rng([seed, salt]).permutation(len(items))[:n]
    return [items[i] for i in sorted(pick.tolist())]
