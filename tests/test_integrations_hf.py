"""imtune.integrations.hf: the dataset keeps imtune's masks and report, packed rows equal padded ones, and a plain
transformers Trainer (and TRL's SFTTrainer, for 0/1 masks) given these pieces lands on the same weights as
`imtune train` with the same data, loss, order and optimizer."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import tiny, write_conversations
from imtune.data.pack import make_batches
from imtune.data.prepare import prepare_examples
from imtune.data.weights import loss_spec
from imtune.integrations import hf
from imtune.model.models import load_model, load_tokenizer
from imtune.types import UsageError


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("random:tiny")


def test_dataset_is_prepare_examples(tmp_path, tok, capsys):
    data = write_conversations(tmp_path / "c.jsonl", 8)
    with open(data, "a") as f:  # a record with no user/assistant content left: nothing to learn under `it`
        f.write(json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]})
                + "\n")
    ds = hf.to_dataset(data, tok, loss="weighted", prompt_weight=0.25, on_invalid="skip")
    prep = prepare_examples(data, tok, loss_spec("weighted", 0.25), on_invalid="skip")
    assert "imtune:" in capsys.readouterr().err and prep.summary() in ds.info.description
    assert len(ds) == len(prep.examples) and ds.column_names == ["input_ids", "labels", "loss_weights"]
    for row, e in zip(ds, prep.examples):
        w = np.asarray(e.weights, dtype=np.float32)
        assert row["input_ids"] == e.input_ids.tolist()
        assert row["loss_weights"][0] == 0 and np.array_equal(row["loss_weights"][1:], w[1:])
        assert set(np.asarray(row["loss_weights"])[1:]) - {0.0} <= {0.25, 1.0}
        lab = np.asarray(row["labels"])
        assert lab[0] == -100 and np.array_equal(lab[1:], np.where(w[1:] > 0, e.input_ids[1:], -100))


def _loss_and_grad(model, batch):
    model.zero_grad()
    inputs = dict(batch)
    labels = inputs.pop("labels")
    loss = hf.compute_loss_func(model(**inputs), labels, num_items_in_batch=hf.step_weight([batch]))
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])


def test_packed_row_equals_padded_rows(tmp_path, tok):
    """One padding-free row with restarting position_ids (sdpa) gives the loss and gradient of padded rows: no
    attention across examples, no example predicting the next one's first token."""
    ds = hf.to_dataset(write_conversations(tmp_path / "c.jsonl", 5), tok, loss="im", quiet=True)
    rows = list(ds)
    model = load_model("random:tiny", seed=0)
    padded, packed = hf.collator(tok)(rows), hf.collator(tok, packing=True)(rows)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    a, ga = _loss_and_grad(model, padded)
    b, gb = _loss_and_grad(model, packed)
    assert a == pytest.approx(b, rel=1e-5) and torch.allclose(ga, gb, atol=1e-6)
    leaky = {k: v for k, v in packed.items() if k != "use_cache"}  # llama's default use_cache=True: a KV cache
    c, _ = _loss_and_grad(model, leaky)  # disables transformers' packed-sequence detection: the guard matters
    assert abs(c - a) > 1e-4


def test_loss_needs_the_step_weight_and_the_column(tmp_path, tok):
    ds = hf.to_dataset(write_conversations(tmp_path / "c.jsonl", 2), tok, quiet=True)
    batch = hf.collator(tok)(list(ds))
    model = load_model("random:tiny", seed=0)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with pytest.raises(UsageError, match="count_weights"):
        hf.compute_loss_func(model(**inputs), batch["labels"])
    with pytest.raises(UsageError, match="remove_unused_columns=False"):
        hf.collator(tok)([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in ds])


def _imtune_run(tmp_path, data, **kw):
    """imtune train on random:tiny, padded rows (Trainer's batching), and the order it used as one flat list.

    No gradient clipping on either side: on this model every step would be clipped to norm 1, which rescales each
    step's gradient and hides a wrong normaliser (checked: Σw replaced by the token count passes with clipping at 1,
    and is 40x over the tolerance without)."""
    from imtune.train.loop import train

    same = {"packing": False, "batch_size": 2, "grad_accum": 2, "lr_schedule": "linear", "max_grad_norm": 0.0,
            "precision": "fp32", "epochs": 1}
    cfg = tiny(data, tmp_path / "run", **{**same, **kw})
    run = train(cfg)
    tok = load_tokenizer(cfg.model)
    prep = prepare_examples(cfg.data, tok, loss_spec(cfg.loss, cfg.prompt_weight), max_length=cfg.max_length)
    batches = make_batches(prep.examples, cfg.batch_size, cfg.max_length, False, cfg.seed, 0)
    return cfg, run, [i for mb in batches for i in mb], len(batches)


