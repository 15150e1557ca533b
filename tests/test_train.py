"""The trainer on random:tiny: config round trips, the loss normalisation invariant (accumulation × batch, packing,
--normalize), NEFTune and KL pieces, the run directory, final/ loading in plain transformers, LoRA, NaN stop."""
from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from helpers import metrics, patch_everywhere, tiny, write_conversations
from imtune.config import TrainConfig, add_train_arguments
from imtune.types import UsageError


# -- config ------------------------------------------------------------------------------------------------------
def test_config_precedence_and_yaml_round_trip(tmp_path):
    (tmp_path / "c.yaml").write_text("data: d.jsonl\nlr: 3e-5\nbatch_size: 2\npreset: paper\n")
    p = argparse.ArgumentParser()
    add_train_arguments(p)
    cfg = TrainConfig.from_args(p.parse_args([str(tmp_path / "c.yaml"), "--batch-size", "1", "--no-packing",
                                              "--field", "output=response", "--loss", "im"]))
    assert cfg.lr == 3e-5  # YAML over preset (and PyYAML's string "3e-5" became a float)
    assert cfg.batch_size == 1 and cfg.loss == "im"  # flags over YAML
    assert cfg.max_length == 2048 and cfg.effective_batch == 128 and cfg.template == "tulu"  # the preset
    assert cfg.fields == {"output": "response"} and cfg.packing is False
    assert cfg.epochs == 2.0 and cfg.seed == 42  # defaults where nobody said anything
    (tmp_path / "r.yaml").write_text(cfg.to_yaml())
    assert TrainConfig.from_yaml(tmp_path / "r.yaml") == cfg
    assert TrainConfig.from_args(p.parse_args(["--data", "x", "--resume"])).resume == "auto"
    with pytest.raises(UsageError, match="unknown config key"):
        TrainConfig.from_dict({"data": "x", "learning_rate": 1})
    with pytest.raises(UsageError, match="--batch-size"):
        TrainConfig(data="x", batch_size=0).check()
    with pytest.raises(UsageError, match="weighted needs --prompt-weight"):
        TrainConfig(data="x", loss="weighted").check()
    assert TrainConfig(data="x").peak_lr == 2e-5 and TrainConfig(data="x", lora=True).peak_lr == 2e-4


def test_lr_schedule():
    from imtune.train.build import lr_factor

    lin = [lr_factor(s, 2, 10, "linear") for s in range(10)]
    assert lin[:3] == [1 / 3, 2 / 3, 1.0] and all(a > b > 0 for a, b in zip(lin[2:], lin[3:]))
    cos = [lr_factor(s, 0, 10, "cosine") for s in range(10)]
    assert cos[0] == 1.0 and all(a > b > 0 for a, b in zip(cos, cos[1:]))
    assert lr_factor(7, 2, 10, "constant") == 1.0


# -- the loss invariant ------------------------------------------------------------------------------------------
def _sgd(monkeypatch):
    """AdamW -> plain SGD, so the update is exactly -lr × gradient and comparing updates compares gradients (Adam's
    first step is ~lr·sign(g): it would hide a wrongly scaled gradient)."""
    monkeypatch.setattr(torch.optim, "AdamW", lambda groups, lr, betas, eps, **kw: torch.optim.SGD(groups, lr=lr))


def _update(run):
    from safetensors.torch import load_file

    from imtune.model.models import load_model

    start = load_model("random:tiny", dtype=torch.float32, seed=42).state_dict()
    # (update, the rounding of an fp32 subtraction at these weights: a few ulps of the largest weight)
    return {k: (v - start[k], 4 * torch.finfo(torch.float32).eps * v.abs().max().item())
            for k, v in load_file(run / "final" / "model.safetensors").items()}


def _reference_loss(cfg, normalize):
    """Σw·nll/Σw (tokens) or the mean of per-example weighted means (sequences) of the starting model over all
    examples, one example at a time, computed here independently of the trainer."""
    import torch.nn.functional as F

    from imtune.data.pack import collate
    from imtune.data.prepare import prepare_examples
    from imtune.data.weights import loss_spec
    from imtune.model.models import load_model, load_tokenizer

    prep = prepare_examples(cfg.data, load_tokenizer("random:tiny"), loss_spec(cfg.loss), max_length=cfg.max_length)
    model = load_model("random:tiny", dtype=torch.float32, seed=42)
    num, den, means = 0.0, 0.0, []
    with torch.no_grad():
        for ex in prep.examples:
            b = collate([ex], packed=False)
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits  # plain transformers
            nll = F.cross_entropy(logits[0], b.labels[0], ignore_index=-100, reduction="none")
            num, den = num + (nll * b.weights).sum().item(), den + b.weights.sum().item()
            means.append((nll * b.weights).sum().item() / b.weights.sum().item())
    return num / den if normalize == "tokens" else sum(means) / len(means)


