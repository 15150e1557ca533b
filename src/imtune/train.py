"""`train(cfg) -> run directory`: instruction tuning with exact per-token loss weights, on accelerate.

Read it top to bottom: `setup()` turns a TrainConfig into everything the loop needs, `fit()` is the loop,
`evaluate()` and the savers sit beside it; `train()` calls them in order.

The loss. Every token carries a weight (imtune.weights: the loss mode's class -> weight table). An optimizer step
consumes `grad_accum × processes` micro-batches; W = Σw over all of them is known from the data before any forward
pass. Each process back-propagates  processes · Σ_its micro-batches (w·nll + kl_coef · w·KL) / W,  and DDP averages
gradients over processes, so the update is that of  Σw·nll / Σw  over the whole step however it is split into
micro-batches, accumulation steps and processes (tests/test_train.py checks 4×2 = 1×8 = 2 processes × 2×2).
`--normalize sequences` rescales each example's weights to sum to 1 first: W counts examples. `--normalize nonzero`
divides Σw·nll by the number of tokens with w > 0 instead (step_normalisers).

The run directory (evaluation, comparison and reports read only this; keep the names):

    RUN/
      config.yaml           the resolved TrainConfig (a valid CONFIG.yaml: `imtune train RUN/config.yaml` repeats it)
      data_stats.json       what preparation did (kept / truncated / skipped and why), token counts, batch geometry
      chat_template.jinja   the template the examples were rendered with (also inside final/)
      metrics.jsonl         one line per optimizer step, plus "type": "eval" lines and, beside each, an
                            "eval_examples" line with per-example output sums (imtune.runlog)
      tensorboard/          with --tensorboard
      checkpoints/step-N/   weights or adapter (safetensors), optimizer, scheduler, trainer state (imtune.checkpoint)
      best/                 with --keep-best: the model of the evaluation point with the lowest val (or eval)
                            output loss, same format as final/, and best/best.json (step, loss, selected on)
      final/                AutoModelForCausalLM.from_pretrained(RUN/final) + AutoTokenizer (with the chat template);
                            --lora (no --merge-lora): the adapter + HOW_TO_LOAD.md (+ RUN/base/ for random bases)
      DONE                  written last (JSON summary); checkpoint.is_finished(RUN) -> train() returns at once

Multi-process: `accelerate launch` (or torchrun) starts N copies; each rank takes micro-batches r, r+N, ... of every
step (a zero-weight stand-in when a short last step leaves it none, so every rank runs the same number of passes);
only rank 0 writes files.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from . import checkpoint as ckpt, guard
from .config import TrainConfig
from .distributed import (
    FullStateOptimizer,
    full_model_state,
    full_tensor,
    gradient_sync,
    is_fsdp,
    needs_cpu_fsdp,
    resume_supported,
    shard_on_cpu,
)
from .precision import resolve as resolve_precision
from .runlog import RunLog, say, write_run_files
from .types import CLASS_ID, UsageError

OUTPUT_CLASSES = (CLASS_ID["assistant"], CLASS_ID["eot"])
INSTRUCTION_CLASSES = (CLASS_ID["user"], CLASS_ID["system"])


class TrainingStopped(UsageError):
    """The run cannot go on (a non-finite loss): printed for a person, without a traceback."""


def train(cfg: TrainConfig) -> Path:
    """Train as `cfg` says; return the run directory (RUN/final/ holds the model). Idempotent on finished runs."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers' load/save bars would tear through ours
    try:
        run = setup(cfg)
        if run.finished:
            say(f"{run.dir}: already finished (DONE); nothing to do")
            return run.dir
        try:
            fit(run)
            save_final(run)
        finally:
            run.log.close()
        return run.dir
    finally:
        guard.release()  # the run directory's lock (taken in setup)
        if bars:
            hf_logging.enable_progress_bar()


