"""The training objective of one micro-batch: Σw·nll (+ Σw·KL to the starting model), with NEFTune noise.

One nn.Module (`Objective`) wraps the causal LM, so DDP / FSDP see every use of the parameters inside forward()
(forward.hidden_states calls the decoder directly, which would bypass a DDP wrapper's forward and with it the
gradient all-reduce). The hidden states of the model and of the KL reference come from
imtune.model.forward.hidden_states,
the one forward pass evaluation uses too (it keeps packed examples apart for every attention kernel). The
normalisation by the global weight sum stays in the trainer (imtune.train.loop); everything here returns sums."""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from imtune.data.pack import IGNORE
from imtune.model.forward import embed, hidden_states, lm_head, sequence_ids
from imtune.model.loss import class_nll, weighted_nll
from imtune.types import CLASSES


class Objective(torch.nn.Module):
    """(Σw·nll, Σw·KL, LossSums) of one micro-batch. Wraps the causal LM (or its peft wrapper). The LossSums carry
    the per-class sums (`classes`). With `score` (a bool per class) it only evaluates: (Σ nll, count) per (example of
    the batch, class), loss.class_nll — what score_examples adds up (every evaluation goes through here, so that
    DDP/FSDP-wrapped weights are gathered as in training).

    `ref`: the frozen starting model for the KL term (full fine-tuning); with LoRA the starting model is the
    same module with its adapter switched off. Kept out of the module tree: never trained, never saved."""

    def __init__(self, model, chunk_size: int, neftune_alpha: float, ref=None):
        super().__init__()
        self.model, self.chunk_size, self.neftune_alpha = model, chunk_size, neftune_alpha
        self._ref = (ref,)  # a tuple hides it from nn.Module registration (and so from DDP and state_dict)
        self._no_split_modules = getattr(model, "_no_split_modules", None)  # FSDP auto-wrap looks here

    def forward(self, input_ids, position_ids, attention_mask, labels, weights, classes=None, kl: bool = False,
                score: torch.Tensor | None = None, head_grad: float | None = None):
        embeds = embed(self.model, input_ids)  # [B, T, H]
        noise = None
        if self.training and self.neftune_alpha:
            noise = neftune_noise(embeds, position_ids, attention_mask, self.neftune_alpha)
            embeds = embeds + noise
        hidden = hidden_states(self.model, embeds, position_ids, attention_mask)  # [B, T, H]
        head_w, head_b = lm_head(self.model)
        if score is not None:
            return class_nll(hidden, head_w, labels, classes, sequence_ids(position_ids), score, self.chunk_size,
                             head_b)
        sums = weighted_nll(hidden, head_w, labels, weights, self.chunk_size, classes, head_b, head_grad)
        kl_sum = sums.nll_sum.new_zeros(())
        if kl:
            ref_hidden, ref_w, ref_b = self.reference(input_ids, position_ids, attention_mask, noise)
            kl_sum = weighted_kl(hidden, head_w, head_b, ref_hidden, ref_w, ref_b, labels, weights,
                                 self.chunk_size)
        return sums.nll_sum, kl_sum, sums

    @torch.no_grad()
    def reference(self, input_ids, position_ids, attention_mask, noise):
        """Hidden states and head of the starting model, on the same (noised, with NEFTune) input embeddings."""
        ref = self._ref[0]
        lora = ref is None
        with self.model.disable_adapter() if lora else contextlib.nullcontext():
            net = self.model if lora else ref
            embeds = embed(net, input_ids)
            embeds = embeds if noise is None else embeds + noise
            return (hidden_states(net, embeds, position_ids, attention_mask), *lm_head(net))


def neftune_noise(embeds, position_ids, attention_mask, alpha: float):
    """NEFTune (Jain et al. 2023): uniform noise in [-1, 1] · alpha / sqrt(L·d), L = the token's own example length
    (packed rows: each example's; padded rows: the real tokens'), d = hidden size; none on padding."""
    if attention_mask is not None:  # padded: one example per row
        live = attention_mask.to(embeds.dtype)
        L = live.sum(1, keepdim=True).expand_as(live)
    else:  # packed: an example starts wherever position_ids restart at 0
        ids = sequence_ids(position_ids)
        L = torch.bincount(ids.reshape(-1))[ids].to(embeds.dtype)
        live = torch.ones_like(L)
    scale = alpha / torch.sqrt(L.clamp_min(1) * embeds.shape[-1]) * live  # [B, T]
    return (torch.rand_like(embeds) * 2 - 1) * scale.unsqueeze(-1)


def _chunk_kl(h, w, b, h_ref, w_ref, b_ref):
    """KL(p ‖ p_ref) per position [c] from hidden states [c, H]: Σ_v p (log p - log p_ref), softmax in fp32."""
    logp = F.log_softmax(F.linear(h.to(w.dtype), w, b).float(), -1)
    logq = F.log_softmax(F.linear(h_ref.to(w_ref.dtype), w_ref, b_ref).float(), -1)
    return (logp.exp() * (logp - logq)).sum(-1)


