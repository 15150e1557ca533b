"""Variants of imtune's training code for before/after figures, switched per benchmark side inside one process.

  before_loss     imtune.model.loss.weighted_nll as it was before issue 7 (a8a5635): chunks under
  torch.utils.checkpoint,
                  so every chunk's logits are computed twice and log-softmax runs three times.
  before_batches  imtune.data.pack.make_batches as it was before issue 7: shuffled bins cut into micro-batches without
                  regard to their lengths (rows padded to the longest of their micro-batch).
  before_adamw    imtune.train.build.build_optimizer as it was before issue 7: torch.optim.AdamW's default (foreach)
  step,
                  not fused=True.

install() routes imtune's loss, batching and optimizer construction through dispatchers once; use(names) picks the
variants in force for the side about to run (the trainer binds the loss at import, so a dispatcher is the only way
to switch it per side; micro-batches are fixed when a side is set up).
"""
from __future__ import annotations

KNOWN = ("before_loss", "before_batches", "before_adamw")
ACTIVE: set[str] = set()
_ORIGINAL: dict = {}


# -- before: the checkpointed chunked loss (a8a5635) ------------------------------------------------------------
def before_weighted_nll(hidden, lm_head_weight, labels, weights, chunk_size: int = 1024, classes=None,
                        lm_head_bias=None, head_grad=None):
    """The loss head as it was (head_grad did not exist: the head's gradient goes through autograd, which is as
    correct, with a [V, H] buffer held to the end of backward)."""
    import torch

    from imtune.model import loss as L

    def nll_at(idx):  # the checkpointed chunks: imtune.model.loss._nll_at, still used there for unweighted positions
        return L._nll_at(hidden, lm_head_weight, lm_head_bias, labels, idx, chunk_size)

    y, w = labels.reshape(-1), weights.reshape(-1).float()
    labelled = y != L.IGNORE
    active = labelled & (w > 0)
    idx = active.nonzero().squeeze(1)
    nll = nll_at(idx)
    w_act = w[idx]
    sums = L.LossSums(nll_sum=(nll * w_act).sum(), weight_sum=w_act.sum().detach())
    if classes is not None:
        with torch.no_grad():
            rest = (labelled & ~active).nonzero().squeeze(1)
            nll_all = torch.cat([nll.detach(), nll_at(rest)])
            cls = classes.reshape(-1)[torch.cat([idx, rest])].long()
            k = len(L.CLASSES)
            per_sum = torch.zeros(k, dtype=torch.float64).index_add_(0, cls, nll_all.double())
            per_n = torch.bincount(cls, minlength=k)
            sums.per_class = {L.CLASSES[c]: (s, float(n)) for c, (s, n) in
                              enumerate(zip(per_sum.tolist(), per_n.tolist())) if n}
    return sums


# -- before: micro-batches without length grouping -------------------------------------------------------------
def before_make_batches(examples, batch_size, max_length, packed, seed, epoch, drop_last=False):
    import numpy as np

    from imtune.data import pack

    if not packed:
        return _ORIGINAL["make_batches"](examples, batch_size, max_length, packed, seed, epoch, drop_last)
    rng = np.random.default_rng([seed, epoch])
    bins = pack.pack_examples(examples, max_length)
    order = rng.permutation(len(bins))
    groups = [sorted(order[s:s + batch_size].tolist()) for s in range(0, len(bins), batch_size)]
    if drop_last and groups and len(groups[-1]) < batch_size:
        groups.pop()
    return [[i for b in group for i in bins[b]] for group in groups]


# -- before: AdamW's default (foreach) step ----------------------------------------------------------------
def before_adamw(cfg, model):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.peak_lr, betas=(0.9, 0.999), eps=1e-8)


def _loss_dispatch(*args, **kw):
    return (before_weighted_nll if "before_loss" in ACTIVE else _ORIGINAL["weighted_nll"])(*args, **kw)


def _optimizer_dispatch(cfg, model):
    return (before_adamw if "before_adamw" in ACTIVE else _ORIGINAL["build_optimizer"])(cfg, model)


def _batches_dispatch(*args, **kw):
    return (before_make_batches if "before_batches" in ACTIVE else _ORIGINAL["make_batches"])(*args, **kw)


def install() -> None:
    from imtune.data import pack
    from imtune.model import loss, objective
    from imtune.train import build

    if _ORIGINAL:
        return
    _ORIGINAL.update(weighted_nll=loss.weighted_nll, build_optimizer=build.build_optimizer,
                     make_batches=pack.make_batches)
    loss.weighted_nll = objective.weighted_nll = _loss_dispatch  # objective binds it at import
    build.build_optimizer = _optimizer_dispatch
    pack.make_batches = _batches_dispatch


def use(names) -> None:
    unknown = set(names) - set(KNOWN)
    if unknown:
        raise ValueError(f"unknown variant(s) {sorted(unknown)}; known: {KNOWN}")
    install()
    ACTIVE.clear()
    ACTIVE.update(names)