def test_accumulation_batch_and_packing_give_the_same_step(tmp_path, monkeypatch):
    """8 examples = one optimizer step: 4 micro-batches × 2 == 1 × 8, padded == packed, and the loss is Σw·nll/Σw
    of the starting model. Measured: loss agrees to ~1e-7 relative, update (SGD: the gradient) to ~1e-6 of its
    largest entry (summation order differs between the splits); asserted with 1e-7 / 1e-5 tolerances."""
    _sgd(monkeypatch)
    data = write_conversations(tmp_path / "d.jsonl", 8)
    runs = {}
    for packing in (False, True):
        for bs, ga in ((2, 4), (8, 1)):
            from imtune.train.loop import train

            out = train(tiny(data, tmp_path / f"r{bs}x{ga}-{packing}", batch_size=bs, grad_accum=ga, max_steps=1,
                             packing=packing, max_grad_norm=0.0, lr=1.0))  # SGD, lr 1: update = -gradient
            (m,) = metrics(out)
            runs[(bs, ga, packing)] = (m, _update(out))
    ref_m, ref_u = runs[(8, 1, False)]
    assert ref_m["loss"] == pytest.approx(_reference_loss(tiny(data, tmp_path), "tokens"), rel=1e-6)
    for key, (m, u) in runs.items():
        assert m["loss"] == pytest.approx(ref_m["loss"], rel=1e-7), key
        assert m["grad_norm"] == pytest.approx(ref_m["grad_norm"], rel=1e-5), key
        for name, (delta, ulps) in u.items():
            want = ref_u[name][0]
            assert (delta - want).abs().max().item() <= 1e-5 * want.abs().max().item() + ulps, (key, name)
    assert all(d.abs().max() > 0 for d, _ in ref_u.values())  # the step did move every weight


@pytest.mark.parametrize("packing", [True, False])
def test_micro_batch_tokens_splits_the_passes_not_the_step(tmp_path, monkeypatch, capsys, packing):
    """--micro-batch-tokens 64 on rows of up to 128 tokens (mostly one row a pass; a longer row is a pass alone)
    against no cap: more forward/backward passes, the same optimizer steps, losses and gradients. SGD (see _sgd),
    3 steps: the weights' updates agree to 1e-5 of their largest entry, as the accumulation test's do (only the
    summation order of Σw·nll and of the gradients differs). (Under AdamW, 3 steps at lr 1e-3, the weights differed
    by up to 1.8e-6, in entries whose gradient is a near-cancelling sum: Adam divides it by its own size.)"""
    from imtune.data import pack
    from imtune.train.loop import train

    _sgd(monkeypatch)
    data = write_conversations(tmp_path / "d.jsonl", 16)
    calls = []
    collate = pack.collate
    patch_everywhere(monkeypatch, pack, "collate", lambda ex, *a, **k: calls.append(len(ex)) or collate(ex, *a, **k))
    runs, passes = {}, {}
    for cap in ("none", "64"):
        before = len(calls)
        runs[cap] = train(tiny(data, tmp_path / f"r-{cap}", batch_size=4, grad_accum=2, max_steps=3, packing=packing,
                               micro_batch_tokens=cap, lr=0.1, max_grad_norm=0.0))
        passes[cap] = len(calls) - before
    assert passes["64"] > passes["none"]
    assert "passes of at most 64 tokens (--micro-batch-tokens 64" in capsys.readouterr().err
    assert json.loads((runs["64"] / "data_stats.json").read_text())["micro_batch_tokens"] == 64
    assert json.loads((runs["none"] / "data_stats.json").read_text())["micro_batch_tokens"] is None
    a, b = metrics(runs["none"]), metrics(runs["64"])
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for x, y in zip(a, b):
        assert (x["tokens"], x["lr"], x["epoch"]) == (y["tokens"], y["lr"], y["epoch"])
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-6)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-5)
    ua, ub = _update(runs["none"]), _update(runs["64"])
    for name, (delta, ulps) in ub.items():
        want = ua[name][0]
        assert (delta - want).abs().max().item() <= 1e-5 * want.abs().max().item() + ulps, name


