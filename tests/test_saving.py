"""imtune.train.saving: a run trained in bf16 (autocast over fp32 master weights) saves final/ as bf16 copies, half the
disk of fp32, unless --save-dtype fp32; the copy loads back (in fp32, as every run's model) with the master weights
rounded to bf16, and checkpoints stay fp32 for an exact resume."""
from __future__ import annotations

import json
import struct

import torch

from imtune.config import TrainConfig
from imtune.data.synth import synthesize, write_jsonl
from imtune.model.models import load_model
from imtune.train.loop import train


def header(path) -> dict:
    """The safetensors header: tensor name -> {"dtype", "shape", "data_offsets"}."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return {k: v for k, v in json.loads(f.read(n)).items() if k != "__metadata__"}


def test_a_bf16_run_saves_bf16_copies_that_load_back(tmp_path):
    from safetensors.torch import load_file

    rows, _ = synthesize("lookup", 8, 4.0, seed=0, heldout=2)
    data = write_jsonl(tmp_path / "d.jsonl", rows, "lookup", 0, "train")
    cfg = TrainConfig(model="random:tiny", data=str(data), max_steps=1, batch_size=4, max_length=256, lr=1e-3,
                      warmup_ratio=0.0, save_every=1, progress=False, threads=1)
    runs = {name: train(cfg.replace(output_dir=str(tmp_path / name), **kw)) for name, kw in
            (("bf16", {"precision": "bf16"}), ("fp32", {"precision": "fp32"}),
             ("bf16-kept-fp32", {"precision": "bf16", "save_dtype": "fp32"}))}
    heads = {name: header(run / "final" / "model.safetensors") for name, run in runs.items()}
    assert {v["dtype"] for v in heads["bf16"].values()} == {"BF16"}
    assert {v["dtype"] for v in heads["fp32"].values()} == {"F32"} == {v["dtype"] for v in heads["bf16-kept-fp32"]
                                                                        .values()}
    assert heads["bf16"].keys() == heads["fp32"].keys()  # the tied lm_head is not written as a tensor of its own
    sizes = {name: (run / "final" / "model.safetensors").stat().st_size for name, run in runs.items()}
    assert 0.49 < sizes["bf16"] / sizes["fp32"] < 0.51
    assert json.loads((runs["bf16"] / "final" / "config.json").read_text())["dtype"] == "bfloat16"
    stats = json.loads((runs["bf16"] / "data_stats.json").read_text())["precision"]
    assert stats["used"] == "bf16" and stats["save_dtype"] == "bf16"
    assert "save_dtype: auto" in (runs["bf16"] / "config.yaml").read_text()

    # the checkpoint of the last step holds the fp32 master weights; final/ is them rounded to bf16, loaded as fp32
    master = load_file(str(runs["bf16"] / "checkpoints" / "step-1" / "model.safetensors"))
    assert {t.dtype for t in master.values()} == {torch.float32}
    model = load_model(str(runs["bf16"] / "final"))
    state = model.state_dict()
    assert {t.dtype for t in state.values() if t.is_floating_point()} == {torch.float32}
    for k, t in master.items():
        assert torch.equal(state[k], t.to(torch.bfloat16).float()), k
    assert any(not torch.equal(t, t.to(torch.bfloat16).float()) for t in master.values())  # bf16 did round
    with torch.no_grad():  # and it runs
        ids = torch.tensor([[1, 2, 3]])
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_checkpoints_by_steps_or_by_minutes_of_training():
    """--save-every: every N steps and at the end; --save-every-minutes: after the step that ends M minutes since the
    last checkpoint, never at the end (final/ is written then)."""
    from types import SimpleNamespace

    from imtune.train.saving import checkpoint_due

    one = SimpleNamespace(num_processes=1)
    steps = TrainConfig(data="d", save_every=2)
    assert [checkpoint_due(steps, one, d, 5, 0.0) for d in range(1, 6)] == [False, True, False, True, True]
    minutes = TrainConfig(data="d", save_every_minutes=10)
    assert not checkpoint_due(minutes, one, 1, 5, 599.0) and checkpoint_due(minutes, one, 1, 5, 600.0)
    assert not checkpoint_due(minutes, one, 5, 5, 3600.0)  # the end: final/ is written
    assert not checkpoint_due(TrainConfig(data="d"), one, 3, 5, 1e9)  # neither asked: none


def test_a_run_with_save_every_minutes_0_checkpoints_after_every_step_but_the_last(tmp_path):
    rows, _ = synthesize("lookup", 8, 4.0, seed=0, heldout=2)
    data = write_jsonl(tmp_path / "d.jsonl", rows, "lookup", 0, "train")
    run = train(TrainConfig(model="random:tiny", data=str(data), max_steps=3, batch_size=2, max_length=256,
                            save_every_minutes=0, keep_checkpoints=0, progress=False, threads=1,
                            output_dir=str(tmp_path / "run")))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1", "step-2"]
    assert (run / "final").is_dir()
