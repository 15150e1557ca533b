"""imtune.model.memory: the activation estimate against what training actually saves, the peak the plan prints, and the
pass cap of --micro-batch-tokens (the split itself: tests/test_pack.py; the same update: tests/test_train.py)."""
from __future__ import annotations

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