def test_every_rank_runs_the_same_number_of_passes():
    """Run.passes: rank r takes micro-batches r, r + world, ..., each cut at --micro-batch-tokens; a rank with fewer
    passes gets zero-weight stand-ins (keep 0), so DDP/FSDP ranks meet at the same collectives."""
    from types import SimpleNamespace as NS

    from imtune.train.loop import Run

    mbs = [[0, 1, 2], [3], [4, 5], [6]]  # padded rows of 100, 30, 30 | 90 | 20, 120 | 60 tokens
    run = NS(lengths=[100, 30, 30, 90, 20, 120, 60], cfg=NS(packing=False, max_length=128), pass_tokens=100)
    r0, r1 = (Run.passes(run, mbs, r, 2) for r in (0, 1))
    assert r0 == [([0], 1.0), ([1, 2], 1.0), ([4], 1.0), ([5], 1.0)]  # 120 > 100: a row alone
    assert r1 == [([3], 1.0), ([6], 1.0), ([0], 0.0), ([0], 0.0)]
    uncapped = NS(lengths=run.lengths, cfg=run.cfg, pass_tokens=None)  # as before the cap: a micro-batch, a pass
    assert Run.passes(uncapped, mbs[:3], 1, 2) == [([3], 1.0), ([0, 1, 2], 0.0)]


def test_micro_batch_tokens_auto_caps_activations_on_a_cpu_only():
    """auto: on a CPU as many positions as ~1.5 GiB of estimated activations hold (SmolLM2-135M: 953 at max_length
    1024, so one packed row per pass); no cap on a GPU; a number is taken as it is; a bad value is refused."""
    from imtune.model.memory import pass_tokens
    from imtune.model.models import Shape, random_config

    big = Shape.of(random_config("smollm2-135m", 49152, None))
    assert pass_tokens("auto", big, 1024, "cpu") == 953 and pass_tokens("auto", big, 1024, "cuda") is None
    assert pass_tokens("auto", big, 1024, "cpu", checkpointing=True) > 4_000  # each layer keeps its input only
    assert pass_tokens("auto", Shape.of(random_config("tiny", 49152, None)), 128, "cpu") > 100_000  # never splits
    assert pass_tokens("auto", None, 1024, "cpu") is None  # a shape no config gave: no cap
    assert pass_tokens("512", big, 1024, "cuda") == 512 and pass_tokens("none", big, 1024, "cpu") is None
    for bad in ("0", "-3", "lots"):
        with pytest.raises(UsageError, match="--micro-batch-tokens"):
            TrainConfig(data="x", micro_batch_tokens=bad).check()


def test_normalize_sequences_is_the_mean_of_example_means(tmp_path):
    from imtune.train.loop import train

    data = write_conversations(tmp_path / "d.jsonl", 6)
    out = train(tiny(data, tmp_path / "run", batch_size=6, max_steps=1, normalize="sequences", packing=False))
    (m,) = metrics(out)
    want = _reference_loss(tiny(data, tmp_path), "sequences")
    assert m["loss"] == pytest.approx(want, rel=1e-6)
    assert want != pytest.approx(_reference_loss(tiny(data, tmp_path), "tokens"), rel=1e-4)  # they differ here


@pytest.mark.parametrize("normalize", ["tokens", "sequences"])
def test_a_run_holds_float32_weights_and_fingerprints_the_float64_ones(tmp_path, normalize):
    """A run keeps the weights as float32 (what collate feeds the loss; half the memory of a million records), but
    its data fingerprint is taken from the float64 values, so checkpoints written before still resume."""
    import numpy as np

    from imtune.data.prepare import fingerprint
    from imtune.rundir import guard
    from imtune.train.loop import read_data, setup

    data = write_conversations(tmp_path / "d.jsonl", 6)
    cfg = tiny(data, tmp_path / "run", loss="weighted", prompt_weight=0.1, normalize=normalize, max_steps=1)
    _, _, exact = read_data(cfg)
    run = setup(cfg)
    try:
        assert exact.weights.dtype == np.float64 and run.examples.weights.dtype == np.float32
        assert np.array_equal(run.examples.weights, exact.weights.astype(np.float32))
        assert not np.array_equal(run.examples.weights.astype(np.float64), exact.weights)  # 0.1 is not a float32
        assert run.fingerprint == fingerprint(exact) != fingerprint(run.examples)
        assert run.collate([0, 1]).weights.dtype == torch.float32
    finally:
        guard.release()