# ----------------------------------------------------------------------------------------------------------------
# The loop
def fit(run: Run) -> None:
    import torch

    cfg, acc, obj = run.cfg, run.acc, run.objective
    rank, world = acc.process_index, acc.num_processes
    tokens, t_start = run.tokens, time.perf_counter()
    if run.start_step == 0 and run.eval_sets:
        evaluate(run, 0)
    obj.train()
    for step in range(run.start_step, run.total_steps):
        t0 = time.perf_counter()
        mbs = run.step_batches(step)  # this step's micro-batches (lists of example indices), all ranks
        W = run.weight_of(mbs)  # Σw over the whole step, from the data: the one normaliser
        rounds = math.ceil(len(mbs) / world)  # every rank runs the same number of passes
        seed_step(cfg.seed, step, rank)  # RNG state is a function of (seed, step, rank): resume is exact
        dev = torch.zeros(2, dtype=torch.float64, device=acc.device)  # Σw·nll, Σw·KL (no sync until step end)
        host = [0.0] * 4  # Σnll, n over output tokens; Σnll, n over instruction tokens (logging only)
        for j in range(rounds):
            k = rank + j * world
            idx, keep = (mbs[k], 1.0) if k < len(mbs) else (mbs[0], 0.0)  # stand-in pass: zero loss
            batch = run.collate(idx)
            with gradient_sync(acc, obj, sync=j == rounds - 1):
                nll, kl, sums = obj(*batch_args(batch), classes=batch.classes if cfg.log_class_losses else None,
                                    kl=cfg.kl_coef > 0)
                acc.backward((nll + cfg.kl_coef * kl) * (keep * world / W))
            dev += torch.stack([nll.detach(), kl.detach()]).double() * keep
            add_class_sums(host, sums.per_class, keep)
        stats = torch.cat([dev, torch.tensor(host, dtype=torch.float64, device=acc.device)])
        if world > 1:
            stats = acc.reduce(stats, reduction="sum")
        norm = acc.clip_grad_norm_(obj.parameters(), cfg.max_grad_norm or float("inf"))  # no clipping: ×1.0
        has_norm = norm is not None  # DeepSpeed clips inside its own step and returns None
        norm = full_tensor(norm) if has_norm else torch.zeros(1, device=acc.device)  # FSDP2: a DTensor
        nll_sum, kl_sum, o_sum, o_n, i_sum, i_n, grad_norm = torch.cat([stats, norm.double().view(1)]).tolist()
        loss = nll_sum / W  # the one host sync of the step is the .tolist() above
        if not (math.isfinite(loss) and math.isfinite(kl_sum) and math.isfinite(grad_norm)):
            stop(run, step + 1, loss, grad_norm)
        lr = run.scheduler.get_last_lr()[0]
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)

        done = step + 1
        step_tokens = sum(run.lengths[i] for idx in mbs for i in idx)
        tokens += step_tokens
        rec = {"type": "train", "step": done, "epoch": round(done / run.steps_per_epoch, 4), "loss": loss,
               "loss_output": o_sum / o_n if o_n else None, "loss_instruction": i_sum / i_n if i_n else None,
               "lr": lr, "grad_norm": grad_norm if has_norm else None,
               "tokens_per_s": step_tokens / (time.perf_counter() - t0), "tokens": tokens,
               "time": round(time.perf_counter() - t_start, 3)}
        if cfg.kl_coef:
            rec["kl"] = kl_sum / W
        run.log.write(rec)
        if run.eval_sets and cfg.eval_every and done % cfg.eval_every == 0 and done < run.total_steps:
            evaluate(run, done)
        if cfg.save_every and (done % cfg.save_every == 0 or done == run.total_steps):
            save_checkpoint(run, done, tokens)
    if run.eval_sets:
        evaluate(run, run.total_steps)
    run.tokens = tokens


def batch_args(batch) -> tuple:
    return batch.input_ids, batch.position_ids, batch.attention_mask, batch.labels, batch.weights


def add_class_sums(host: list[float], per_class: dict | None, keep: float) -> None:
    """Fold weighted_nll's per-class (Σnll, count) into [out Σ, out n, instr Σ, instr n]."""
    from .types import CLASSES

    for name, (s, n) in (per_class or {}).items():
        c = CLASSES.index(name)
        at = 0 if c in OUTPUT_CLASSES else 2 if c in INSTRUCTION_CLASSES else None
        if at is not None:
            host[at] += s * keep
            host[at + 1] += n * keep