def weighted_kl(hidden, head_w, head_b, ref_hidden, ref_w, ref_b, labels, weights, chunk_size: int):
    """Σ w·KL(p_model ‖ p_ref) over positions with weight > 0 — the direction of the IM paper's code
    (F.kl_div(ref_logprob, logprob, log_target=True)) — chunked and checkpointed like weighted_nll."""
    w = weights.reshape(-1).float()
    idx = ((labels.reshape(-1) != IGNORE) & (w > 0)).nonzero().squeeze(1)
    h = hidden.reshape(-1, hidden.shape[-1])[idx]
    h_ref = ref_hidden.reshape(-1, ref_hidden.shape[-1])[idx]
    parts = [checkpoint(_chunk_kl, h[s:s + chunk_size], head_w, head_b, h_ref[s:s + chunk_size], ref_w, ref_b,
                        use_reentrant=False) for s in range(0, len(idx), chunk_size)]
    return (torch.cat(parts) * w[idx]).sum() if parts else h.sum() * 0.0


def batch_args(batch) -> tuple:
    """Objective's positional arguments from a pack.Batch."""
    return batch.input_ids, batch.position_ids, batch.attention_mask, batch.labels, batch.weights


# ----------------------------------------------------------------------------------------------------------------
# Scoring: the one evaluation loop (in-training evaluations, imtune.train.track; final scoring, imtune.evaluate.loss)
@dataclass(frozen=True)
class ExampleSums:
    """Σ nll and token counts of one data set, per example (rows, in the examples' order) and class (columns, as
    CLASSES), over the predicted tokens of the scored classes (0 in the others)."""

    nll: list[list[float]]
    tokens: list[list[int]]

    def of(self, names: Sequence[str]) -> tuple[list[float], list[int]]:
        """Per example: (Σ nll, tokens) over the classes `names` (e.g. types.OUTPUT)."""
        cols = [CLASSES.index(c) for c in names]
        return ([math.fsum(row[c] for c in cols) for row in self.nll],
                [sum(row[c] for c in cols) for row in self.tokens])

    def totals(self) -> tuple[list[float], list[int]]:
        """Per class: (Σ nll, tokens) over the whole data set."""
        return ([math.fsum(r[c] for r in self.nll) for c in range(len(CLASSES))],
                [sum(r[c] for r in self.tokens) for c in range(len(CLASSES))])


def score_examples(objective, examples, batches: list[list[int]], collate: Callable, classes: Sequence[str] = CLASSES,
                   acc=None, on_batch: Callable | None = None) -> ExampleSums:
    """Score `examples` with the model inside `objective` (an Objective, DDP/FSDP-wrapped or not), micro-batch by
    micro-batch (`batches`: lists of example indices; `collate(idx, examples)` -> a pack.Batch on the model's device),
    without gradients and without NEFTune noise. With an accelerate Accelerator `acc` of several processes, rank r
    takes batches r, r + world, ...; ranks with fewer run a stand-in batch that is not counted (sharded weights are
    gathered in every forward, so every rank runs as many), and the sums are added up over ranks.
    Every example must have a predicted token in `classes` (examples prepared with a loss mode that weighs them):
    the examples of a batch are its groups that have one, in order (a packed row's padded tail has none)."""
    world, rank = (acc.num_processes, acc.process_index) if acc is not None else (1, 0)
    device = acc.device if acc is not None else next(objective.parameters()).device
    scored = torch.tensor([c in classes for c in CLASSES])
    nll = torch.zeros(len(examples), len(CLASSES), dtype=torch.float64, device=device)
    tokens = torch.zeros_like(nll)
    was_training = objective.training
    objective.eval()
    try:
        with torch.no_grad():
            for j in range(math.ceil(len(batches) / world)):
                k = rank + j * world
                idx, keep = (batches[k], True) if k < len(batches) else (batches[0], False)  # stand-in: not kept
                batch = collate(idx, examples)
                sums, counts = objective(*batch_args(batch), classes=batch.classes, score=scored)
                if keep:
                    rows = counts.sum(1) > 0
                    if int(rows.sum()) != len(idx):
                        raise ValueError(f"score_examples: {len(idx)} examples in a batch, {int(rows.sum())} with a "
                                         f"token of {', '.join(classes)} to score")
                    nll[idx] += sums[rows]
                    tokens[idx] += counts[rows]
                if on_batch is not None:
                    on_batch()
        if world > 1:
            nll, tokens = acc.reduce(nll, reduction="sum"), acc.reduce(tokens, reduction="sum")
    finally:
        objective.train(was_training)
    return ExampleSums(nll.tolist(), [[int(x) for x in row] for row in tokens.tolist()])
