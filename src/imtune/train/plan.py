"""The step arithmetic of a run, in one place: `schedule(cfg, micro_batches, processes) -> Schedule`.

An epoch is a fixed list of micro-batches (imtune.data.pack.make_batches: `batch_size` examples, or packed rows, each);
an optimizer step takes `grad_accum × processes` of them, in order. `train.setup` builds the Schedule from the data
it will train on, and `compare` asks the same function before training (for the evaluation cadence and the
--budget cap), so the estimate and the run cannot disagree (tests/test_plan.py checks it against real runs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from imtune.data.pack import epoch_batches
from imtune.types import UsageError


@dataclass(frozen=True)
class Schedule:
    micro_batches: int  # micro-batches per epoch (fixed by the data, the batch size and packing)
    processes: int
    grad_accum: int  # micro-batches per process per optimizer step
    steps_per_epoch: int  # the last step of an epoch may take fewer micro-batches
    total_steps: int

    @property
    def per_step(self) -> int:
        """Micro-batches in one optimizer step, over all processes."""
        return self.grad_accum * self.processes

    def step_slice(self, step: int) -> tuple[int, slice]:
        """(epoch, which of that epoch's micro-batches) of optimizer step `step` (0-based)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        return epoch, slice(k * self.per_step, (k + 1) * self.per_step)

    def epoch_at(self, steps_done: int) -> float:
        """Epochs completed after `steps_done` optimizer steps (as logged in metrics.jsonl)."""
        return round(steps_done / self.steps_per_epoch, 4)


def grad_accum(cfg, processes: int) -> int:
    """--grad-accum, or --effective-batch / (--batch-size × processes) when that is given (it must divide)."""
    if cfg.effective_batch is None:
        return cfg.grad_accum
    per = cfg.batch_size * processes
    if cfg.effective_batch % per:
        raise UsageError(f"--effective-batch {cfg.effective_batch} is not a multiple of --batch-size {cfg.batch_size}"
                         f" × {processes} process(es)")
    return cfg.effective_batch // per


def schedule(cfg, micro_batches: int, processes: int) -> Schedule:
    """The Schedule of a run of `cfg` over an epoch of `micro_batches` micro-batches on `processes` processes:
    --max-steps if given, else ceil(epochs × steps per epoch) (at least 1)."""
    accum = grad_accum(cfg, processes)
    per_epoch = max(1, math.ceil(micro_batches / (accum * processes)))
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))
    return Schedule(micro_batches, processes, accum, per_epoch, total)


def micro_batches_per_epoch(cfg, examples) -> int:
    """How many micro-batches make_batches cuts one epoch of `examples` into, as the trainer calls it (packed rows
    or padded examples, `batch_size` per micro-batch; the count is the same for every seed and epoch)."""
    return len(epoch_batches(examples, cfg, 0))
