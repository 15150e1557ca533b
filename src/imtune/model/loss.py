"""Hidden states -> loss: the one weighted negative log-likelihood, computed in chunks of positions.

The invariant. weighted_nll returns SUMS: nll_sum = Σ w·nll and weight_sum = Σ w over one micro-batch. The trainer
divides by the weight sum of the whole optimizer step (all micro-batches, all ranks):

    W = all_reduce_sum(Σ over the step's micro-batches of weights.sum())    # known before any forward pass
    for batch in step: (weighted_nll(..., weights, ...).nll_sum / W).backward()

so the gradient is that of Σw·nll / Σw over the step, whatever the split into micro-batches, accumulation or ranks
(DDP AVERAGES gradients over ranks: multiply the loss by the number of ranks to keep the sum). `weight_sum` always
equals `weights.sum()` (weights are 0 where labels == -100), hence W can be computed up front, from the same
weights that are passed in (batch.weights; per-sequence rescaled ones under --normalize sequences, below).

Memory and speed. Only positions with a label and weight > 0 are computed at all. Their hidden states are gathered
([N, H]) and split into chunks of `chunk_size` positions. With gradients on, each chunk's logits ([chunk, V], fp32)
are computed once, in the forward pass, and turned right there into the gradient of Σ w·nll with respect to them,
w·(softmax − onehot), which is folded into dL/dh [N, H] and dL/dW [V, H] at once (_WeightedNLL): no logits outlive
their chunk, and backward only scales the saved gradients. That is 3 head-sized matmuls per position instead of the 4
of a checkpointed chunk (forward, recomputation, two in backward), and one softmax pass instead of three
(BENCHMARKS.md). Without gradients (evaluation), chunks are computed forward only.

The hidden states and the head come from imtune.model.forward (`hidden_states`, `lm_head`): the one forward pass of
every
caller. Per-sequence normalisation (--normalize sequences) needs nothing here: imtune.data.pack.per_sequence rescales
each example's weights to sum to 1 before batching, so weight_sum counts examples and the same division by the
step's weight sum gives the mean over examples of each example's weighted mean loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from imtune.data.pack import IGNORE
from imtune.types import CLASSES


@dataclass
class LossSums:
    nll_sum: torch.Tensor  # Σ w·nll, fp32 scalar, differentiable
    weight_sum: torch.Tensor  # Σ w, fp32 scalar, no grad
    per_class: dict[str, tuple[float, float]] | None = None  # class -> (Σ nll, count), unweighted, labelled tokens


def _chunk_nll(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    """h [c, H], weight [V, H], y [c] -> nll [c] fp32. The matmul runs in the head's dtype, the softmax in fp32."""
    logits = F.linear(h.to(weight.dtype), weight, bias).float()  # [c, V]
    return F.cross_entropy(logits, y, reduction="none")