def seed_step(seed: int, step: int, rank: int) -> None:
    import numpy as np
    import torch

    torch.manual_seed(int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0]))


def stop(run: Run, step: int, loss: float, grad_norm: float) -> None:
    last = ckpt.last_good(run.dir)  # verified: a damaged checkpoint is never called good
    what = "loss" if not math.isfinite(loss) else "gradient norm"
    msg = (f"step {step}: the {what} is {loss if what == 'loss' else grad_norm}; training stopped before this "
           f"update. Last good checkpoint: {last or 'none (use --save-every)'}. Try a lower --lr, "
           f"--max-grad-norm 1, --precision fp32, or look for broken examples in the data.")
    run.log.write({"type": "stopped", "step": step, "reason": msg})
    raise TrainingStopped(msg)


# ----------------------------------------------------------------------------------------------------------------
# Held-out tracking: output-token (IT-mask) loss on a fixed training sample and on --eval-data.
def evaluate(run: Run, step: int) -> dict:
    from . import baseline

    rec = {"type": "eval", "step": step, "epoch": round(step / run.steps_per_epoch, 4)}
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
        keep_best(run, rec)
    run.log.note(f"eval @ step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in rec.items() if k.endswith("_loss")
                                                    and v is not None)
                 + (" (the untouched model's scores, cached by an earlier run: imtune.baseline)" if hit else ""))
    return rec


def eval_losses(run: Run) -> tuple[dict, dict]:
    """Output-token loss of the model now on every evaluation set: ({"<set>_output_loss", "<set>_output_tokens"},
    {set: {"source", "output_nll", "output_tokens"} per example}: what compare's intervals resample)."""
    import torch

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


# ----------------------------------------------------------------------------------------------------------------
# Saving
def trainer_state(run: Run, step: int, tokens: int) -> dict:
    return {"step": step, "tokens": tokens, "data_fingerprint": run.fingerprint, "processes": run.acc.num_processes,
            "grad_accum": run.grad_accum, "batch_size": run.cfg.batch_size, "packing": run.cfg.packing,
            "seed": run.cfg.seed, "total_steps": run.total_steps,
            "rng": "torch reseeded at every step from (seed, step, rank); data order from (seed, epoch)"}


def sharded(acc) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def _state_dict(run: Run):
    """Full weights gathered to rank 0 (FSDP/DeepSpeed), None where the model's own state_dict is right."""
    if is_fsdp(run.objective):
        return full_model_state(run.objective)
    if not sharded(run.acc):
        return None
    full = run.acc.get_state_dict(run.objective)
    return {k.removeprefix("model."): v for k, v in full.items()}


def _optimizer(run: Run):
    """What the checkpoint code saves and restores: FSDP2's AdamW state as one full state dict keyed by parameter
    name (exact resume on any number of processes); None under DeepSpeed (its state stays in its engine)."""
    if is_fsdp(run.objective):
        return FullStateOptimizer(run.objective, run.optimizer)
    return None if sharded(run.acc) else run.optimizer


def save_checkpoint(run: Run, step: int, tokens: int) -> None:
    state = _state_dict(run)
    optimizer = _optimizer(run)
    if optimizer is not None and optimizer is not run.optimizer:
        optimizer = Gathered(optimizer.state_dict())  # a collective: every rank gathers, rank 0 writes
    if run.acc.is_main_process:
        path = ckpt.save_checkpoint(run.dir, step, run.model, state, optimizer, run.scheduler,
                                    trainer_state(run, step, tokens), run.cfg.keep_checkpoints)
        run.log.note(f"checkpoint: {path}")
    run.acc.wait_for_everyone()


class Gathered:
    """An optimizer state already gathered, for the checkpoint writer (`state_dict()`)."""

    def __init__(self, state: dict):
        self.state = state

    def state_dict(self) -> dict:
        return self.state


def keep_best(run: Run, rec: dict) -> None:
    """--keep-best: save the model as RUN/best/ when this evaluation's selection loss (val, else eval) is the lowest
    so far. Ties keep the earlier point. The best so far survives a resume through best/best.json."""
    key = "val_output_loss" if "val" in run.eval_sets else "eval_output_loss"
    loss = rec.get(key)
    if run.best is None:
        saved = run.dir / "best" / "best.json"
        run.best = json.loads(saved.read_text())["loss"] if saved.exists() else math.inf
    if loss is None or not loss < run.best:
        return
    run.best = loss
    save_final(run, name="best", info={"step": rec["step"], "loss": loss, "selected_on": key})


