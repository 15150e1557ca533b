"""Micro-benchmarks of the loss head and the optimizer (before/after figures, not part of the peer comparison),
alternating the two variants in one process.

  loss   imtune.model.loss.weighted_nll before issue 7 (chunks under torch.utils.checkpoint: logits computed twice,
  three
         softmax passes) vs now (each chunk's gradient formed in the forward pass: 6·V·H FLOPs per weighted position
         instead of 8·V·H, one softmax pass). Checked equal (loss and gradients) before timing.
  adamw  torch.optim.AdamW default (foreach, imtune before issue 7) vs fused=True (imtune now), on the
         parameter shapes of the model.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import alternate, child_main, ratios  # noqa: E402


def _sums(fn):
    def f(hidden, weight, labels, weights, chunk_size):
        out = fn(hidden, weight, labels, weights, chunk_size)
        return out.nll_sum, out.weight_sum
    return f


def main(hidden: int = 256, vocab: int = 49152, tokens: int = 2048, share: float = 0.8, chunk_size: int = 1024,
         threads: int = 2, repeats: int = 5, layers_params: int = 3_100_000) -> dict:
    import torch

    from bench_variants import before_weighted_nll
    from imtune.model.loss import weighted_nll

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    W = (torch.randn(vocab, hidden) * 0.02).requires_grad_()
    H = torch.randn(1, tokens, hidden, requires_grad=True)
    labels = torch.randint(0, vocab, (1, tokens))
    weights = (torch.rand(1, tokens) < share).float()
    labels[weights == 0] = -100

    def run(fn):
        W.grad = H.grad = None
        nll, ws = fn(H, W, labels, weights, chunk_size)
        nll.backward()
        return nll.detach(), W.grad.clone(), H.grad.clone()

    ref = run(_sums(before_weighted_nll))
    new = run(_sums(weighted_nll))
    check = {"loss_rel_err": float((ref[0] - new[0]).abs() / ref[0].abs()),
             "grad_w_max_err": float((ref[1] - new[1]).abs().max()),
             "grad_h_max_err": float((ref[2] - new[2]).abs().max())}
    assert check["loss_rel_err"] < 1e-5 and torch.allclose(ref[1], new[1], atol=1e-5) \
        and torch.allclose(ref[2], new[2], atol=1e-5), check
    sides = {"checkpointed": lambda _: run(_sums(before_weighted_nll)), "fused": lambda _: run(_sums(weighted_nll))}
    t = alternate(sides, repeats)
    out = {"shape": {"hidden": hidden, "vocab": vocab, "tokens": tokens, "weighted_share": share,
                     "chunk": chunk_size}, "check": check, "seconds": t,
           "speedup_fused": ratios(t["checkpointed"], t["fused"]).as_dict()}

    # AdamW: foreach (default) vs fused, on a model-shaped parameter set (head/embedding + body).
    params = [torch.nn.Parameter(torch.randn(vocab, hidden)), torch.nn.Parameter(torch.randn(layers_params))]
    for p in params:
        p.grad = torch.randn_like(p)
    opts = {"foreach": torch.optim.AdamW(params, lr=1e-5), "fused": torch.optim.AdamW(params, lr=1e-5, fused=True)}
    for o in opts.values():
        o.step()
    t = alternate({k: (lambda _, o=o: o.step()) for k, o in opts.items()}, repeats)
    out["adamw_seconds"] = t
    out["adamw_speedup_fused"] = ratios(t["foreach"], t["fused"]).as_dict()
    return out


if __name__ == "__main__":
    child_main(main)
    print(json.dumps(main(**(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {})), indent=1))
