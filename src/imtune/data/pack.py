"""TokenizedExample -> Batch: packing into padding-free rows, or one right-padded row per example.

The label shift happens here, once. In every row, position t predicts `labels[t]` = the next token of the SAME
example, with `weights[t]` = that token's weight and `classes[t]` = its class. The last token of an example predicts
nothing (label -100), so no label ever crosses from one packed example into the next.

Attention in packed rows. `position_ids` restart at 0 for every example and `attention_mask` is None. transformers 5
(masking_utils.find_packed_sequence_indices) then splits the row wherever position_ids do not step by +1 and builds
a block-diagonal causal mask (sdpa, eager, flex; flash-attention derives varlen boundaries from position_ids but
only for a single row: see model_inputs(flat=True)). It does so ONLY when attention_mask is None AND there is no KV
cache: llama's config has use_cache=True, and a model called with the default use_cache silently creates a
DynamicCache, skips packed-sequence detection and lets attention leak across examples. So model_inputs() always
passes use_cache=False. tests/test_pack.py proves packed == one at a time (and that the leak would be caught).

A packed row shorter than the longest row of its batch is padded at the end with `pad_id` tokens whose position_ids
restart at 0 (so they form their own block and are never attended by real tokens), label -100 and weight 0.

Units. pack_examples() gives bins of example indices (one bin = one packed row). make_batches() gives the micro-batches
of an epoch as lists of example indices: `batch_size` examples each when padded, `batch_size` packed rows (bins) each
when packed. collate() turns one such list into a Batch. split_passes() cuts one into passes of whole rows of at
most N positions (--micro-batch-tokens: the trainer runs a micro-batch as several forward/backward passes).
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import numpy as np
import torch

from imtune.types import Examples, TokenizedExample, UsageError

IGNORE = -100  # label of positions that predict nothing (torch's cross_entropy ignore_index)
GROUP_WINDOW = 16  # packed micro-batches are formed from bins of similar length within windows of this many


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [B, T] long
    labels: torch.Tensor  # [B, T] long: the token predicted at each position (input_ids shifted left); -100 where none
    weights: torch.Tensor  # [B, T] float32: weight of predicting labels[b, t]; 0 where labels == -100
    position_ids: torch.Tensor  # [B, T] long, restarting at 0 for every example (and for a padded tail)
    attention_mask: torch.Tensor | None  # [B, T] long for padded batches; None for packed rows (see module docstring)
    classes: torch.Tensor  # [B, T] int8: class id (imtune.types.CLASSES) of the label token; -1 where none
    n_tokens: int  # real (non-padding) tokens in the batch
    n_examples: int

    def to(self, device) -> Batch:
        """The same batch with every tensor on `device`."""
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.input_ids), move(self.labels), move(self.weights), move(self.position_ids),
                     move(self.attention_mask), move(self.classes), self.n_tokens, self.n_examples)

    @property
    def padding_fraction(self) -> float:
        """Share of the B*T positions that are padding (compute spent on nothing)."""
        return 1.0 - self.n_tokens / max(1, self.input_ids.numel())


def lengths_of(examples: Examples | list[TokenizedExample]) -> list[int]:
    """Tokens per example: read off the flat bounds of an Examples (no example object made), else len() of each."""
    return examples.lengths.tolist() if isinstance(examples, Examples) else [len(e) for e in examples]


def _check_lengths(lengths: list[int], max_length: int, examples) -> None:
    for i, n in enumerate(lengths):
        if n > max_length:
            raise UsageError(f"{examples[i].source}: example has {n} tokens, more than max_length {max_length}; "
                             f"tokenize with the same --max-length (--truncation drop or truncate)")


def pack_examples(examples: Examples | list[TokenizedExample], max_length: int) -> list[list[int]]:
    """Best-fit-decreasing: bins of example indices, each bin's total length <= max_length. Deterministic.

    Examples go in decreasing length (ties: lower index first) into the open bin with the least room that still
    fits (ties: the older bin), else into a new bin. Bins are returned in opening order, each listing its examples in
    insertion order, so a bin's first example is its longest (collate's next-fit relies on this, see make_batches)."""
    lengths = lengths_of(examples)
    _check_lengths(lengths, max_length, examples)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, bin id): bisect finds the tightest fit in O(log n)
    for i in order:
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k == len(free):  # fits nowhere: open a new bin
            bins.append([i])
            bisect.insort(free, (max_length - lengths[i], len(bins) - 1))
        else:
            room, b = free.pop(k)
            bins[b].append(i)
            bisect.insort(free, (room - lengths[i], b))
    return bins


def _next_fit(lengths: list[int], max_length: int | None) -> list[list[int]]:
    """Split positions 0..n-1 into consecutive rows, starting a new row when the next example does not fit."""
    rows: list[list[int]] = [[]]
    used = 0
    for i, n in enumerate(lengths):
        if max_length is not None and rows[-1] and used + n > max_length:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


def _shifted(e: TokenizedExample) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One example's (input_ids, labels, weights, classes), each [n], labels/weights/classes shifted left by one."""
    ids = np.asarray(e.input_ids, dtype=np.int64)
    labels = np.append(ids[1:], IGNORE)
    weights = np.append(np.asarray(e.weights[1:], dtype=np.float32), np.float32(0))
    classes = np.append(np.asarray(e.classes[1:], dtype=np.int8), np.int8(-1))
    return ids, labels, weights, classes