def save_final(run: Run, name: str = "final", info: dict | None = None) -> None:
    from .generate import stop_token_ids

    state = _state_dict(run)
    if run.acc.is_main_process:
        try:
            final = ckpt.save_final(run.dir, run.model, state, run.tokenizer, run.renderer.jinja,
                                    stop_token_ids(run.tokenizer, run.renderer), run.cfg.lora, run.cfg.merge_lora,
                                    run.base_dir, name=name, info=info)
        except ckpt.WriteFailed as e:
            if name != "final":  # best/ is a convenience; the run goes on (its checkpoints and final/ are intact)
                raise
            raise ckpt.rescue_weights(run.dir, e, run.total_steps, lambda root: ckpt.save_checkpoint(  # never lose
                root, run.total_steps, run.model, state, None, run.scheduler,  # the trained weights to a failed save
                trainer_state(run, run.total_steps, run.tokens), 0,
                optimizer_note="left out: written after the last step, when final/ could not be")) from None
        if name == "final":
            last = ckpt.latest_checkpoint(run.dir)
            ckpt.mark_done(run.dir, {"steps": run.total_steps, "tokens": run.tokens, "final": str(final),
                                     "last_checkpoint": str(last) if last else None})
            run.log.note(f"final model: {final}")
        else:
            run.log.note(f"{name} model (step {info['step']}, {info['selected_on']} {info['loss']:.4f}): {final}")
    run.acc.wait_for_everyone()  # every rank, whichever model was saved


# ----------------------------------------------------------------------------------------------------------------
# Setup: config -> data, model, optimizer, schedule, run directory.
@dataclass
class Run:
    cfg: TrainConfig
    dir: Path
    finished: bool
    acc: object = None
    model: object = None  # the causal LM (peft-wrapped with --lora), unwrapped
    ref: object = None  # frozen starting model for --kl-coef (full fine-tuning; LoRA switches its adapter off)
    objective: object = None  # Objective(model), prepared by accelerate (DDP/FSDP-wrapped)
    optimizer: object = None
    scheduler: object = None
    tokenizer: object = None
    renderer: object = None
    base_dir: str | None = None
    examples: list = None
    lengths: list = None
    ex_weight: list = None  # Σ_{t>=1} w_t per example (float32 values, as collate will make them)
    eval_sets: dict = None  # name -> (examples, micro-batches)
    grad_accum: int = 1
    steps_per_epoch: int = 1
    total_steps: int = 0
    start_step: int = 0
    tokens: int = 0
    fingerprint: str = ""
    precision: object = None  # imtune.precision.Precision: what --precision resolved to, and why
    log: RunLog = None
    best: float | None = None  # --keep-best: the lowest selection loss so far (None: not yet read)
    _epoch: tuple = (-1, None)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        from .pack import make_batches

        if self._epoch[0] != epoch:
            self._epoch = (epoch, make_batches(self.examples, self.cfg.batch_size, self.cfg.max_length,
                                               self.cfg.packing, self.tokenizer.pad_token_id, self.cfg.seed, epoch))
        return self._epoch[1]

    def step_batches(self, step: int) -> list[list[int]]:
        epoch, k = divmod(step, self.steps_per_epoch)
        per_step = self.grad_accum * self.acc.num_processes
        return self.epoch_batches(epoch)[k * per_step:(k + 1) * per_step]

    def weight_of(self, mbs: list[list[int]]) -> float:
        return math.fsum(self.ex_weight[i] for idx in mbs for i in idx)  # exact: the same for any split

    def collate(self, idx: list[int], examples: list | None = None):
        from .pack import collate

        ex = self.examples if examples is None else examples
        return collate([ex[i] for i in idx], self.cfg.packing, self.cfg.max_length,
                       self.tokenizer.pad_token_id).to(self.acc.device)


