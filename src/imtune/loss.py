"""Batch -> loss: the one weighted negative log-likelihood, computed in chunks of positions.

The invariant. weighted_nll returns SUMS: nll_sum = Σ w·nll and weight_sum = Σ w over one micro-batch. The trainer
divides by the weight sum of the whole optimizer step (all micro-batches, all ranks):

    W = all_reduce_sum(Σ over the step's micro-batches of weights.sum())    # known before any forward pass
    for batch in step: (weighted_nll(..., weights, ...).nll_sum / W).backward()

so the gradient is that of Σw·nll / Σw over the step, whatever the split into micro-batches, accumulation or ranks
(DDP AVERAGES gradients over ranks: multiply the loss by the number of ranks to keep the sum). `weight_sum` always
equals `weights.sum()` (weights are 0 where labels == -100), hence W can be computed up front, from the same
weights that are passed in (batch.weights, or their per-sequence rescaling below).

Memory. Only positions with a label and weight > 0 are computed at all. Their hidden states are gathered ([N, H]) and
split into chunks of `chunk_size` positions; each chunk's logits ([chunk, V], fp32) live only inside a
torch.utils.checkpoint, so neither the forward nor the backward ever holds more than one chunk of logits.

Per-sequence normalisation (--normalize sequences): weights = sequence_weights(batch.weights,
sequence_ids(batch.position_ids)) rescales each example's weights to sum to 1; weight_sum then counts examples, and
the same division by the step's weight sum gives the mean over examples of each example's weighted mean loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .pack import IGNORE, Batch, model_inputs
from .types import CLASSES


@dataclass
class LossSums:
    nll_sum: torch.Tensor  # Σ w·nll, fp32 scalar, differentiable
    weight_sum: torch.Tensor  # Σ w, fp32 scalar, no grad
    per_class: dict[str, tuple[float, float]] | None = None  # class -> (Σ nll, count), unweighted, labelled tokens


def _chunk_nll(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    """h [c, H], weight [V, H], y [c] -> nll [c] fp32. The matmul runs in the head's dtype, the softmax in fp32."""
    logits = F.linear(h.to(weight.dtype), weight, bias).float()  # [c, V]
    return F.cross_entropy(logits, y, reduction="none")


