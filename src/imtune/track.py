"""Held-out tracking during training: the output-token (IT-mask) loss of the model on a fixed sample of the training
conversations and on --eval-data / --val-data, at step 0, every --eval-every steps and at the end; --keep-best.

    eval_sets(cfg, prep, tok) -> {name: (examples, micro-batches)}     built once, by train.setup
    evaluate(run, step, best) -> best so far                           called by train.fit; writes metrics.jsonl
      eval_losses(run)          the forward passes (step 0's may come from imtune.baseline's cache)
      keep_best(run, rec, best) RUN/best/ when the selection loss (val, else eval) is the lowest so far
"""
from __future__ import annotations

import json
import math


def eval_sets(cfg, prep, tok) -> dict:
    """name -> (IT-weighted examples, micro-batches): a fixed sample of the training conversations, and --eval-data.
    The IT mask is used whatever the training loss: it is the paper's overfitting signal (output-token loss)."""
    import numpy as np

    from .pack import make_batches
    from .prepare import prepare_examples
    from .weights import loss_spec

    if not (cfg.eval_data or cfg.val_data or cfg.eval_every):
        prep.release()  # the conversations of every record: not needed once the examples exist
        return {}
    it = loss_spec("it")
    # The same sample for every seed (a measuring instrument, like the held-out set): seeds compare like with like,
    # and runs that start from one model share their step-0 evaluation (imtune.baseline).
    pick = np.random.default_rng(7).permutation(len(prep.examples))[:cfg.eval_train_sample]
    sample = prep.release(sorted(pick.tolist()))  # only the sampled conversations are kept
    sets = {"train": sample} if cfg.eval_train_sample else {}
    out = {}
    for name, data in [*sets.items(), *([("eval", cfg.eval_data)] if cfg.eval_data else []),
                       *([("val", cfg.val_data)] if cfg.val_data else [])]:
        p = prepare_examples(data, tok, it, cfg.template, cfg.max_length, cfg.truncation, cfg.format, cfg.fields,
                             on_invalid="skip", special_tokens_in_content=cfg.special_tokens_in_content,
                             roles=cfg.roles, system_prompt=cfg.system_prompt)
        if p.examples:
            out[name] = (p.examples, make_batches(p.examples, cfg.batch_size, cfg.max_length, cfg.packing,
                                                  tok.pad_token_id, 0, 0))
    return out


def evaluate(run, step: int, best: float | None) -> float | None:
    """Score the model now on every evaluation set, log it ("eval" and "eval_examples" lines), and with --keep-best
    save RUN/best/ when it is the best point so far. Returns the best selection loss so far (None: not read yet)."""
    from . import baseline

    rec = {"type": "eval", "step": step, "epoch": run.schedule.epoch_at(step)}
    cached = step == 0 and baseline.usable(run)
    k = baseline.key(run) if cached else None
    hit = baseline.read(k) if cached else None
    losses, per_example = hit if hit is not None else eval_losses(run)
    if cached and hit is None:
        baseline.write(k, (losses, per_example), run.dir)
    rec.update(losses)
    run.log.write(rec)
    run.log.write({"type": "eval_examples", "step": step, "sets": per_example})
    if run.cfg.keep_best:
        best = keep_best(run, rec, best)
    run.log.note(f"eval @ step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in rec.items() if k.endswith("_loss")
                                                    and v is not None)
                 + (" (the untouched model's scores, cached by an earlier run: imtune.baseline)" if hit else ""))
    return best


def eval_losses(run) -> tuple[dict, dict]:
    """Output-token loss of the model now on every evaluation set: ({"<set>_output_loss", "<set>_output_tokens"},
    {set: {"source", "output_nll", "output_tokens"} per example}: what compare's intervals resample)."""
    import torch

    from .objective import batch_args

    acc, obj, world = run.acc, run.objective, run.acc.num_processes
    obj.eval()
    rec, per_example = {}, {}
    with torch.no_grad():
        for name, (examples, batches) in run.eval_sets.items():
            sums = torch.zeros(2, len(examples), dtype=torch.float64, device=acc.device)  # Σw·nll, Σw per example
            for j in range(math.ceil(len(batches) / world)):
                k = acc.process_index + j * world
                idx, keep = (batches[k], True) if k < len(batches) else (batches[0], False)  # stand-in: not kept
                _, _, out = obj(*batch_args(run.collate(idx, examples)), per_example=True)
                if keep:
                    sums[:, idx] += torch.stack(out.per_group)
            if world > 1:
                sums = acc.reduce(sums, reduction="sum")
            nll, w = sums.tolist()
            total = math.fsum(w)
            rec[f"{name}_output_loss"] = math.fsum(nll) / total if total else None
            rec[f"{name}_output_tokens"] = int(total)
            per_example[name] = {"source": [str(x) for x in examples.sources], "output_nll": nll,
                                 "output_tokens": [int(x) for x in w]}
    obj.train()
    return rec, per_example


def keep_best(run, rec: dict, best: float | None) -> float:
    """--keep-best: save the model as RUN/best/ when this evaluation's selection loss (val, else eval) is lower than
    `best`, the lowest so far; return the new lowest. Ties keep the earlier point. best=None: read it from
    RUN/best/best.json (the best so far survives a resume), or +inf when there is none."""
    from . import saving

    key = "val_output_loss" if "val" in run.eval_sets else "eval_output_loss"
    loss = rec.get(key)
    if best is None:
        saved = run.dir / "best" / "best.json"
        best = json.loads(saved.read_text())["loss"] if saved.exists() else math.inf
    if loss is None or not loss < best:
        return best
    saving.save_final(run, name="best", info={"step": rec["step"], "loss": loss, "selected_on": key})
    return loss
