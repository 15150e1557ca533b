"""Held-out tracking during training: the output-token (IT-mask) loss of the model on a fixed sample of the training
conversations and on --eval-data / --val-data, at step 0, every --eval-every steps and at the end; --keep-best.

    eval_sets(cfg, prep, tok) -> {name: (examples, micro-batches)}     built once, by train.setup
    evaluate(run, step, best) -> Best                                  called by train.fit; writes metrics.jsonl
      eval_losses(run)          the forward passes (step 0's may come from imtune.train.baseline's cache)
      keep_best(run, rec, best) the point with the lowest selection loss (val, else eval) so far
    flush(run, best) -> Best                                           writes RUN/best/ if held in memory

Keep-best holds the best point's weights in memory (a CPU copy) and writes RUN/best/ once: before a checkpoint (so
a resume finds it), at the end of training and before a stop. A best point at the last step is final/'s model:
RUN/best/ then holds best.json alone, "same_as": "final" (imtune.rundir.read.best_model follows it), never a copy.
Every improvement used to write 540 MB for the default model (make demo: 2-3 writes per run, ~22 s of its time).
Only a single process without LoRA holds them, and only when a copy takes at most half the free memory; otherwise
every improvement is written at once.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

from imtune.data.pack import make_batches
from imtune.data.prepare import DataSpec, prepare_examples
from imtune.data.weights import loss_spec
from imtune.model.memory import available_bytes
from imtune.model.objective import score_examples
from imtune.rundir.checkpoint import converted
from imtune.train import baseline, saving
from imtune.types import OUTPUT


def eval_sets(cfg, prep, tok) -> dict:
    """name -> (IT-weighted examples, micro-batches): a fixed sample of the training conversations, and --eval-data.
    The IT mask is used whatever the training loss: it is the paper's overfitting signal (output-token loss)."""
    import numpy as np

    if not (cfg.eval_data or cfg.val_data or cfg.eval_every):
        prep.release()  # the conversations of every record: not needed once the examples exist
        return {}
    it = loss_spec("it")
    # The same sample for every seed (a measuring instrument, like the held-out set): seeds compare like with like,
    # and runs that start from one model share their step-0 evaluation (imtune.train.baseline).
    pick = np.random.default_rng(7).permutation(len(prep.examples))[:cfg.eval_train_sample]
    sample = prep.release(sorted(pick.tolist()))  # only the sampled conversations are kept
    sets = {"train": sample} if cfg.eval_train_sample else {}
    out = {}
    for name, data in [*sets.items(), *([("eval", cfg.eval_data)] if cfg.eval_data else []),
                       *([("val", cfg.val_data)] if cfg.val_data else [])]:
        p = prepare_examples(data, tok, it, DataSpec.of(cfg, on_invalid="skip", limit=None))
        if p.examples:
            out[name] = (p.examples, make_batches(p.examples, cfg.batch_size, cfg.max_length, cfg.packing, 0, 0))
    return out


@dataclass(frozen=True)
class Best:
    """--keep-best's lowest selection loss so far; `info` and `state` (a CPU copy of the weights) of that point while
    RUN/best/ does not hold it yet (flush writes it)."""
    loss: float = math.inf
    info: dict | None = None
    state: dict | None = None


def evaluate(run, step: int, best: Best | None) -> Best | None:
    """Score the model now on every evaluation set, log it ("eval" and "eval_examples" lines), and with --keep-best
    keep the point when it is the best so far. Returns the best so far (None: not read yet)."""
    rec = {"type": "eval", "step": step, "epoch": run.schedule.epoch_at(step)}
    cached = step == 0 and baseline.usable(run)
    k = baseline.key(run) if cached else None
    hit = baseline.read(k) if cached else None
    losses, per_example = hit if hit is not None else eval_losses(run, step)
    if cached and hit is None:
        baseline.write(k, (losses, per_example), run.dir)
    rec.update(losses)
    run.log.write(rec)
    run.log.write({"type": "eval_examples", "step": step, "sets": per_example})
    if run.cfg.keep_best:
        best = keep_best(run, rec, best)
    run.log.note(f"eval @ step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in rec.items() if k.endswith("_loss")
                                                    and v is not None)
                 + (" (the untouched model's scores, cached by an earlier run: imtune.train.baseline)" if hit else ""))
    return best


def eval_losses(run, step: int | None = None) -> tuple[dict, dict]:
    """Output-token loss of the model now on every evaluation set: ({"<set>_output_loss", "<set>_output_tokens"},
    {set: {"source", "output_nll", "output_tokens"} per example}: what compare's intervals resample). The one
    evaluation loop (model.objective.score_examples, the output classes only). A progress bar (run.log.subtask)
    counts the micro-batches: the training bar stands still meanwhile."""
    world = run.acc.num_processes
    rounds = sum(math.ceil(len(batches) / world) for _, batches in run.eval_sets.values())
    bar = run.log.subtask(rounds, "evaluating" if step is None else f"evaluating (step {step})")
    rec, per_example = {}, {}
    for name, (examples, batches) in run.eval_sets.items():
        scores = score_examples(run.objective, examples, batches, run.collate, OUTPUT, run.acc,
                                None if bar is None else bar.update)
        nll, w = scores.of(OUTPUT)
        total = sum(w)
        rec[f"{name}_output_loss"] = math.fsum(nll) / total if total else None
        rec[f"{name}_output_tokens"] = int(total)
        per_example[name] = {"source": [str(x) for x in examples.sources], "output_nll": nll, "output_tokens": w}
    if bar is not None:
        bar.close()
    return rec, per_example


def keep_best(run, rec: dict, best: Best | None) -> Best:
    """--keep-best: keep this evaluation's point when its selection loss (val, else eval) is lower than `best`'s, the
    lowest so far; return the new best. Ties keep the earlier point. best=None: read it from RUN/best/best.json (the
    best so far survives a resume), or +inf when there is none. The weights are held in memory when they may be
    (module docstring), else RUN/best/ is written now."""
    key = "val_output_loss" if "val" in run.eval_sets else "eval_output_loss"
    loss = rec.get(key)
    if best is None:
        saved = run.dir / "best" / "best.json"
        best = Best(json.loads(saved.read_text())["loss"] if saved.exists() else math.inf)
    if loss is None or not loss < best.loss:
        return best
    info = {"step": rec["step"], "loss": loss, "selected_on": key}
    last = rec["step"] == run.schedule.total_steps  # final/'s model: best/ says so, no copy is held or written
    state = None if last else held_copy(run)
    if state is None:
        saving.save_final(run, name="best", info=info)
    return Best(loss, info, state)


def flush(run, best: Best | None) -> Best | None:
    """Write RUN/best/ from the weights held in memory, if any; the best so far, no longer held."""
    if best is None or best.state is None:
        return best
    saving.save_final(run, name="best", info=best.info, state=best.state)
    return Best(best.loss)


def held_copy(run) -> dict | None:
    """A CPU copy of the model's state dict (tied tensors stay one tensor), or None where it is not to be held: several
    processes (the weights are sharded or gathered collectively), LoRA (its save is small anyway), or a copy larger
    than half the free memory."""
    import torch

    if run.acc.num_processes > 1 or run.cfg.lora or (run.memory is not None and not run.memory.hold_best):
        return None
    state = run.model.state_dict()
    unique = {t.untyped_storage().data_ptr(): t for t in state.values() if isinstance(t, torch.Tensor)}
    size = sum(t.untyped_storage().nbytes() for t in unique.values())
    if size > available_bytes() / 2:
        return None
    return converted(state, device="cpu")