def setup(cfg: TrainConfig) -> Run:
    from .models import load_tokenizer
    from .pack import lengths_of, make_batches
    from .prepare import prepare_examples
    from .weights import loss_spec

    cfg = cfg.check()
    prec = resolve_precision(cfg.precision)  # auto on a CPU: measured (imtune.precision)
    acc = make_accelerator(cfg, prec)
    run_dir = Path(cfg.output_dir or default_output_dir(cfg, acc))
    guard.lock(run_dir, acc)  # one writer per run directory: before anything in it is read or written
    if ckpt.is_finished(run_dir):
        guard.check_finished(run_dir, cfg)  # "already finished" only for the same settings
        return Run(cfg, run_dir, finished=True)
    if acc.is_main_process:
        ckpt.clean_partial(run_dir)  # temporary directories of an interrupted writer
    resume_from = ckpt.find_resume(cfg.resume, run_dir)
    changes = guard.check_resume(run_dir, resume_from, cfg) if resume_from is not None else {}
    if resume_from is not None and not resume_supported(acc):
        raise UsageError("--resume under DeepSpeed: imtune does not gather DeepSpeed's sharded optimizer state, so a "
                         "resume would restart the AdamW moments (an inexact run); use FSDP "
                         "(configs/accelerate/fsdp.yaml) or DDP for resumable runs, or start over")
    set_threads(cfg, acc)

    # -- data: tokenised once; each rank does the same deterministic work
    tok = load_tokenizer(cfg.model)
    spec = loss_spec(cfg.loss, cfg.prompt_weight, cfg.weights, cfg.last_turn_only)
    prep = prepare_examples(cfg.data, tok, spec, cfg.template, cfg.max_length, cfg.truncation, cfg.format,
                            cfg.fields, cfg.on_invalid, limit=cfg.limit, roles=cfg.roles,
                            system_prompt=cfg.system_prompt,
                            special_tokens_in_content=cfg.special_tokens_in_content)
    if not prep.examples:
        raise UsageError(f"{cfg.data}: no example left to train on ({prep.summary()})")
    examples = per_sequence(prep.examples) if cfg.normalize == "sequences" else prep.examples
    run = Run(cfg, run_dir, finished=False, acc=acc, tokenizer=tok, renderer=prep.renderer, examples=examples,
              precision=prec)
    run.lengths = lengths_of(examples)
    run.ex_weight = step_normalisers(examples, cfg.normalize)
    run.fingerprint = fingerprint(examples)
    run.eval_sets = eval_sets(cfg, prep, tok, make_batches)

    # -- schedule: micro-batches per epoch are fixed by the data; an optimizer step takes grad_accum × processes
    run.grad_accum = resolve_grad_accum(cfg, acc.num_processes)
    n_micro = len(run.epoch_batches(0))
    run.steps_per_epoch = math.ceil(n_micro / (run.grad_accum * acc.num_processes))
    run.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * run.steps_per_epoch))

    # -- model, optimizer, schedule, (resume)
    run.model, run.ref, run.base_dir = build_model(cfg, acc)
    if resume_from is not None:
        state = ckpt.read_trainer_state(resume_from)
        ckpt.check_resumable(state, trainer_state(run, state["step"], 0), run.total_steps, resume_from)
        ckpt.load_weights(run.model, resume_from, cfg.lora)
        run.start_step, run.tokens = state["step"], state["tokens"]
    from .objective import Objective

    objective = Objective(run.model, cfg.chunk_size, cfg.neftune_alpha, run.ref)
    if needs_cpu_fsdp(acc):  # accelerate runs FSDP on accelerators only: on CPU imtune shards (imtune.distributed)
        shard_on_cpu(objective, acc)
        optimizer = build_optimizer(cfg, run.model)  # over the DTensor shards
        run.objective, run.optimizer = objective, acc.prepare(optimizer)
    else:
        optimizer = build_optimizer(cfg, run.model)
        run.objective, run.optimizer = acc.prepare(objective, optimizer)
    run.scheduler = build_scheduler(cfg, optimizer, run.total_steps)  # stepped by us, once per optimizer step
    if resume_from is not None and not ckpt.load_optimizer(_optimizer(run), run.scheduler, resume_from):
        if run.start_step < run.total_steps:
            raise UsageError(f"{resume_from} holds no optimizer state ({ckpt.optimizer_note(resume_from)}): resuming "
                             "would restart the AdamW moments and train a different run; start over, or train from "
                             f"its weights as a new run (--model {resume_from})")
        say(f"{resume_from}: {ckpt.optimizer_note(resume_from)}; nothing is left to train: final/ is written from it")

    # -- the run directory describes itself
    if acc.is_main_process:
        guard.record_changes(run_dir, resume_from, run.start_step, changes)
        write_run_files(run_dir, cfg, prep, run.examples, run.ex_weight, stats_extra(run, n_micro))
        say(f"data: {prep.summary()}; {len(run.examples)} examples, {sum(run.lengths):,} tokens; "
            f"{n_micro} micro-batches of {cfg.batch_size} {'packed rows' if cfg.packing else 'examples'} per epoch; "
            f"{run.total_steps} optimizer steps of {run.grad_accum} × {acc.num_processes} micro-batches"
            + (f"; resuming from {resume_from} (step {run.start_step})" if resume_from else ""))
        say(f"precision: {prec.used} ({prec.why})")
    acc.wait_for_everyone()
    run.log = RunLog(run_dir if acc.is_main_process else None, run.total_steps, run.start_step, cfg.tensorboard,
                     cfg.progress)
    return run


