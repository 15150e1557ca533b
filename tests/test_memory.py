"""imtune.model.memory: the activation estimate against what training actually saves, the peak the plan prints, and the
pass cap of --micro-batch-tokens (the split itself: tests/test_pack.py; the same update: tests/test_train.py)."""
from __future__ import annotations

import sys

import pytest
import torch

from imtune.model.memory import activation_bytes, pass_tokens, peak_bytes
from imtune.model.models import Shape, random_config


def _saved_bytes(layers: int, n: int) -> int:
    """Bytes autograd saves for backward in a forward of a llama shaped like SmolLM2-135M with `layers` layers, on one
    packed row of two examples of n/2 tokens (position_ids restart: the block-diagonal mask), parameters excluded."""
    from transformers import LlamaForCausalLM

    cfg = random_config("smollm2-135m", 256, None)
    cfg.num_hidden_layers = layers
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).train()
    params = {p.data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.data_ptr() not in params:
            saved[t.data_ptr()] = t.untyped_storage().nbytes()
        return t

    pos = torch.cat([torch.arange(n // 2), torch.arange(n - n // 2)]).view(1, n)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(input_ids=torch.randint(0, 256, (1, n)), position_ids=pos, use_cache=False)
    return sum(saved.values())


@pytest.mark.parametrize("n", [128, 256])
def test_the_activation_estimate_slightly_overestimates_what_a_layer_saves(n):
    """One decoder layer's saved tensors per token (2 layers minus 1: the embedding and final norm cancel), measured
    with saved-tensor hooks: 48.2 KB at 128 tokens here, against 52.7 KB estimated. The cap must not undercount."""
    per_layer = (_saved_bytes(2, n) - _saved_bytes(1, n)) / n
    shape = Shape.of(random_config("smollm2-135m", 256, None))
    estimate = activation_bytes(shape, n) / shape.layers
    assert per_layer <= estimate <= 1.2 * per_layer, (per_layer, estimate)


def test_the_peak_of_the_default_model_with_and_without_the_cap():
    """SmolLM2-135M (134.5M parameters), 4 packed rows of 1,024 tokens: weights + gradients + AdamW 2.15 GB; one row
    a pass under auto on a CPU (~1.7 GB of activations) against all four without a cap (~6.9 GB)."""
    shape = Shape.of(random_config("smollm2-135m", 49152, None))
    params = 134_515_008
    capped = peak_bytes(shape, params, pass_tokens("auto", shape, 1024, "cpu"), 4, 1024, 1024, keep_best=True)
    whole = peak_bytes(shape, params, pass_tokens("auto", shape, 1024, "cuda"), 4, 1024, 1024)
    assert (capped.tokens_per_pass, whole.tokens_per_pass) == (1024, 4096)
    assert capped.training_state == whole.training_state == 16 * params and capped.best_copy == 4 * params
    assert whole.activations == 4 * capped.activations and 1.6e9 < capped.activations < 1.8e9
    assert 4.5e9 < capped.total < 5.0e9 < 9e9 < whole.total
    line = capped.text()
    assert line.startswith("  peak memory: ~4.8 GB per run") and "activations of a pass of 1,024 tokens 1.7 GB" in line
    lora = peak_bytes(shape, params, 1024, 4, 1024, 1024, keep_best=True, lora=True)
    assert lora.training_state == 4 * params and lora.best_copy == 0 and "frozen weights" in lora.text()


def test_train_dry_run_prints_the_peak(tmp_path, capsys):
    from helpers import write_conversations
    from imtune.cli import main

    data = write_conversations(tmp_path / "d.jsonl", 6)
    assert main(["train", data, "--model", "random:tiny", "--max-length", "128", "--max-steps", "2",
                 "--micro-batch-tokens", "64", "--threads", "1", "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "peak memory: ~" in err and "activations of a pass of 128 tokens" in err  # a row is never cut


def test_a_run_over_its_memory_limit_gives_up_only_what_it_must():
    """--memory-limit on a CPU (imtune.model.memory.plan): under the limit the run is as asked (and so on a GPU, or with
    no limit known); over it, best/ is no longer held, then the loss chunk shrinks, then gradient checkpointing, then
    fewer tokens a pass, in that order, each only if still over; freed memory is given back after every pass."""
    from imtune.config import TrainConfig
    from imtune.model.memory import PROCESS_BYTES, plan

    shape = Shape.of(random_config("smollm2-135m", 49152, None))
    assert shape.params == 134_515_008
    cfg = TrainConfig(data="x", max_length=512, keep_best=True, eval_data="y")
    roomy = plan(cfg, shape, "cpu", 20 * 10 ** 9)  # 80% of 20 GB: fits as asked
    assert (roomy.checkpointing, roomy.pass_tokens, roomy.chunk_size, roomy.hold_best, roomy.trim) == \
        (False, 989, 1024, True, False) and not roomy.changed and roomy.text() == ""
    assert plan(cfg, shape, "cpu", 0) == roomy.__class__(**{**vars(roomy), "limit": None})  # unknown: no limit
    assert not plan(cfg.replace(memory_limit=1.0), shape, "cuda", 0).changed  # accelerators: as asked
    just_best = plan(cfg.replace(memory_limit=(PROCESS_BYTES + roomy.peak.total - roomy.peak.best_copy) / 1e9),
                     shape, "cpu", 0)
    assert just_best.changed == ("best/ written at each improvement, not held",
                                 "freed memory given back after every pass and large buffers at once")
    assert (just_best.checkpointing, just_best.chunk_size, just_best.hold_best, just_best.trim) == \
        (False, 1024, False, True)
    three = plan(cfg.replace(memory_limit=3.0), shape, "cpu", 20 * 10 ** 9)
    assert (three.checkpointing, three.pass_tokens, three.chunk_size, three.hold_best) == (True, 512, 128, False)
    assert PROCESS_BYTES + three.peak.total <= 3e9 and "estimated peak ~2.8 GB" in three.text()
    tight = plan(cfg.replace(memory_limit=2.0), shape, "cpu", 0)  # below weights + gradients + AdamW: said so
    assert "still above the limit" in tight.text() and tight.pass_tokens == 512  # a row is never cut
    with pytest.raises(Exception, match="--memory-limit"):
        cfg.replace(memory_limit=0.0).check()


def test_a_run_planned_for_less_memory_makes_the_same_updates(tmp_path, monkeypatch):
    """A limit far below what a run needs turns on everything plan has (checkpointing, small loss chunks, one row a
    pass, best/ written at once, memory given back after every pass): the losses and the final weights are those of
    the run as asked, to float rounding."""
    from helpers import metrics, tiny, write_conversations
    from imtune.model.models import load_model
    from imtune.train import loop
    from imtune.train.loop import train

    released = []
    monkeypatch.setattr(loop, "release", lambda: released.append(1))
    data = write_conversations(tmp_path / "d.jsonl", 12)
    kw = dict(batch_size=4, max_steps=3, eval_data=str(data), keep_best=True, eval_every=1)
    fast = train(tiny(data, tmp_path / "fast", **kw))
    assert len(released) == 1  # once, when the run ends
    low = train(tiny(data, tmp_path / "low", memory_limit=0.001, **kw))
    assert len(released) >= 1 + 3 + 1  # and after every pass of this one (at least one a step)
    import yaml

    used = yaml.safe_load((low / "config.yaml").read_text())
    assert used["gradient_checkpointing"] is True and used["chunk_size"] == 128
    for a, b in zip(metrics(fast), metrics(low), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    wa, wb = load_model(str(fast / "final")).state_dict(), load_model(str(low / "final")).state_dict()
    # 3 AdamW steps of lr 1e-3 move a weight by up to 3e-3; summation order moves it by ~3e-6 here
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5
    assert (low / "best").is_dir()


def test_the_largest_pass_is_what_split_passes_makes():
    """Rows share a pass while rows × the longest row stays within the cap: two rows of ~490 tokens make one pass of
    ~980 under a cap of 989, so the estimate counts the cap, not one row of max_length; a row is never cut."""
    from imtune.data.pack import split_passes
    from imtune.model.memory import pass_size

    assert pass_size(989, 4, 512) == 989 and pass_size(256, 4, 512) == 512 and pass_size(None, 4, 512) == 2048
    assert pass_size(10_000, 4, 512) == 2048
    lengths = [490, 488, 500, 470]  # one example a row (each > 512 / 2)
    passes = split_passes([0, 1, 2, 3], lengths, True, 512, 989)
    assert max(len(p) * max(lengths[i] for i in p) for p in passes) <= pass_size(989, 4, 512)
    assert any(len(p) == 2 for p in passes)  # the pass the old estimate (one row of 512) missed


_HOLES = """
import sys
import numpy as np
from imtune.model.memory import from_system
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:")) / 1024
if sys.argv[1] == "on":
    from_system()
big = np.ones(30 * 2 ** 20 // 8); del big  # glibc's dynamic threshold: 4 MB buffers now come from the heap
held, kept = [], []
for _ in range(50):
    held.append(np.ones(4 * 2 ** 20 // 8))  # touched: resident
    kept.append(np.ones(300_000 // 8))  # a small buffer after each: the freed 4 MB are holes, not the heap's top
before = rss()
del held
print(before - rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux")
def test_buffers_from_the_system_go_back_when_freed():
    """from_system (a run planned for less memory): freed 4 MB buffers leave the resident set at once; glibc's default
    keeps them as holes in the heap, counted at the peak until a malloc_trim."""
    import subprocess

    gone = {mode: float(subprocess.run([sys.executable, "-c", _HOLES, mode], capture_output=True, text=True,
                                       check=True).stdout) for mode in ("on", "off")}
    assert gone["on"] > 180 and gone["off"] < 50, gone  # MiB given back of the 200 freed
