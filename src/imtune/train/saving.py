"""The trainer's savers: what a run writes while it trains (checkpoints/step-N/) and at its end (final/, best/, DONE).

The file formats and the atomic writes are imtune.rundir.checkpoint's; this module gathers what to write from a training
run (full weights and optimizer state out of FSDP/DeepSpeed shards, the trainer state that makes a resume exact) and
lets only rank 0 write. Every function is called on every rank: gathering is a collective.

A save of the default model writes 0.5-1.6 GB and takes seconds while no bar moves: with progress bars on, a line
says what is being written, how much, and how long it should take at the rate of this process's saves so far; the
line after it says how long it took."""
from __future__ import annotations

import time
from contextlib import contextmanager

from imtune.model.generate import stop_token_ids
from imtune.rundir import checkpoint as ckpt
from imtune.train.distributed import FullStateOptimizer, full_model_state, is_fsdp


def trainer_state(cfg, schedule, fingerprint: str, step: int, tokens: int) -> dict:
    """What a checkpoint records about the run, and what a resume must match (checkpoint.check_resumable)."""
    return {"step": step, "tokens": tokens, "data_fingerprint": fingerprint, "processes": schedule.processes,
            "grad_accum": schedule.grad_accum, "batch_size": cfg.batch_size, "packing": cfg.packing,
            "seed": cfg.seed, "total_steps": schedule.total_steps,
            "rng": "torch reseeded at every step from (seed, step, rank); data order from (seed, epoch)"}


def save_dtype(cfg, used: str) -> str:
    """fp32 | bf16: the dtype of final/ and best/ for --save-dtype and the precision the run trains in (`used`):
    auto saves bf16 copies of a bf16-autocast run's fp32 master weights (half the disk; what it computed in)."""
    return used if cfg.save_dtype == "auto" else cfg.save_dtype


def sharded(acc) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def full_state(objective, acc):
    """Full weights gathered to rank 0 (FSDP/DeepSpeed), None where the model's own state_dict is right."""
    if is_fsdp(objective):
        return full_model_state(objective)
    if not sharded(acc):
        return None
    full = acc.get_state_dict(objective)
    return {k.removeprefix("model."): v for k, v in full.items()}


def saved_optimizer(objective, optimizer, acc):
    """What the checkpoint code saves and restores: FSDP2's AdamW state as one full state dict keyed by parameter
    name (exact resume on any number of processes); None under DeepSpeed (its state stays in its engine)."""
    if is_fsdp(objective):
        return FullStateOptimizer(objective, optimizer)
    return None if sharded(acc) else optimizer


class Gathered:
    """An optimizer state already gathered, for the checkpoint writer (`state_dict()`)."""

    def __init__(self, state: dict):
        self.state = state

    def state_dict(self) -> dict:
        return self.state


RATE: list[float] = []  # MB/s of this process's saves so far: the next save's estimate


def size_mb(model, optimizer: bool) -> float:
    """What a save writes, about: the weights (LoRA: the trainable ones), with AdamW's two moments of each trainable
    parameter for a checkpoint."""
    params = list(model.parameters())  # a tied weight once; FSDP's DTensors count their full size
    lora = any(not p.requires_grad for p in params)
    weights = sum(p.numel() * p.element_size() for p in params if p.requires_grad or not lora)
    moments = 2 * sum(p.numel() * 4 for p in params if p.requires_grad) if optimizer else 0
    return (weights + moments) / 2**20


@contextmanager
def announced(run, what: str, optimizer: bool = False):
    """Yields a callable that gives the seconds since the save began; a line before it (with progress bars on)."""
    t0, mb = time.perf_counter(), size_mb(run.model, optimizer)
    if run.log.bar is not None:
        eta = f", ~{mb / RATE[-1]:.0f} s at the rate of the last save" if RATE else ""
        run.log.note(f"writing {what} (~{mb:,.0f} MB{eta}) ...")
    yield lambda: time.perf_counter() - t0
    RATE.append(mb / max(time.perf_counter() - t0, 1e-3))


