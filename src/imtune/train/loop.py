"""`train(cfg) -> run directory`: instruction tuning with exact per-token loss weights, on accelerate.

Read it top to bottom: `train()` calls `setup()`, which turns a TrainConfig into a frozen `Run` (data, schedule,
model, optimizer, resumed state), then `fit()`, the loop, then the final save. Beside it: imtune.train.plan (the step
arithmetic), imtune.train.build (accelerator, model, optimizer, lr schedule), imtune.train.track (evaluation during
training, --keep-best) and imtune.train.saving (checkpoints, final/, best/).

The loss. Every token carries a weight (imtune.data.weights: the loss mode's class -> weight table). An optimizer step
consumes `grad_accum × processes` micro-batches; W = Σw over all of them is known from the data before any forward
pass. Each process back-propagates  processes · Σ_its micro-batches (w·nll + kl_coef · w·KL) / W,  and DDP averages
gradients over processes, so the update is that of  Σw·nll / Σw  over the whole step however it is split into
micro-batches, accumulation steps and processes (tests/test_train.py checks 4×2 = 1×8 = 2 processes × 2×2), or
each micro-batch into passes of fewer rows (--micro-batch-tokens: less activation memory; Run.passes).
`--normalize sequences` rescales each example's weights to sum to 1 first: W counts examples. `--normalize nonzero`
divides Σw·nll by the number of tokens with w > 0 instead (imtune.data.pack.step_normalisers).

The run directory (evaluation, comparison and reports read only this; keep the names):

    RUN/
      .imtune, .lock        the marker (imtune made this directory: imtune.files.claim) and the writer's lock
                            (imtune.rundir.guard); a directory without the marker is never written into
      config.yaml           the resolved TrainConfig (a valid CONFIG.yaml: `imtune train RUN/config.yaml` repeats it)
      data_stats.json       what preparation did (kept / truncated / skipped and why), token counts, batch geometry
                            (the Schedule: imtune.train.plan)
      chat_template.jinja   the template the examples were rendered with (also inside final/)
      metrics.jsonl         one line per optimizer step, plus "type": "eval" lines and, beside each, an
                            "eval_examples" line with per-example output sums (imtune.rundir.log; eval:
                            imtune.train.track)
      tensorboard/          with --tensorboard
      checkpoints/step-N/   weights or adapter (safetensors), optimizer, scheduler, trainer state, COMPLETE manifest
                            (imtune.train.saving gathers, imtune.rundir.checkpoint writes, imtune.rundir.integrity
                            verifies)
      best/                 with --keep-best: the model of the evaluation point with the lowest val (or eval)
                            output loss, same format as final/, and best/best.json (step, loss, selected on;
                            track.keep_best); best.json alone, "same_as": "final", when that is the last step
                            (no second copy: imtune.rundir.read.best_model)
      final/                AutoModelForCausalLM.from_pretrained(RUN/final) + AutoTokenizer (with the chat template;
                            saving.save_final);
                            --lora (no --merge-lora): the adapter + HOW_TO_LOAD.md (+ RUN/base/ for random bases)
      DONE                  written last (JSON summary); checkpoint.is_finished(RUN) -> train() returns at once

metrics.jsonl ends with a "timing" line (imtune.train.clock): the seconds and peak memory of this process's setup
(startup), optimizer steps (train_steps), evaluations (train_eval) and saves (saving), which compare adds up.

Multi-process: `accelerate launch` (or torchrun) starts N copies; each rank takes micro-batches r, r+N, ... of every
step, each as one or more passes (--micro-batch-tokens), and zero-weight stand-in passes where it has fewer than
another rank (a short last step), so every rank runs the same number of passes; only rank 0 writes files.
"""
from __future__ import annotations