def _nll_at(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
            idx: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Per-token nll [N] fp32 at flat positions idx [N] of hidden [B, T, H] / labels [B, T], chunk by chunk."""
    h = hidden.reshape(-1, hidden.shape[-1])[idx]  # [N, H], the only positions that cost anything
    y = labels.reshape(-1)[idx]  # [N]
    if len(idx) == 0:
        return h.sum(-1).float()  # [0], still attached to the graph so backward() works on an empty batch
    grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    out = []
    for s in range(0, len(idx), chunk_size):
        args = (h[s:s + chunk_size], weight, bias, y[s:s + chunk_size])
        # checkpoint: keep only the chunk's inputs; recompute its logits in backward, one chunk at a time.
        out.append(checkpoint(_chunk_nll, *args, use_reentrant=False) if grad else _chunk_nll(*args))
    return torch.cat(out)


def weighted_nll(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                 chunk_size: int = 1024, classes: torch.Tensor | None = None, lm_head_bias=None) -> LossSums:
    """Σ w·nll and Σ w over positions (see the module docstring). hidden [B, T, H] (any float dtype),
    lm_head_weight [V, H], labels [B, T] (-100: none), weights [B, T] (already aligned with labels).

    classes [B, T] (optional): also return per-class unweighted (Σ nll, count) over every labelled position,
    zero-weight ones included (computed without grad; costs one extra forward-only pass over those positions)."""
    y, w = labels.reshape(-1), weights.reshape(-1).float()
    labelled = y != IGNORE
    active = labelled & (w > 0)
    idx = active.nonzero().squeeze(1)  # [N] flat positions that carry loss
    nll = _nll_at(hidden, lm_head_weight, lm_head_bias, labels, idx, chunk_size)  # [N]
    w_act = w[idx]
    sums = LossSums(nll_sum=(nll * w_act).sum(), weight_sum=w_act.sum().detach())
    if classes is not None:
        with torch.no_grad():
            rest = (labelled & ~active).nonzero().squeeze(1)  # labelled but weightless: logged, never trained
            nll_all = torch.cat([nll.detach(), _nll_at(hidden, lm_head_weight, lm_head_bias, labels, rest, chunk_size)])
            cls = classes.reshape(-1)[torch.cat([idx, rest])].long()
            k = len(CLASSES)
            per_sum = torch.zeros(k, dtype=torch.float64, device=cls.device).index_add_(0, cls, nll_all.double())
            per_n = torch.bincount(cls, minlength=k)
            sums.per_class = {CLASSES[c]: (s, float(n)) for c, (s, n) in enumerate(zip(per_sum.tolist(),
                                                                                          per_n.tolist())) if n}
    return sums


def token_nll(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor, chunk_size: int = 1024,
              lm_head_bias=None) -> torch.Tensor:
    """Per-token nll [B, T] fp32 (0 where labels == -100), computed in chunks like weighted_nll. For evaluation."""
    idx = (labels.reshape(-1) != IGNORE).nonzero().squeeze(1)
    nll = _nll_at(hidden, lm_head_weight, lm_head_bias, labels, idx, chunk_size)
    out = torch.zeros(labels.numel(), dtype=torch.float32, device=labels.device)
    return out.index_put((idx,), nll).reshape(labels.shape)


def sequence_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B, T] long: a batch-unique id per example (a new id wherever position_ids is 0, as collate makes
    them). A packed row's padded tail gets an id of its own; its weights are 0."""
    return (position_ids.reshape(-1) == 0).cumsum(0).reshape(position_ids.shape) - 1


def sequence_weights(weights: torch.Tensor, seq_ids: torch.Tensor) -> torch.Tensor:
    """Rescale weights [B, T] so each sequence's weights sum to 1 (sequences with no weight stay 0)."""
    w, ids = weights.reshape(-1).float(), seq_ids.reshape(-1)
    totals = torch.zeros(int(ids.max()) + 1, dtype=w.dtype, device=w.device).index_add_(0, ids, w)[ids]  # [B*T]
    return torch.where(totals > 0, w / totals.clamp_min(torch.finfo(w.dtype).tiny), 0.0).reshape(weights.shape)


def _unwrap(model):
    """The *ForCausalLM inside DDP / peft wrappers."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # peft (LoRA layers stay injected)


def lm_head(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [V, H], bias [V] or None) of the output embedding; tied to the input embedding when the model ties."""
    head = _unwrap(model).get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def hidden_states(model, batch: Batch, through_forward: bool = False) -> torch.Tensor:
    """Final (post-norm) hidden states [B, T, H], without computing full logits.

    Default: call the decoder (model.model for llama-likes; unwraps peft and DDP) directly. That bypasses the
    wrappers' forward, so DDP's gradient synchronisation and peft methods that edit the inputs (prompt tuning) do not
    run. through_forward=True calls model(...) itself with logits_to_keep=[] (no logits) and output_hidden_states, and
    takes the last hidden state: safe through any wrapper; equal to the default for llama (tested). Models whose
    *ForCausalLM.forward scales or softcaps logits (gemma2, cohere) are not covered by either path."""
    B, T = batch.input_ids.shape
    base = _unwrap(model)
    # flash-attention finds packed blocks only in a single row: lay packed rows end to end (same blocks, same result)
    flat = batch.attention_mask is None and B > 1 and "flash" in str(getattr(base.config, "_attn_implementation", ""))
    inputs = model_inputs(batch, flat=flat)
    if through_forward:
        keep = torch.empty(0, dtype=torch.long, device=batch.input_ids.device)
        h = model(**inputs, logits_to_keep=keep, output_hidden_states=True).hidden_states[-1]
    else:
        decoder = base.get_decoder() if hasattr(base, "get_decoder") else base.model
        h = decoder(**inputs).last_hidden_state
    return h.reshape(B, T, -1)  # [B, T, H]