def save_checkpoint(run, step: int, tokens: int) -> None:
    state = full_state(run.objective, run.acc)
    optimizer = saved_optimizer(run.objective, run.optimizer, run.acc)
    if optimizer is not None and optimizer is not run.optimizer:
        optimizer = Gathered(optimizer.state_dict())  # a collective: every rank gathers, rank 0 writes
    if run.acc.is_main_process:
        with announced(run, f"checkpoint step-{step}", optimizer is not None) as took:
            path = ckpt.save_checkpoint(run.dir, step, run.model, state, optimizer, run.scheduler,
                                        run.trainer_state(step, tokens), run.cfg.keep_checkpoints)
        run.log.note(f"checkpoint: {path} ({took():.1f} s)")
    run.acc.wait_for_everyone()


def save_final(run, name: str = "final", info: dict | None = None, *, tokens: int = 0, state: dict | None = None
               ) -> None:
    """RUN/final/ (then RUN/DONE, with the `tokens` trained on), or with name="best" RUN/best/ and `info`. `state`:
    the weights to write (track.Best's copy of an earlier point), else the model's now. A best point at the last
    step is final/'s model: best/ then holds best.json alone ("same_as": "final"), not a second copy."""
    total = run.schedule.total_steps
    if name == "best" and info["step"] == total:
        if run.acc.is_main_process:
            ckpt.save_same_as(run.dir, name, info)
            run.log.note(f"best model (step {info['step']}, {info['selected_on']} {info['loss']:.4f}): the last "
                         f"step's, final/ (best/best.json says so; no second copy)")
        run.acc.wait_for_everyone()
        return
    state = state if state is not None else full_state(run.objective, run.acc)
    if run.acc.is_main_process:
        try:
            with announced(run, f"{name}/") as took:
                final = ckpt.save_final(run.dir, run.model, state, run.tokenizer, run.renderer.jinja,
                                        stop_token_ids(run.tokenizer, run.renderer), run.cfg.lora,
                                        run.cfg.merge_lora, run.base_dir, name=name, info=info,
                                        dtype=save_dtype(run.cfg, run.precision.used))
        except ckpt.WriteFailed as e:
            if name != "final":  # best/ is a convenience; the run goes on (its checkpoints and final/ are intact)
                raise
            raise ckpt.rescue_weights(run.dir, e, total, lambda root: ckpt.save_checkpoint(  # never lose the trained
                root, total, run.model, state, None, run.scheduler,  # weights to a failed save
                run.trainer_state(total, tokens), 0,
                optimizer_note="left out: written after the last step, when final/ could not be")) from None
        if name == "final":
            last = ckpt.latest_checkpoint(run.dir)
            ckpt.mark_done(run.dir, {"steps": total, "tokens": tokens, "final": str(final),
                                     "last_checkpoint": str(last) if last else None})
            run.log.note(f"final model: {final} ({took():.1f} s)")
        else:
            run.log.note(f"{name} model (step {info['step']}, {info['selected_on']} {info['loss']:.4f}): {final} "
                         f"({took():.1f} s)")
    run.acc.wait_for_everyone()  # every rank, whichever model was saved

def checkpoint_due(cfg, acc, done: int, total: int, elapsed: float) -> bool:
    """A checkpoint after step `done`: every --save-every steps and at the end, or once --save-every-minutes of
    training have passed since the last one (not at the end: final/ is written then). Every rank must agree, since
    saving gathers sharded state: with several processes rank 0's clock decides (a one-number broadcast)."""
    if cfg.save_every and (done % cfg.save_every == 0 or done == total):
        return True
    if cfg.save_every_minutes is None or done >= total:
        return False
    due = elapsed >= 60 * cfg.save_every_minutes
    if acc.num_processes > 1:
        import torch

        flag = torch.tensor([float(due)], device=acc.device)
        torch.distributed.broadcast(flag, src=0)
        due = bool(flag.item())
    return due
