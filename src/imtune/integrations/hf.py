"""imtune's per-token loss weights inside a transformers `Trainer`: a dataset, a collator, a loss, and one wrap.

    ds = to_dataset(data, tokenizer, loss="im")          # prepare_examples: the same masks, the same skip report
    trainer = Trainer(model, args (remove_unused_columns=False), train_dataset=ds,
                      data_collator=collator(tokenizer), compute_loss_func=compute_loss_func)
    count_weights(trainer).train()                        # num_items_in_batch := Σw of the step, all processes

Alignment. Columns follow transformers' convention, not imtune's Batch: `labels[t]` is the token AT position t
(= input_ids[t], or -100), `loss_weights[t]` is the weight of predicting that token (TokenizedExample.weights[t]),
and the loss shifts both: logits[:, t] predict labels[:, t+1] with weight loss_weights[:, t+1], as the model's own
ForCausalLMLoss does. labels is -100 exactly where the weight is 0, and at each example's first token (nothing
predicts it; in a packed row that is what keeps the previous example from predicting it).

What Trainer (transformers 5.23) passes to `compute_loss_func(outputs, labels, num_items_in_batch)`:
- `outputs`: model(**batch) without "labels" (Trainer pops them), so no loss inside the model; full logits [B, T, V].
- `labels`: whatever the collator put under "labels", untouched: here the pair (labels, loss_weights). That is the
  only route from the batch to the loss: every other key goes into model.forward, so the weights travel inside it.
- `num_items_in_batch`: Trainer prefetches the step's `gradient_accumulation_steps` micro-batches
  (get_batch_samples) and counts `labels[..., 1:] != -100` over them, summed over processes when
  average_tokens_across_devices (the default). A COUNT: equal to Σw only when every weight is 0 or 1 (it, im, all).
  With the pair as labels that count fails (Trainer catches the TypeError) and passes None; count_weights(trainer)
  makes it Σ loss_weights[..., 1:] over the same micro-batches and processes instead, exact for any weights.
- Scaling: with a compute_loss_func, Trainer treats the loss as already normalised over the step (no division by
  the accumulation steps) and, when num_items_in_batch is given, multiplies it by the number of processes before
  backward (DDP then averages gradients). So Σ_micro-batches Σw·nll / W_step is the update of Σw·nll / Σw over the
  whole step and all processes — imtune train's normalisation (imtune.train.loop). Trainer's default (no
  compute_loss_func, num_items_in_batch None) would instead average per-micro-batch means over accumulation steps.

Packing (`collator(tokenizer, packing=True)`): the micro-batch becomes ONE row, padding-free, position_ids restarting
at 0 per example and no attention_mask. transformers derives the blocks from position_ids: sdpa/eager/flex build a
block-diagonal causal mask (masking_utils.find_packed_sequence_indices), flash-attention takes varlen boundaries
(single row only). Only without a KV cache: llama's config says use_cache=True and the model would make a
DynamicCache and skip the detection (attention then crosses examples), so packed batches carry use_cache=False.
tests/test_integrations_hf.py checks packed == padded on sdpa.

TRL: SFTTrainer takes this dataset as prepared (input_ids + labels, its own collator and loss): the masks of it/im/all
are exact there. It cannot take fractional weights (weighted λ, per-class overrides) without patching its
compute_loss; see the README.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from imtune.data.pack import IGNORE
from imtune.data.prepare import DataSpec, Prepared, prepare_examples
from imtune.data.weights import loss_spec
from imtune.types import UsageError


def to_dataset(data, tokenizer, loss: str = "im", prompt_weight: float | None = None, weights=None,
               template: str | None = None, max_length: int | None = None, truncation: str = "drop",
               last_turn_only: bool = False, format: str = "auto", fields: dict | None = None,
               on_invalid: str = "error", limit: int | None = None, quiet: bool = False):
    """Data (a path, hub spec or list of Conversation) -> datasets.Dataset with columns input_ids, labels,
    loss_weights (float32), one row per kept example, built by imtune.data.prepare.prepare_examples with the loss mode's
    table. What preparation skipped or truncated is printed (quiet=False) and kept in `ds.info.description`."""
    spec = loss_spec(loss, prompt_weight, weights, last_turn_only)
    prep = prepare_examples(data, tokenizer, spec, DataSpec(
        template=template, max_length=max_length, truncation=truncation, format=format, fields=fields,
        on_invalid=on_invalid, limit=limit))
    if not quiet:
        print(f"imtune: {prep.summary()} (loss {spec.describe()})", file=sys.stderr, flush=True)
    return from_prepared(prep, f"imtune {spec.describe()}: {prep.summary()}")


def from_prepared(prep: Prepared, description: str = ""):
    """Prepared examples -> the Dataset of to_dataset (for callers that keep the Prepared and its report)."""
    import datasets

    ids, labels, weights = [], [], []
    for e in prep.examples:
        w = np.asarray(e.weights, dtype=np.float32)
        w[0] = 0.0  # nothing predicts the first token
        x = np.asarray(e.input_ids, dtype=np.int64)
        ids.append(x)
        labels.append(np.where(w > 0, x, IGNORE))
        weights.append(w)
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int64")),
                                  "labels": datasets.Sequence(datasets.Value("int64")),
                                  "loss_weights": datasets.Sequence(datasets.Value("float32"))})
    info = datasets.DatasetInfo(description=description, features=features)
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": labels, "loss_weights": weights}, info=info)


@dataclass(frozen=True)
class Collator:
    """Rows of to_dataset -> a batch for model(**batch) + compute_loss_func. See collator()."""

    pad_id: int
    packing: bool = False

    def __call__(self, rows: list[dict]) -> dict:
        if any("loss_weights" not in r for r in rows):
            raise UsageError("the batch has no loss_weights: Trainer dropped the column as unknown to the model; "
                             "pass TrainingArguments(remove_unused_columns=False)")
        ids = [np.asarray(r["input_ids"], dtype=np.int64) for r in rows]
        w = [np.asarray(r["loss_weights"], dtype=np.float32).copy() for r in rows]
        for x, v in zip(ids, w):
            if len(x) != len(v):
                raise UsageError(f"input_ids ({len(x)}) and loss_weights ({len(v)}) differ in length; "
                                 f"build the dataset with imtune.integrations.hf.to_dataset")
            v[0] = 0.0  # an example's first token is never predicted (in a packed row: not by the previous one)
        if self.packing:  # one padding-free row; position_ids restart per example (see the module docstring)
            x, v = np.concatenate(ids)[None], np.concatenate(w)[None]
            pos = np.concatenate([np.arange(len(t)) for t in ids])[None]
            batch = {"input_ids": torch.from_numpy(x), "position_ids": torch.from_numpy(pos), "use_cache": False}
        else:  # one right-padded row per example
            T = max(map(len, ids))
            x = np.full((len(ids), T), self.pad_id, dtype=np.int64)
            v = np.zeros((len(ids), T), dtype=np.float32)
            mask = np.zeros((len(ids), T), dtype=np.int64)
            for b, (t, u) in enumerate(zip(ids, w)):
                x[b, :len(t)], v[b, :len(t)], mask[b, :len(t)] = t, u, 1
            batch = {"input_ids": torch.from_numpy(x), "attention_mask": torch.from_numpy(mask)}
        labels = torch.from_numpy(np.where(v > 0, x, IGNORE))
        batch["labels"] = (labels, torch.from_numpy(v))  # the pair reaches compute_loss_func untouched
        return batch


def collator(tokenizer, packing: bool = False) -> Collator:
    """The data_collator for to_dataset's rows: right-padded (labels -100, weights 0, attention_mask), or packed
    padding-free into one row with position_ids. "labels" is the pair (labels [B, T], loss_weights [B, T])."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Collator(int(pad), packing)