def default_output_dir(cfg: TrainConfig, acc) -> str:
    """runs/<data>-<loss>-<time>, named by rank 0 (ranks may reach this at different seconds)."""
    from accelerate.utils import broadcast_object_list

    stem = Path(cfg.data.removeprefix("hf:").split(":")[0]).name.split(".")[0] or "data"
    name = [str(Path("runs") / f"{stem}-{cfg.loss}-{time.strftime('%Y%m%d-%H%M%S')}")]
    return broadcast_object_list(name)[0] if acc.num_processes > 1 else name[0]


def make_accelerator(cfg: TrainConfig, precision):
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    AcceleratorState._reset_state()  # train() may run several times in one process (compare); precision may differ
    cuda = torch.cuda.is_available()
    bf16 = precision.used == "bf16"
    # broadcast_buffers=False: no collective inside forward, so ranks may run stand-in passes independently.
    acc = Accelerator(cpu=not cuda, mixed_precision="bf16" if bf16 else "no",
                      kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    ds = acc.state.deepspeed_plugin
    if ds is not None:  # imtune accumulates itself (grad_sync) and feeds no DataLoader to accelerate
        ds.deepspeed_config.update(train_micro_batch_size_per_gpu=cfg.batch_size, gradient_accumulation_steps=1,
                                   gradient_clipping=cfg.max_grad_norm)
    return acc


def set_threads(cfg: TrainConfig, acc) -> None:
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif acc.device.type == "cpu" and acc.num_processes > 1:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", acc.num_processes))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def resolve_grad_accum(cfg: TrainConfig, world: int) -> int:
    if cfg.effective_batch is None:
        return cfg.grad_accum
    per = cfg.batch_size * world
    if cfg.effective_batch % per:
        raise UsageError(f"--effective-batch {cfg.effective_batch} is not a multiple of --batch-size {cfg.batch_size}"
                         f" × {world} process(es)")
    return cfg.effective_batch // per


def build_model(cfg: TrainConfig, acc):
    """(model to train, frozen reference or None, base model directory for a LoRA adapter or None)."""
    import copy

    import torch

    from .models import load_model, resolve

    model = load_model(cfg.model, dtype=torch.float32, seed=cfg.seed,  # fp32 master weights; bf16 via autocast
                       attn_implementation=cfg.attn_implementation)
    model.config.use_cache = False
    src = resolve(cfg.model)
    base_dir = None if src.kind == "random" else str(Path(src.path).resolve()) if src.kind != "hub" else src.path
    ref = None
    if cfg.kl_coef and not cfg.lora:
        ref = copy.deepcopy(model).requires_grad_(False).eval()
        if acc.mixed_precision == "bf16":
            ref = ref.to(torch.bfloat16)
        ref = ref.to(acc.device)
    if cfg.gradient_checkpointing:  # transformers >= 5.2x renamed it; keep the old name for older 5.x
        kw = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    if cfg.compile:
        compile_layers(model)
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else cfg.lora_targets.split(",")
        model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                 lora_dropout=cfg.lora_dropout, target_modules=targets,
                                                 task_type="CAUSAL_LM"))
    return model, ref, base_dir