# -- NEFTune and KL ----------------------------------------------------------------------------------------------
def test_neftune_noise_scale_follows_each_packed_example():
    from imtune.model.objective import neftune_noise

    d, alpha = 4096, 5.0
    embeds = torch.zeros(1, 10, d)
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 4]])  # packed examples of lengths 3, 2, 5
    noise = neftune_noise(embeds, pos, None, alpha).abs().amax(-1)[0]  # [10]
    bound = torch.tensor([alpha / math.sqrt(L * d) for L in (3, 3, 3, 2, 2, 5, 5, 5, 5, 5)])
    assert torch.all(noise <= bound) and torch.all(noise > 0.99 * bound)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])  # padded: real lengths 3 and 4, nothing on padding
    noise = neftune_noise(torch.zeros(2, 4, d), None, mask, alpha).abs().amax(-1)
    assert noise[0, 3] == 0 and noise[0, 0] <= alpha / math.sqrt(3 * d) < noise[0, 0] / 0.99
    assert noise[1, 0] <= alpha / math.sqrt(4 * d)


def test_weighted_kl_matches_full_logits():
    from imtune.model.objective import weighted_kl

    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    w_head = torch.randn(11, 8, generator=g, requires_grad=True)
    h_ref, w_ref = torch.randn(2, 5, 8, generator=g), torch.randn(11, 8, generator=g)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[0, 4] = labels[1, 4] = -100
    weights = torch.rand(2, 5, generator=g) * (labels != -100)
    weights[1, 1] = 0.0
    got = weighted_kl(h, w_head, None, h_ref, w_ref, None, labels, weights, chunk_size=3)
    logp, logq = torch.log_softmax(h @ w_head.T, -1), torch.log_softmax(h_ref @ w_ref.T, -1)
    want = ((logp.exp() * (logp - logq)).sum(-1) * weights).sum()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    g1 = torch.autograd.grad(got, (h, w_head))
    g2 = torch.autograd.grad(want, (h, w_head))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_neftune_only_while_training(tmp_path):
    from imtune.data.pack import collate
    from imtune.data.prepare import prepare_examples
    from imtune.data.weights import loss_spec
    from imtune.model.models import load_model, load_tokenizer
    from imtune.model.objective import Objective, batch_args

    prep = prepare_examples(write_conversations(tmp_path / "d.jsonl", 3), load_tokenizer("random:tiny"),
                            loss_spec("im"))
    batch = collate(prep.examples, packed=True)

    model = load_model("random:tiny", dtype=torch.float32, seed=0)
    clean, noisy = Objective(model, 64, 0.0), Objective(model, 64, 5.0)
    with torch.no_grad():
        assert noisy.eval()(*batch_args(batch))[0] == clean.eval()(*batch_args(batch))[0]
        assert noisy.train()(*batch_args(batch))[0] != clean.train()(*batch_args(batch))[0]
        nll, kl, _ = clean.train()(*batch_args(batch), kl=False)
        assert kl == 0