def _chunk_nll_eval(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    """_chunk_nll without autograd, in the one [c, V] fp32 buffer of the logits: cross_entropy would add a second
    (its log-softmax), 2 x 201 MB for a 1024-position chunk of a 49k vocabulary (every evaluation batch)."""
    logits = F.linear(h.to(weight.dtype), weight, bias).float()  # [c, V]
    target = logits[torch.arange(len(y), device=y.device), y]  # [c], a copy: the logits are overwritten next
    m = logits.amax(dim=-1)
    z = logits.sub_(m[:, None]).exp_().sum(dim=-1)
    return m + z.log() - target


def _chunk_nll_grad(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor,
                    w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """h [c, H], y [c], w [c] -> (nll [c] fp32, d(Σ w·nll)/d logits [c, V] in the head matmul's dtype).

    The gradient w·(softmax − onehot) is built in place of the fp32 logits: one exp pass, no second [c, V] buffer."""
    lin = F.linear(h.to(weight.dtype), weight, bias)  # [c, V], bf16 under autocast
    logits = lin.float()
    rows = torch.arange(len(y), device=y.device)
    target = logits[rows, y]  # [c], a copy: the logits are overwritten next
    m = logits.amax(dim=-1, keepdim=True)
    e = logits.sub_(m).exp_()  # exp(logit - max)
    z = e.sum(dim=-1, keepdim=True)
    nll = (m + z.log()).squeeze(1) - target
    d = e.mul_(w[:, None] / z)  # w · softmax
    d[rows, y] -= w
    return nll, d.to(lin.dtype)


class _WeightedNLL(torch.autograd.Function):
    """(Σ w·nll, nll [N]) over positions h [N, H]; each chunk's gradient is computed in forward (see the module
    docstring), so backward only scales dL/dh, dL/dW, dL/db by the incoming gradient. nll is not differentiable."""

    @staticmethod
    def forward(ctx, h, weight, bias, y, w, chunk_size, head_grad):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        gh = torch.empty_like(h) if need_h else None
        # blank: gw is a fresh buffer, written (not added to) by the first chunk: no pass of zeros over 113 MB a step
        if need_w and head_grad is not None:  # straight into weight.grad, × the factor backward will bring
            blank = weight.grad is None
            if blank:
                weight.grad = torch.empty_like(weight)
            gw, alpha = weight.grad, head_grad
        else:
            gw, alpha, blank = (torch.empty_like(weight) if need_w else None), 1.0, need_w
        gb = torch.zeros_like(bias) if need_b else None
        nll = torch.empty(len(y), dtype=torch.float32, device=h.device)
        for s in range(0, len(y), chunk_size):
            e = s + chunk_size
            nll[s:e], d = _chunk_nll_grad(h[s:e], weight, bias, y[s:e], w[s:e])
            # The gradient matmuls run in the dtype of the forward one (bf16 under autocast), like autograd's would.
            with torch.autocast(device_type=h.device.type, enabled=False):
                if gh is not None:
                    gh[s:e] = torch.mm(d, weight.to(d.dtype))
                if gw is not None and alpha:
                    hc = h[s:e].to(d.dtype)
                    if gw.dtype == d.dtype:
                        gw.addmm_(d.t(), hc, beta=0 if blank else 1, alpha=alpha)  # beta 0: gw is not read
                    elif blank:
                        torch.mul(torch.mm(d.t(), hc), alpha, out=gw)
                    else:
                        gw.add_(torch.mm(d.t(), hc), alpha=alpha)
                    blank = False
                if gb is not None:
                    gb += d.sum(0)
        if blank:  # no position, or a stand-in pass (alpha 0): nothing was written
            gw.zero_()
        # Kept on ctx, not saved tensors: backward scales them in place and hands them on (gw: unless already in .grad)
        ctx.grads = (gh, None if head_grad is not None else gw, gb)
        ctx.mark_non_differentiable(nll)
        return (nll * w).sum(), nll

    @staticmethod
    def backward(ctx, g, _):
        # In place: a copy (gw * g) would hold a second head-sized buffer, 113 MB for SmolLM2-135M, while the rest
        # of the backward pass runs. So this node's backward runs once (no retain_graph, nothing here uses it).
        if ctx.grads is None:
            raise RuntimeError("imtune's loss head cannot run backward twice (retain_graph is not supported)")
        grads, ctx.grads = ctx.grads, None
        return (*(None if t is None else t.mul_(g) for t in grads), None, None, None, None)


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
        out.append(checkpoint(_chunk_nll, *args, use_reentrant=False) if grad else _chunk_nll_eval(*args))
    return torch.cat(out)


def weighted_nll(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                 chunk_size: int = 1024, classes: torch.Tensor | None = None, lm_head_bias=None,
                 head_grad: float | None = None) -> LossSums:
    """Σ w·nll and Σ w over positions (see the module docstring). hidden [B, T, H] (any float dtype),
    lm_head_weight [V, H], labels [B, T] (-100: none), weights [B, T] (already aligned with labels).

    head_grad: the factor the caller's backward will apply to nll_sum (the trainer's keep·world/W). Given, the head
    weight's gradient goes straight into lm_head_weight.grad during this forward pass, × head_grad, and none of it
    through autograd: no head-sized buffer is held from here to the end of backward (113 MB for SmolLM2-135M), and
    for tied weights the lookup's gradient is added in place. Only where nothing else must see that gradient pass
    through autograd: one process, no sharding (imtune.train.loop.Run.head_grad_direct).

    classes [B, T] (optional): also return per-class unweighted (Σ nll, count) over every labelled position,
    zero-weight ones included (computed without grad; costs one extra forward-only pass over those positions)."""
    y, w = labels.reshape(-1), weights.reshape(-1).float()
    labelled = y != IGNORE
    active = labelled & (w > 0)
    idx = active.nonzero().squeeze(1)  # [N] flat positions that carry loss
    w_act = w[idx]
    h = hidden.reshape(-1, hidden.shape[-1])[idx]  # [N, H], the only positions that cost anything
    bias_grad = lm_head_bias is not None and lm_head_bias.requires_grad
    if torch.is_grad_enabled() and (h.requires_grad or lm_head_weight.requires_grad or bias_grad):
        nll_sum, nll = _WeightedNLL.apply(h, lm_head_weight, lm_head_bias, y[idx], w_act, chunk_size, head_grad)
    else:
        nll = _nll_at(hidden, lm_head_weight, lm_head_bias, labels, idx, chunk_size)  # [N]
        nll_sum = (nll * w_act).sum()
    sums = LossSums(nll_sum=nll_sum, weight_sum=w_act.sum().detach())
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


@torch.no_grad()
def class_nll(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor,
              groups: torch.Tensor, scored: torch.Tensor, chunk_size: int = 1024,
              lm_head_bias=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluation (no grad): (Σ nll, token count) per (group, class), each [G, len(CLASSES)] float64, over the
    labelled positions whose class is scored. classes [B, T] (the class of each label, -1 where none), groups [B, T]
    (ids >= 0, e.g. forward.sequence_ids: one per example), scored [len(CLASSES)] bool. Only scored positions reach
    the lm head, in chunks, as in weighted_nll (the same positions give the same per-token values)."""
    y, cls = labels.reshape(-1), classes.reshape(-1).long()
    on = (y != IGNORE) & (cls >= 0) & scored.to(cls.device)[cls.clamp_min(0)]
    idx = on.nonzero().squeeze(1)
    nll = _nll_at(hidden, lm_head_weight, lm_head_bias, labels, idx, chunk_size)  # [N]
    k, n = len(CLASSES), int(groups.max()) + 1 if groups.numel() else 0
    key = groups.reshape(-1)[idx] * k + cls[idx]
    zero = torch.zeros(n * k, dtype=torch.float64, device=nll.device)
    return (zero.index_add(0, key, nll.double()).view(n, k),
            zero.index_add(0, key, torch.ones_like(nll, dtype=torch.float64)).view(n, k))