def _pair(labels) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, weights) from the collator's pair, or 0/1 weights from plain labels (any other collator)."""
    if isinstance(labels, (tuple, list)):
        return labels[0], labels[1]
    return labels, (labels != IGNORE).float()


def compute_loss_func(outputs, labels, num_items_in_batch=None, **_) -> torch.Tensor:
    """Σw·nll / num_items_in_batch for transformers.Trainer(compute_loss_func=...); with count_weights(trainer)
    num_items_in_batch is Σw of the whole optimizer step over all processes (module docstring). Without it during
    training: a UsageError. In evaluation (no grad) a missing num_items_in_batch means this batch's own Σw."""
    y, w = _pair(labels)
    logits = outputs["logits"][:, :-1]  # [B, T-1, V]: position t predicts token t+1
    y, w = y[:, 1:].reshape(-1), w[:, 1:].reshape(-1).float()
    idx = ((y != IGNORE) & (w > 0)).nonzero().squeeze(1)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1])[idx].float(), y[idx], reduction="none")
    nll_sum = (nll * w[idx]).sum()
    if num_items_in_batch is None:
        if torch.is_grad_enabled():
            raise UsageError("compute_loss_func got no num_items_in_batch: wrap the trainer with "
                             "imtune.integrations.hf.count_weights(trainer) so it passes the step's weight sum")
        num_items_in_batch = w.double().sum()
    return nll_sum / max(float(num_items_in_batch), 1e-30)  # a python float keeps the loss in fp32


def step_weight(batches: list[dict]) -> torch.Tensor:
    """Σ loss weight of the predicted positions (labels[..., 1:]) over the micro-batches of one step, float64."""
    total = torch.zeros((), dtype=torch.float64)
    for b in batches:
        _, w = _pair(b["labels"])
        total += w[:, 1:].double().sum().cpu()
    return total


def count_weights(trainer):
    """Make `trainer` pass Σw of each optimizer step (its prefetched micro-batches, summed over processes) as
    num_items_in_batch, where it would pass a token count. Wraps trainer.get_batch_samples on this instance only;
    returns the trainer."""
    args = trainer.args
    if args.world_size > 1 and not args.average_tokens_across_devices:
        raise UsageError("count_weights needs TrainingArguments(average_tokens_across_devices=True) with several "
                         "processes: it is what makes Trainer scale the loss by the number of processes")
    collect = trainer.get_batch_samples

    def get_batch_samples(epoch_iterator, num_batches, device):
        batches, _ = collect(epoch_iterator, num_batches, device)
        total = step_weight(batches).to(device)
        if args.world_size > 1:
            total = trainer.accelerator.gather(total.reshape(1)).sum()
        return batches, total

    trainer.get_batch_samples = get_batch_samples
    return trainer