def collate(examples: Examples | list[TokenizedExample], packed: bool, max_length: int | None = None,
            pad_id: int = 0) -> Batch:
    """A Batch from examples.

    packed: the examples are concatenated, in the given order, into rows of at most `max_length` tokens (next-fit: a
      new row starts when the next example does not fit; max_length=None: one row). One bin of pack_examples gives
      exactly one row; a micro-batch from make_batches gives exactly its bins. attention_mask is None.
    padded: one row per example, right-padded with pad_id (label -100, weight 0) and an attention_mask.
    Either way T is the longest row of this batch (no padding to max_length)."""
    if not len(examples):
        raise ValueError("collate needs at least one example")
    lengths = lengths_of(examples)
    if max_length is not None:
        _check_lengths(lengths, max_length, examples)
    rows = _next_fit(lengths, max_length) if packed else [[i] for i in range(len(examples))]
    T = max(sum(lengths[i] for i in row) for row in rows)
    B = len(rows)
    ids = np.full((B, T), pad_id, dtype=np.int64)
    labels = np.full((B, T), IGNORE, dtype=np.int64)
    weights = np.zeros((B, T), dtype=np.float32)
    classes = np.full((B, T), -1, dtype=np.int8)
    pos = np.zeros((B, T), dtype=np.int64)
    mask = np.zeros((B, T), dtype=np.int64)
    for b, row in enumerate(rows):
        t = 0
        for i in row:
            n = lengths[i]
            ids[b, t:t + n], labels[b, t:t + n], weights[b, t:t + n], classes[b, t:t + n] = _shifted(examples[i])
            pos[b, t:t + n] = np.arange(n)  # restart at 0: a new attention block
            mask[b, t:t + n] = 1
            t += n
        # The padded tail: its own block in packed rows (positions from 0); masked out in padded rows.
        pos[b, t:] = np.arange(T - t) if packed else np.arange(t, T)
    return Batch(input_ids=torch.from_numpy(ids), labels=torch.from_numpy(labels),
                 weights=torch.from_numpy(weights), position_ids=torch.from_numpy(pos),
                 attention_mask=None if packed else torch.from_numpy(mask), classes=torch.from_numpy(classes),
                 n_tokens=sum(lengths), n_examples=len(examples))


def make_batches(examples: Examples | list[TokenizedExample], batch_size: int, max_length: int, packed: bool,
                 seed: int, epoch: int, drop_last: bool = False) -> list[list[int]]:
    """The micro-batches of one epoch, in order, as lists of example indices; same (seed, epoch) -> same list.

    padded: examples shuffled, `batch_size` EXAMPLES per micro-batch.
    packed: the examples are packed once (pack_examples, independent of seed and epoch); the bins are shuffled and
      grouped `batch_size` ROWS (bins) per micro-batch, bins of similar length together (see GROUP_WINDOW). Inside
      a micro-batch the bins are listed in their opening order, each with its longest example first; then collate's
      next-fit reproduces exactly these bins, because a bin's first example did not fit into any older bin when it
      was opened (and bins only fill up).
    Use: `for mb in make_batches(...): batch = collate([examples[i] for i in mb], packed, max_length, pad_id)`.
    Every example appears exactly once per epoch. One micro-batch may be smaller (drop_last=False): the last one when
    padded, any one when packed.
    Micro-batches hold different numbers of tokens and of weighted tokens: the trainer normalises by the weight sum
    of the whole optimizer step (see imtune.model.loss), never per micro-batch."""
    if batch_size < 1:
        raise UsageError(f"batch size must be >= 1, not {batch_size}")
    rng = np.random.default_rng([seed, epoch])
    if packed:
        bins = pack_examples(examples, max_length)
        lengths = lengths_of(examples)
        size = [sum(lengths[i] for i in b) for b in bins]
        order = rng.permutation(len(bins)).tolist()
        # The rows of a micro-batch are padded to its longest, so group bins of similar length: the shuffled bins
        # are taken GROUP_WINDOW micro-batches at a time, sorted by length inside that window and cut into
        # micro-batches, which are then shuffled. (LIMA, 4 rows × 512: padding 8.9% -> 1.1%, BENCHMARKS.md.)
        groups: list[list[int]] = []
        step = GROUP_WINDOW * batch_size
        for s in range(0, len(order), step):
            window = sorted(order[s:s + step], key=lambda b: -size[b])  # stable: ties keep the shuffled order
            groups += [sorted(window[k:k + batch_size]) for k in range(0, len(window), batch_size)]
        groups = [groups[i] for i in rng.permutation(len(groups))]
        if drop_last:
            groups = [g for g in groups if len(g) == batch_size]  # at most one is short
        return [[i for b in group for i in bins[b]] for group in groups]
    _check_lengths(lengths_of(examples), max_length, examples)
    order = rng.permutation(len(examples)).tolist()
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def epoch_batches(examples: Examples | list[TokenizedExample], cfg, epoch: int) -> list[list[int]]:
    """make_batches with a run's settings (cfg: a TrainConfig, or anything with batch_size, max_length, packing
    and seed): the one way training, evaluation and the step arithmetic cut examples into micro-batches."""
    return make_batches(examples, cfg.batch_size, cfg.max_length, cfg.packing, cfg.seed, epoch)