def _same_optimizer(cfg, n_micro):
    """A model initialised as imtune's, with imtune's AdamW (param groups, fused) and lr schedule."""
    import math

    from imtune.train.build import build_optimizer, build_scheduler

    model = load_model(cfg.model, dtype=torch.float32, seed=cfg.seed)
    model.config.use_cache = False
    opt = build_optimizer(cfg, model)
    return model, (opt, build_scheduler(cfg, opt, math.ceil(n_micro / cfg.grad_accum)))


def _args(cls, out, cfg, **kw):
    return cls(output_dir=str(out), per_device_train_batch_size=cfg.batch_size,
               gradient_accumulation_steps=cfg.grad_accum, num_train_epochs=cfg.epochs, max_grad_norm=cfg.max_grad_norm,
               train_sampling_strategy="sequential", report_to=[], save_strategy="no", logging_strategy="no",
               disable_tqdm=True, seed=cfg.seed, **kw)


def _assert_same_weights(model, run, seed):
    """model's weights == RUN/final's, relative to how far training moved them from the start. (Not elementwise:
    Adam's update of a near-zero gradient is ~lr·sign(g), so last-bit differences in such a gradient move single
    weights by up to lr; a wrong normaliser moves all of them.)"""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(run / "final", dtype=torch.float32).state_dict()
    got = model.state_dict()
    start = load_model("random:tiny", seed=seed).state_dict()
    moved = torch.cat([(ref[k] - start[k]).flatten() for k in ref]).norm().item()
    diff = torch.cat([(got[k].cpu() - ref[k]).flatten() for k in ref]).norm().item()
    print(f"moved {moved:.4g}, differ by {diff:.3g} ({diff / moved:.2e} of it)")
    assert moved > 0.1 and diff < 1e-3 * moved, (moved, diff)


def test_trainer_equals_imtune_train(tmp_path, tok):
    """Fractional weights (λ = 0.1: Σw is not a token count), 2 × 2 accumulation, a short last step: the same update
    as imtune train only if the loss is normalised by Σw of each whole step. Padded and packed collators alike."""
    from transformers import Trainer, TrainingArguments

    data = write_conversations(tmp_path / "c.jsonl", 14)
    cfg, run, order, n_micro = _imtune_run(tmp_path, data, loss="weighted", prompt_weight=0.1)
    ds = hf.to_dataset(data, tok, loss="weighted", prompt_weight=0.1, max_length=cfg.max_length, quiet=True)
    for packing in (False, True):
        model, optimizers = _same_optimizer(cfg, n_micro)
        args = _args(TrainingArguments, tmp_path / f"hf-{packing}", cfg, remove_unused_columns=False)
        trainer = Trainer(model=model, args=args, train_dataset=ds.select(order),
                          data_collator=hf.collator(tok, packing=packing), compute_loss_func=hf.compute_loss_func,
                          optimizers=optimizers)
        hf.count_weights(trainer).train()
        assert trainer.state.global_step == 4
        _assert_same_weights(model, run, cfg.seed)


def test_trl_sft_trainer_takes_the_masks(tmp_path, tok):
    """TRL's SFTTrainer on the prepared dataset (its own collator and loss): `im` masks (0/1) give imtune's weights."""
    trl = pytest.importorskip("trl", reason="TRL is not installed (pip install trl)")

    data = write_conversations(tmp_path / "c.jsonl", 14)
    cfg, run, order, n_micro = _imtune_run(tmp_path, data, loss="im")
    ds = hf.to_dataset(data, tok, loss="im", max_length=cfg.max_length, quiet=True)
    model, optimizers = _same_optimizer(cfg, n_micro)
    args = _args(trl.SFTConfig, tmp_path / "trl", cfg, max_length=None, packing=False, bf16=False)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=ds.select(order), processing_class=tok,
                             optimizers=optimizers)
    trainer.train()
    _assert_same_weights(model, run, cfg.seed)