def compile_layers(model) -> None:
    """torch.compile every decoder layer in place (torchtune's per-layer habit: the layers share one compiled graph,
    so the compile is paid once, and the loss code that calls the decoder directly still runs compiled layers)."""
    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None:
        raise UsageError(f"--compile: {type(model).__name__} has no model.layers to compile")
    for layer in layers:
        layer.compile(dynamic=False)


def build_optimizer(cfg: TrainConfig, model):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]  # no decay on biases / norms
    # fused: one kernel for the whole update (CPU and GPU); 7.7x faster than the default foreach step on this CPU
    # (BENCHMARKS.md, "Loss head and optimizer"). Same arithmetic, rounding may differ in the last bits.
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.peak_lr, betas=(0.9, 0.999), eps=1e-8,
                             fused=True)


def lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warm-up, then linear/cosine/constant.
    Never 0 at a step that is taken (the first warm-up step already moves, the last decay step still does)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def build_scheduler(cfg: TrainConfig, optimizer, total_steps: int):
    import functools

    import torch

    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_factor, warmup=warmup, total=total_steps, kind=cfg.lr_schedule))


def step_normalisers(examples, normalize: str) -> list[float]:
    """Each example's share of W, the divisor of an optimizer step's Σw·nll (W = the sum over the step's examples):
    Σw over its predicted tokens 1..n-1 (tokens; sequences after per_sequence: 1), or, for nonzero, the number of
    those tokens with w > 0. float32 weights, as collate makes them; summed exactly (fsum), example by example."""
    import numpy as np

    w32, bounds = examples.weights.astype(np.float32), examples.bounds.tolist()
    if normalize == "nonzero":
        return [float(np.count_nonzero(w32[a + 1:b])) for a, b in zip(bounds[:-1], bounds[1:])]
    return [math.fsum(w32[a + 1:b].tolist()) for a, b in zip(bounds[:-1], bounds[1:])]


def per_sequence(examples):
    """--normalize sequences: each example's weights rescaled to sum to 1 (over the predicted tokens 1..n-1)."""
    import numpy as np

    w, bounds = examples.weights, examples.bounds.tolist()
    sums = np.array([w[a + 1:b].sum() for a, b in zip(bounds[:-1], bounds[1:])], dtype=np.float64)
    return examples.with_weights(w / np.repeat(sums, examples.lengths))


def fingerprint(examples) -> str:
    """A hash of every example's ids and weights (as Python lists: the same value as before examples were flat)."""
    h = hashlib.sha256()
    ids, w, bounds = examples.input_ids, examples.weights, examples.bounds.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        h.update(repr((ids[a:b].tolist(), w[a:b].tolist())).encode())
    return h.hexdigest()[:16]


def eval_sets(cfg: TrainConfig, prep, tok, make_batches) -> dict:
    """name -> (IT-weighted examples, micro-batches): a fixed sample of the training conversations, and --eval-data.
    The IT mask is used whatever the training loss: it is the paper's overfitting signal (output-token loss)."""
    import numpy as np

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


def stats_extra(run: Run, n_micro: int) -> dict:
    """The batch geometry, for data_stats.json."""
    from .pack import padding_fraction

    return {"packing": run.cfg.packing, "micro_batches_per_epoch": n_micro,
            "padding_fraction": padding_fraction(run.examples, run.epoch_batches(0), run.cfg.packing,
                                                 run.cfg.max_length),
            "precision": run.precision.to_dict(), "processes": run.acc.num_processes,
            "distributed": "FSDP" if is_fsdp(run.objective) else run.acc.distributed_type.value,
            "grad_accum": run.grad_accum,
            "steps_per_epoch": run.steps_per_epoch, "total_steps": run.total_steps,
            "eval": {name: len(ex) for name, (ex, _) in run.eval_sets.items()}}