def split_passes(idx: list[int], lengths: list[int], packed: bool, max_length: int,
                 cap: int | None) -> list[list[int]]:
    """One micro-batch's example indices `idx` (from make_batches) cut into forward/backward passes of at most `cap`
    positions each, counted as collate lays them out (rows × the longest row). A row is never cut: a row longer than
    `cap` is a pass alone. Consecutive rows stay together and in order, so collate's next-fit rebuilds exactly the
    micro-batch's rows in every pass. `lengths`: tokens per example (all examples). cap None: one pass, `idx`."""
    if cap is None:
        return [idx]
    own = [lengths[i] for i in idx]
    rows = _next_fit(own, max_length) if packed else [[j] for j in range(len(idx))]
    passes: list[list[int]] = []
    n_rows = longest = 0
    for row in rows:
        n = sum(own[j] for j in row)
        if passes and (n_rows + 1) * max(longest, n) <= cap:  # joins the pass: every row padded to its longest
            n_rows, longest = n_rows + 1, max(longest, n)
            passes[-1] += [idx[j] for j in row]
        else:
            passes.append([idx[j] for j in row])
            n_rows, longest = 1, n
    return passes


def padding_fraction(examples: Examples | list[TokenizedExample], batches: list[list[int]], packed: bool,
                     max_length: int | None = None) -> float:
    """Share of padded positions that collating `batches` would produce, without building tensors (for logging)."""
    real = total = 0
    every = lengths_of(examples)
    for idx in batches:
        lengths = [every[i] for i in idx]
        rows = _next_fit(lengths, max_length) if packed else [[j] for j in range(len(idx))]
        real += sum(lengths)
        total += len(rows) * max(sum(lengths[j] for j in row) for row in rows)
    return 1.0 - real / max(1, total)


def model_inputs(batch: Batch, flat: bool = False) -> dict:
    """Keyword arguments for model(...) or model.model(...). use_cache=False is required for packed rows (above).

    flat=True (packed batches only) lays the B rows end to end as ONE row [1, B*T]: the same blocks, hence the same
    result. flash-attention in transformers infers varlen boundaries from position_ids only when the batch has a
    single row, so packed batches of several rows must go flat there (loss.hidden_states does it by itself); sdpa and
    eager handle several rows, where flat would only make a bigger dense mask."""
    ids, pos = batch.input_ids, batch.position_ids
    if flat:
        if batch.attention_mask is not None:
            raise ValueError("flat=True is for packed batches (attention_mask None)")
        ids, pos = ids.reshape(1, -1), pos.reshape(1, -1)
    kw = dict(input_ids=ids, position_ids=pos, use_cache=False)
    if batch.attention_mask is not None:
        kw["attention_mask"] = batch.attention_mask
    return kw


def step_normalisers(examples, normalize: str) -> list[float]:
    """Each example's share of W, the divisor of an optimizer step's Σw·nll (W = the sum over the step's examples):
    Σw over its predicted tokens 1..n-1 (tokens; sequences after per_sequence: 1), or, for nonzero, the number of
    those tokens with w > 0. float32 weights, as collate makes them; summed exactly (fsum), example by example."""
    w32, bounds = examples.weights.astype(np.float32, copy=False), examples.bounds.tolist()
    if normalize == "nonzero":
        return [float(np.count_nonzero(w32[a + 1:b])) for a, b in zip(bounds[:-1], bounds[1:])]
    return [math.fsum(w32[a + 1:b].tolist()) for a, b in zip(bounds[:-1], bounds[1:])]


def per_sequence(examples):
    """--normalize sequences: each example's weights rescaled to sum to 1 (over the predicted tokens 1..n-1)."""
    w, bounds = examples.weights, examples.bounds.tolist()
    sums = np.array([w[a + 1:b].sum() for a, b in zip(bounds[:-1], bounds[1:])], dtype=np.float64)
    return examples.with_weights(w / np.repeat(sums, examples.lengths))