# -- a whole run ------------------------------------------------------------------------------------------------
def test_run_directory_final_model_and_eval_lines(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from imtune.rundir.checkpoint import is_finished
    from imtune.train.loop import train

    data = write_conversations(tmp_path / "d.jsonl", 12)
    held = write_conversations(tmp_path / "e.jsonl", 4, seed=1)
    cfg = tiny(data, tmp_path / "run", loss="it", batch_size=2, grad_accum=2, max_steps=3, save_every=2,
               eval_data=held, eval_every=2, eval_train_sample=5, tensorboard=True, neftune_alpha=5.0, kl_coef=0.1)
    run = train(cfg)
    for name in ("config.yaml", "data_stats.json", "chat_template.jinja", "metrics.jsonl", "DONE",
                 "checkpoints/step-2/COMPLETE", "checkpoints/step-3/COMPLETE", "final/config.json", "tensorboard"):
        assert (run / name).exists(), name
    assert TrainConfig.from_yaml(run / "config.yaml") == cfg
    stats = json.loads((run / "data_stats.json").read_text())
    assert stats["examples"] == 12 and stats["tokenize"]["n_kept"] == 12 and stats["eval"] == {"train": 5, "eval": 4}
    train_rows = metrics(run)
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    for r in train_rows:
        assert {"epoch", "loss", "loss_output", "loss_instruction", "lr", "grad_norm", "tokens_per_s", "tokens",
                "kl"} <= set(r)
        assert r["loss"] == pytest.approx(r["loss_output"], rel=1e-5)  # --loss it: the objective is output nll
    assert train_rows[0]["kl"] == 0.0 < train_rows[2]["kl"]  # the model starts as its own reference
    evals = metrics(run, "eval")
    assert [e["step"] for e in evals] == [0, 2, 3]
    assert all(e["train_output_loss"] > 0 and e["eval_output_loss"] > 0 for e in evals)

    tok = AutoTokenizer.from_pretrained(run / "final")
    assert tok.chat_template == (run / "chat_template.jinja").read_text()
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    ids = tok.apply_chat_template([{"role": "user", "content": "alpha beta"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]

    assert is_finished(run)
    assert train(cfg) == run  # a finished run is detected, not retrained
    with pytest.raises(UsageError, match="already has checkpoints"):
        (run / "DONE").unlink()
        train(cfg)


@pytest.mark.parametrize("merge", [False, True])
def test_lora_final_loads_in_plain_transformers(tmp_path, merge):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from imtune.train.loop import train

    data = write_conversations(tmp_path / "d.jsonl", 6)
    more = dict(gradient_checkpointing=True, precision="bf16") if merge else {}  # exercise both once
    run = train(tiny(data, tmp_path / "run", lora=True, merge_lora=merge, lora_r=4, batch_size=3, max_steps=2,
                     kl_coef=0.1, lr=1e-2, **more))
    assert (run / "final" / "adapter_config.json").exists() != merge
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    tok = AutoTokenizer.from_pretrained(run / "final")
    ids = tok.apply_chat_template([{"role": "user", "content": "gamma"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    assert model.generate(**ids, max_new_tokens=3, do_sample=False).shape[1] > ids["input_ids"].shape[1]
    rows = metrics(run)
    assert rows[0]["kl"] == 0.0 and rows[1]["kl"] > 0  # adapter off = the reference; the trained one drifts
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    from imtune.train.loop import TrainingStopped, train

    data = write_conversations(tmp_path / "d.jsonl", 8)
    cfg = tiny(data, tmp_path / "run", lr=1e30, batch_size=2, max_steps=4, save_every=1, keep_checkpoints=0)
    with pytest.raises(TrainingStopped, match="training stopped before this update") as e:
        train(cfg)
    run = tmp_path / "run"
    stopped = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert stopped["type"] == "stopped" and f"step-{stopped['step'] - 1}" in str(e.value)
    assert (run / "checkpoints" / f"step-{stopped['step'] - 1}" / "COMPLETE").exists()
    assert not (run / "checkpoints" / f"step-{stopped['step']}").exists() and not (run / "final").exists()


def test_non_finite_loss_never_calls_a_damaged_checkpoint_good(tmp_path, monkeypatch):
    """A checkpoint whose bytes changed after it was written (one flipped bit) is not named "last good"."""
    from imtune.rundir import checkpoint as ckpt
    from imtune.train.loop import TrainingStopped, train

    save = ckpt.save_checkpoint

    def save_then_flip(*args, **kw):
        path = save(*args, **kw)
        w = path / "model.safetensors"
        data = bytearray(w.read_bytes())
        data[len(data) // 2] ^= 1
        w.write_bytes(bytes(data))
        return path

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_flip)
    data = write_conversations(tmp_path / "d.jsonl", 8)
    with pytest.raises(TrainingStopped) as e:
        train(tiny(data, tmp_path / "run", lr=1e30, batch_size=2, max_steps=4, save_every=1, keep_checkpoints=0))
    assert (tmp_path / "run" / "checkpoints" / "step-1" / "COMPLETE").exists()
    assert "Last good checkpoint: none" in str(e.value) and "step-1" not in str(e.value)


def test_attention_kernel_and_compiled_layers_train_the_same(tmp_path):
    """--attn-implementation eager and --compile (each decoder layer torch.compile'd) change kernels, not the
    objective: the first step's loss equals the default (sdpa, eager layers) run's; the layers are really compiled."""
    from imtune.model.models import load_model
    from imtune.train.build import compile_layers
    from imtune.train.loop import train

    data = write_conversations(tmp_path / "d.jsonl", 8)
    losses = {}
    for name, kw in {"sdpa": {}, "eager": {"attn_implementation": "eager"}, "compiled": {"compile": True}}.items():
        out = train(tiny(data, tmp_path / name, batch_size=8, max_steps=1, **kw))
        losses[name] = metrics(out)[0]["loss"]
    assert losses["eager"] == pytest.approx(losses["sdpa"], rel=1e-5)
    assert losses["compiled"] == pytest.approx(losses["sdpa"], rel=1e-5)
    model = load_model("random:tiny", dtype=torch.float32, seed=42)
    compile_layers(model)
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
    assert set(model.state_dict()) == set(load_model("random:tiny", dtype=torch.float32, seed=42).state_dict())
    with pytest.raises(UsageError, match="no model.layers"):
        compile_layers(torch.nn.Linear(2, 2))
