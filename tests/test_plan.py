"""imtune.train.plan: the step arithmetic is one function, so compare's estimate (taken before any run trains: the eval
cadence, the --budget cap) is exactly what the trainer then does (data_stats.json total_steps of a real run)."""
from __future__ import annotations

import json

import pytest

from helpers import tiny, write_conversations
from imtune.config import TrainConfig
from imtune.train.plan import schedule
from imtune.types import UsageError


@pytest.mark.parametrize("kw", [
    dict(packing=True, batch_size=2, epochs=1.5),
    dict(packing=False, batch_size=2, grad_accum=3, epochs=1.0),
    dict(packing=True, batch_size=1, effective_batch=3, epochs=2.0),
    dict(packing=False, batch_size=3, max_steps=2),
])
def test_compare_estimate_is_what_the_trainer_does(tmp_path, kw):
    from imtune.experiments.arms import CompareSettings, parse_arms
    from imtune.experiments.data import materialise_data
    from imtune.train.loop import train

    data = write_conversations(tmp_path / "d.jsonl", 13)
    held = write_conversations(tmp_path / "h.jsonl", 3, seed=1)
    cfg = tiny(data, tmp_path / "run", **kw)
    estimate = materialise_data(CompareSettings(out=tmp_path / "cmp", base=cfg.replace(eval_data=held),
                                                arms=parse_arms("it")), tmp_path / "cmp")["steps"]
    run = train(cfg.replace(data=str(tmp_path / "cmp" / "data" / "train.jsonl"), format="messages"))
    stats = json.loads((run / "data_stats.json").read_text())
    assert estimate == stats["total_steps"] > 0


def test_schedule_arithmetic():
    cfg = TrainConfig(batch_size=2, grad_accum=3, epochs=1.5)
    s = schedule(cfg, 20, 2)  # 20 micro-batches, 6 per step: 4 steps per epoch (the last takes 2)
    assert (s.grad_accum, s.steps_per_epoch, s.total_steps, s.per_step) == (3, 4, 6, 6)
    assert s.step_slice(3) == (0, slice(18, 24)) and s.step_slice(4) == (1, slice(0, 6))
    assert schedule(cfg.replace(effective_batch=8), 20, 2).grad_accum == 2
    with pytest.raises(UsageError, match="effective-batch 6 is not a multiple"):
        schedule(cfg.replace(effective_batch=6), 20, 2)
    assert schedule(cfg.replace(max_steps=7), 20, 2).total_steps == 7