import functools
import gc
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from imtune import files
from imtune.config import TrainConfig
from imtune.console import say
from imtune.data import pack
from imtune.data.pack import collate, epoch_batches, lengths_of, padding_fraction, split_passes
from imtune.data.prepare import DataSpec, fingerprint, prepare_examples
from imtune.data.weights import loss_spec
from imtune.model.forward import lm_head
from imtune.model.memory import available_bytes, from_system, plan as memory_plan, release
from imtune.model.models import load_tokenizer, model_shape
from imtune.model.objective import batch_args
from imtune.model.precision import resolve as resolve_precision
from imtune.rundir import checkpoint as ckpt, guard
from imtune.rundir.log import RunLog, write_run_files
from imtune.train import cost, saving, track
from imtune.train.build import build_model, build_training, make_accelerator, set_threads
from imtune.train.clock import Clock
from imtune.train.distributed import full_tensor, gradient_sync, is_fsdp, resume_supported
from imtune.train.plan import Schedule, schedule
from imtune.types import CLASS_ID, CLASSES, INSTRUCTION, OUTPUT, UsageError

OUTPUT_CLASSES = tuple(CLASS_ID[c] for c in OUTPUT)
INSTRUCTION_CLASSES = tuple(CLASS_ID[c] for c in INSTRUCTION)


class TrainingStopped(UsageError):
    """The run cannot go on (a non-finite loss): printed for a person, without a traceback."""


