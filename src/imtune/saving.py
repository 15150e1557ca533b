"""The trainer's savers: what a run writes while it trains (checkpoints/step-N/) and at its end (final/, best/, DONE).

The file formats and the atomic writes are imtune.checkpoint's; this module gathers what to write from a training
run (full weights and optimizer state out of FSDP/DeepSpeed shards, the trainer state that makes a resume exact) and
lets only rank 0 write. Every function is called on every rank: gathering is a collective."""
from __future__ import annotations

from . import checkpoint as ckpt
from .distributed import FullStateOptimizer, full_model_state, is_fsdp


def trainer_state(cfg, schedule, fingerprint: str, step: int, tokens: int) -> dict:
    """What a checkpoint records about the run, and what a resume must match (checkpoint.check_resumable)."""
    return {"step": step, "tokens": tokens, "data_fingerprint": fingerprint, "processes": schedule.processes,
            "grad_accum": schedule.grad_accum, "batch_size": cfg.batch_size, "packing": cfg.packing,
            "seed": cfg.seed, "total_steps": schedule.total_steps,
            "rng": "torch reseeded at every step from (seed, step, rank); data order from (seed, epoch)"}


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


def save_checkpoint(run, step: int, tokens: int) -> None:
    state = full_state(run.objective, run.acc)
    optimizer = saved_optimizer(run.objective, run.optimizer, run.acc)
    if optimizer is not None and optimizer is not run.optimizer:
        optimizer = Gathered(optimizer.state_dict())  # a collective: every rank gathers, rank 0 writes
    if run.acc.is_main_process:
        path = ckpt.save_checkpoint(run.dir, step, run.model, state, optimizer, run.scheduler,
                                    run.trainer_state(step, tokens), run.cfg.keep_checkpoints)
        run.log.note(f"checkpoint: {path}")
    run.acc.wait_for_everyone()


def save_final(run, name: str = "final", info: dict | None = None, *, tokens: int = 0, state: dict | None = None
               ) -> None:
    """RUN/final/ (then RUN/DONE, with the `tokens` trained on), or with name="best" RUN/best/ and `info`. `state`:
    the weights to write (track.Best's copy of an earlier point), else the model's now."""
    from .generate import stop_token_ids

    state = state if state is not None else full_state(run.objective, run.acc)
    total = run.schedule.total_steps
    if run.acc.is_main_process:
        try:
            final = ckpt.save_final(run.dir, run.model, state, run.tokenizer, run.renderer.jinja,
                                    stop_token_ids(run.tokenizer, run.renderer), run.cfg.lora, run.cfg.merge_lora,
                                    run.base_dir, name=name, info=info)
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
            run.log.note(f"final model: {final}")
        else:
            run.log.note(f"{name} model (step {info['step']}, {info['selected_on']} {info['loss']:.4f}): {final}")
    run.acc.wait_for_everyone()  # every rank, whichever model was saved