def train(cfg: TrainConfig, plan: bool = False) -> Path:
    """Train as `cfg` says; return the run directory (RUN/final/ holds the model). Idempotent on finished runs.
    plan: print the plan and its estimated cost before the first step (imtune.train.cost; `imtune train` asks for it,
    compare prints one plan for all its runs)."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers' load/save bars would tear through ours
    ok, clock = False, Clock()  # where the run's time goes: metrics.jsonl's last line (imtune.train.clock)
    try:
        with files.protecting(cfg.data, cfg.eval_data, cfg.val_data):  # never written over, whatever the output
            with clock.phase("startup"):
                run = setup(cfg, plan)
            if isinstance(run, Path):
                say(f"{run}: already finished (DONE); nothing to do")
                ok = True
                return run
            try:
                with clock.phase("train_steps"):  # fit times its evaluations and saves apart
                    tokens = fit(run, clock=clock)
                with clock.phase("saving"):
                    saving.save_final(run, tokens=tokens)
                run.log.write({"type": "timing", "step": run.schedule.total_steps, **clock.record()})
            finally:
                run.log.close()
            ok = True
            return run.dir
    finally:
        guard.release(discard_unused=not ok)  # the lock taken in setup; a new directory left empty goes too
        if bars:
            hf_logging.enable_progress_bar()
        # The Run's model may sit in a reference cycle (accelerate wraps its forward under bf16): without this the
        # weights of one compare arm stayed alive while the next arm built its model (tests/test_clock.py).
        run = None
        gc.collect()
        release()  # and what the run freed goes back to the system: the next run in this process starts from less


# ----------------------------------------------------------------------------------------------------------------
# Setup: config -> data, schedule, model, optimizer, (resumed state), run directory. Everything it decides is frozen.
@dataclass(frozen=True, eq=False)  # compared by identity: its fields hold models and tensors
class Run:
    """What setup decided and built for fit. Frozen: no field changes while fit runs (the objects fields point to
    do: the model's weights, the optimizer's moments, the scheduler's step, the log's file); what changes during the
    loop (tokens trained on, the best selection loss, the current epoch's micro-batches) lives in fit."""

    cfg: TrainConfig
    dir: Path
    schedule: Schedule  # imtune.train.plan: grad_accum, steps_per_epoch, total_steps
    start_step: int  # 0, or the step of the checkpoint resumed from
    start_tokens: int  # tokens trained on before start_step
    tokenizer: object
    renderer: object
    examples: object  # imtune.types.Examples trained on (weights rescaled by --normalize sequences)
    lengths: list  # tokens per example
    ex_weight: list  # each example's share of W (pack.step_normalisers; float32 values, as collate will make them)
    fingerprint: str  # of the examples' ids and weights: a resume must see the same data
    eval_sets: dict  # name -> (examples, micro-batches): imtune.train.track
    precision: object  # imtune.model.precision.Precision: what --precision resolved to, and why
    acc: object  # the accelerate.Accelerator
    model: object  # the causal LM (peft-wrapped with --lora), unwrapped
    objective: object  # Objective(model), prepared by accelerate (DDP/FSDP-wrapped)
    optimizer: object
    scheduler: object  # the lr schedule, stepped once per optimizer step
    base_dir: str | None  # the base model of a LoRA adapter (final/HOW_TO_LOAD.md)
    log: RunLog
    memory: object = None  # imtune.model.memory.Plan: tokens a pass, best/ held or not, memory given back per pass

    @property
    def pass_tokens(self) -> int | None:
        """Positions per forward/backward pass (--micro-batch-tokens as the memory plan set it; None: no cap)."""
        return self.memory.pass_tokens if self.memory is not None else None

    @property
    def head_grad_direct(self) -> bool:
        """Whether the loss head adds its weight's gradient straight into .grad (imtune.model.loss.weighted_nll's
        head_grad; one head-sized buffer less at the peak of every pass): in one process without FSDP or DeepSpeed
        (no DDP hook, shard or engine expects that gradient from autograd), in fp32 (the gradient matmul in the
        weight's own dtype), with the head trained."""
        return (self.acc.num_processes == 1 and not saving.sharded(self.acc) and self.precision.used == "fp32"
                and lm_head(self.model)[0].requires_grad)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The micro-batches of `epoch` (lists of example indices; a function of seed and epoch)."""
        return epoch_batches(self.examples, self.cfg, epoch)

    def passes(self, mbs: list[list[int]], rank: int, world: int) -> list[tuple[list[int], float]]:
        """This rank's forward/backward passes of an optimizer step's micro-batches `mbs` (every rank's), as
        (example indices, keep): micro-batches rank, rank + world, ..., each cut into passes of at most pass_tokens
        positions (pack.split_passes; a function of the data only, so a resume runs the same passes), then
        zero-weight stand-ins (keep 0) up to the count of the rank with the most: every rank runs the same number."""
        split = [split_passes(mb, self.lengths, self.cfg.packing, self.cfg.max_length, self.pass_tokens)
                 for mb in mbs]
        most = max(sum(len(split[k]) for k in range(r, len(mbs), world)) for r in range(world))
        mine = [(p, 1.0) for k in range(rank, len(mbs), world) for p in split[k]]
        return mine + [(split[0][0], 0.0)] * (most - len(mine))

    def weight_of(self, mbs: list[list[int]]) -> float:
        return math.fsum(self.ex_weight[i] for idx in mbs for i in idx)  # exact: the same for any split

    def collate(self, idx: list[int], examples=None):
        ex = self.examples if examples is None else examples
        return collate([ex[i] for i in idx], self.cfg.packing, self.cfg.max_length,
                       self.tokenizer.pad_token_id).to(self.acc.device)

    def trainer_state(self, step: int, tokens: int) -> dict:
        return saving.trainer_state(self.cfg, self.schedule, self.fingerprint, step, tokens)


def setup(cfg: TrainConfig, plan: bool = False) -> Run | Path:
    """A Run ready for fit, or the run directory itself when it is already finished (RUN/DONE, same settings).
    plan: print what the run will cost once its schedule is known (before the model is built)."""
    import numpy as np

    cfg = cfg.check()
    if cfg.output_dir:
        files.check_claim(cfg.output_dir, "run")  # whose directory it is, before anything else is done
    # auto on a CPU: measured (imtune.model.precision)
    prec = resolve_precision(cfg.precision, cfg.model, cfg.max_length)
    acc = make_accelerator(cfg, prec)
    run_dir = Path(cfg.output_dir or default_output_dir(cfg, acc))
    guard.lock(run_dir, acc)  # one writer per run directory: before anything in it is read or written
    if ckpt.is_finished(run_dir):
        guard.check_finished(run_dir, cfg)  # "already finished" only for the same settings
        return run_dir
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
    tok, prep, examples = read_data(cfg)
    evals = track.eval_sets(cfg, prep, tok)  # lets the conversations go: their memory returns before more is taken
    fp = fingerprint(examples)  # of the float64 weights (as every run before)
    examples = examples.with_weights(examples.weights.astype(np.float32))  # what collate feeds the loss
    ex_weight = pack.step_normalisers(examples, cfg.normalize)
    # -- schedule: micro-batches per epoch are fixed by the data; an optimizer step takes grad_accum × processes
    first = epoch_batches(examples, cfg, 0)
    sched = schedule(cfg, len(first), acc.num_processes)  # imtune.train.plan: compare estimates with the same function
    # the cost before the first step (imtune.train.cost; --dry-run stops here: dry_run)
    if plan and acc.is_main_process:
        say(cost.of_run(cfg, examples, sched, evals, saving.save_dtype(cfg, prec.used)).text())

    # -- model, optimizer, lr schedule, (resume); memory: auto caps activations on a CPU, --memory-limit plans less
    mem = memory_plan(cfg, model_shape(cfg.model), acc.device.type, available_bytes(),
                      int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    cfg, cap = cfg.replace(gradient_checkpointing=mem.checkpointing, chunk_size=mem.chunk_size), mem.pass_tokens
    if mem.trim:
        from_system()  # large buffers come from and go back to the system: no holes in the heap counted at the peak
    model, ref, base_dir = build_model(cfg, acc)
    start_step = start_tokens = 0
    if resume_from is not None:
        state = ckpt.read_trainer_state(resume_from)
        now = saving.trainer_state(cfg, sched, fp, state["step"], 0)
        ckpt.check_resumable(state, now, sched.total_steps, resume_from)
        ckpt.load_weights(model, resume_from, cfg.lora)  # before any wrapping or sharding
        start_step, start_tokens = state["step"], state["tokens"]
    objective, optimizer, scheduler = build_training(cfg, acc, model, ref, sched.total_steps)
    if resume_from is not None:
        resume_optimizer(resume_from, saving.saved_optimizer(objective, optimizer, acc), scheduler,
                         start_step < sched.total_steps)

    # -- the run directory describes itself
    if acc.is_main_process:
        guard.record_changes(run_dir, resume_from, start_step, changes)
        write_run_files(run_dir, cfg, prep, examples, ex_weight,
                        stats_extra(cfg, examples, first, prec, acc, objective, sched, evals)
                        | {"micro_batch_tokens": cap})
        say(f"data: {prep.summary()}; {len(examples)} examples, {sum(lengths_of(examples)):,} tokens; "
            f"{len(first)} micro-batches of {cfg.batch_size} {'packed rows' if cfg.packing else 'examples'} per "
            f"epoch; {sched.total_steps} optimizer steps of {sched.grad_accum} × {acc.num_processes} micro-batches"
            + (f"; resuming from {resume_from} (step {start_step})" if resume_from else ""))
        say(f"precision: {prec.used} ({prec.why}); final/ and best/ saved in {saving.save_dtype(cfg, prec.used)}")
        if cap is not None and cap < cfg.batch_size * cfg.max_length and not mem.changed:
            say(f"memory: each micro-batch runs as passes of at most {cap:,} tokens (--micro-batch-tokens "
                f"{cfg.micro_batch_tokens}; a longer row is a pass alone); the optimizer step is the same")
        if mem.changed:
            say(mem.text())
    acc.wait_for_everyone()
    log = RunLog(run_dir if acc.is_main_process else None, sched.total_steps, start_step, cfg.tensorboard,
                 cfg.progress)
    return Run(cfg, run_dir, sched, start_step, start_tokens, tok, prep.renderer, examples, lengths_of(examples),
               ex_weight, fp, evals, prec, acc, model, objective, optimizer, scheduler, base_dir, log, mem)


def dry_run(cfg: TrainConfig):
    """`imtune train --dry-run`: the plan setup prints (an imtune.train.cost.Cost), from the same data, evaluation sets
    and schedule; no run directory is made and nothing is trained."""

    cfg = cfg.check()
    if cfg.output_dir:
        files.check_claim(cfg.output_dir, "run")  # a directory the real run would refuse is refused now
    tok, prep, examples = read_data(cfg)
    evals = track.eval_sets(cfg, prep, tok)
    first = epoch_batches(examples, cfg, 0)
    sched = schedule(cfg, len(first), int(os.environ.get("WORLD_SIZE", "1")))
    return cost.of_run(cfg, examples, sched, evals, saving.save_dtype(cfg, resolve_precision(cfg.precision).used))


def read_data(cfg: TrainConfig) -> tuple:
    """(tokenizer, Prepared, the examples trained on): the one data entry (prepare.prepare_examples), then the weights
    rescaled per example for --normalize sequences."""
    tok = load_tokenizer(cfg.model)
    spec = loss_spec(cfg.loss, cfg.prompt_weight, cfg.weights, cfg.last_turn_only)
    prep = prepare_examples(cfg.data, tok, spec, DataSpec.of(cfg))
    if not prep.examples:
        raise UsageError(f"{cfg.data}: no example left to train on ({prep.summary()})")
    return tok, prep, pack.per_sequence(prep.examples) if cfg.normalize == "sequences" else prep.examples



def resume_optimizer(resume_from: Path, optimizer, scheduler, steps_left: bool) -> None:
    """Restore AdamW's moments and the lr schedule from the checkpoint; without them only a finished run may go on."""
    if ckpt.load_optimizer(optimizer, scheduler, resume_from):
        return
    if steps_left:
        raise UsageError(f"{resume_from} holds no optimizer state ({ckpt.optimizer_note(resume_from)}): resuming "
                         "would restart the AdamW moments and train a different run; start over, or train from "
                         f"its weights as a new run (--model {resume_from})")
    say(f"{resume_from}: {ckpt.optimizer_note(resume_from)}; nothing is left to train: final/ is written from it")


def default_output_dir(cfg: TrainConfig, acc) -> str:
    """runs/<data>-<loss>-<time>, named by rank 0 (ranks may reach this at different seconds)."""
    from accelerate.utils import broadcast_object_list

    stem = Path(cfg.data.removeprefix("hf:").split(":")[0]).name.split(".")[0] or "data"
    name = [str(Path("runs") / f"{stem}-{cfg.loss}-{time.strftime('%Y%m%d-%H%M%S')}")]
    return broadcast_object_list(name)[0] if acc.num_processes > 1 else name[0]


def stats_extra(cfg: TrainConfig, examples, first: list, prec, acc, objective, sched: Schedule, evals: dict) -> dict:
    """The batch geometry, for data_stats.json."""
    return {"packing": cfg.packing, "micro_batches_per_epoch": sched.micro_batches,
            "padding_fraction": padding_fraction(examples, first, cfg.packing, cfg.max_length),
            "precision": {**prec.to_dict(), "save_dtype": saving.save_dtype(cfg, prec.used)},
            "processes": acc.num_processes,
            "distributed": "FSDP" if is_fsdp(objective) else acc.distributed_type.value,
            "grad_accum": sched.grad_accum, "steps_per_epoch": sched.steps_per_epoch,
            "total_steps": sched.total_steps, "eval": {name: len(ex) for name, (ex, _) in evals.items()}}


# ----------------------------------------------------------------------------------------------------------------
# The loop
def fit(run: Run, batches_of=None, clock: Clock | None = None) -> int:
    """Optimizer steps run.start_step .. total_steps, with the evaluations and checkpoints --eval-every and
    --save-every ask for; returns the tokens trained on (those before a resume included). `batches_of(epoch)`: the
    epoch's micro-batches (default: run.epoch_batches, computed once per epoch). `clock`: the evaluations and saves
    are timed as its phases train_eval and saving (the caller's phase gets the steps)."""
    import torch

    cfg, acc, obj, sched = run.cfg, run.acc, run.objective, run.schedule
    rank, world = acc.process_index, acc.num_processes
    batches_of = batches_of or functools.lru_cache(maxsize=1)(run.epoch_batches)  # the current epoch's only
    tokens, best, t_start = run.start_tokens, None, time.perf_counter()  # best: --keep-best's lowest loss so far
    last_save = t_start  # --save-every-minutes counts from here
    clock = clock or Clock()
    direct = run.head_grad_direct
    if run.start_step == 0 and run.eval_sets:
        with clock.phase("train_eval"):
            best = track.evaluate(run, 0, best)
    obj.train()
    for step in range(run.start_step, sched.total_steps):
        t0 = time.perf_counter()
        epoch, part = sched.step_slice(step)
        mbs = batches_of(epoch)[part]  # this step's micro-batches (lists of example indices), all ranks
        W = run.weight_of(mbs)  # Σw over the whole step, from the data: the one normaliser
        passes = run.passes(mbs, rank, world)  # (example indices, keep): the same count on every rank
        seed_step(cfg.seed, step, rank)  # RNG state is a function of (seed, step, rank): resume is exact
        dev = torch.zeros(2, dtype=torch.float64, device=acc.device)  # Σw·nll, Σw·KL (no sync until step end)
        host = [0.0] * 4  # Σnll, n over output tokens; Σnll, n over instruction tokens (logging only)
        for j, (idx, keep) in enumerate(passes):  # keep 0: a stand-in pass, zero loss
            batch = run.collate(idx)
            with gradient_sync(acc, obj, sync=j == len(passes) - 1):
                scale = keep * world / W  # d loss / d Σw·nll: the head adds its weight's share at once if direct
                nll, kl, sums = obj(*batch_args(batch), classes=batch.classes if cfg.log_class_losses else None,
                                    kl=cfg.kl_coef > 0, head_grad=scale if direct else None)
                acc.backward((nll + cfg.kl_coef * kl) * scale)
            if run.memory is not None and run.memory.trim:
                release()  # the pass's activations, freed: not held while the next pass runs
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
            track.flush(run, best)  # the best point so far was good: keep it
            stop(run, step + 1, loss, grad_norm)
        lr = run.scheduler.get_last_lr()[0]
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)

        done = step + 1
        step_tokens = sum(run.lengths[i] for idx in mbs for i in idx)
        tokens += step_tokens
        rec = {"type": "train", "step": done, "epoch": sched.epoch_at(done), "loss": loss,
               "loss_output": o_sum / o_n if o_n else None, "loss_instruction": i_sum / i_n if i_n else None,
               "lr": lr, "grad_norm": grad_norm if has_norm else None,
               "tokens_per_s": step_tokens / (time.perf_counter() - t0), "tokens": tokens,
               "time": round(time.perf_counter() - t_start, 3)}
        if cfg.kl_coef:
            rec["kl"] = kl_sum / W
        run.log.write(rec)
        if run.eval_sets and cfg.eval_every and done % cfg.eval_every == 0 and done < sched.total_steps:
            with clock.phase("train_eval"):
                best = track.evaluate(run, done, best)
        if saving.checkpoint_due(cfg, acc, done, sched.total_steps, time.perf_counter() - last_save):
            with clock.phase("saving"):
                best = track.flush(run, best)  # a resume from this checkpoint reads the best so far from RUN/best/
                saving.save_checkpoint(run, done, tokens)
            last_save = time.perf_counter()
    if run.eval_sets:
        with clock.phase("train_eval"):
            best = track.evaluate(run, sched.total_steps, best)
        with clock.phase("saving"):
            track.flush(run, best)
    return tokens


def add_class_sums(host: list[float], per_class: dict | None, keep: float) -> None:
    """Fold weighted_nll's per-class (Σnll, count) into [out Σ, out n, instr Σ, instr n]."""
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
