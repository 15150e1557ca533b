"""Step 0's evaluation is computed once per (model weights, forward settings, evaluation sets) and reused by later
runs that start from the same model: same numbers, no forward pass; anything that changes the numbers misses."""
from __future__ import annotations

from helpers import metrics, tiny, write_conversations


def step0(run_dir):
    (rec,) = [r for r in metrics(run_dir, "eval") if r["step"] == 0]
    return {k: v for k, v in rec.items() if k.endswith(("_loss", "_tokens"))}


def test_second_run_from_the_same_model_reuses_step0_and_a_changed_model_does_not(tmp_path, monkeypatch):
    from imtune.train import track
    from imtune.train.loop import train

    monkeypatch.setenv("IMTUNE_CACHE", str(tmp_path / "cache"))
    data = write_conversations(tmp_path / "d.jsonl", 12)
    held = write_conversations(tmp_path / "h.jsonl", 6, seed=1)
    calls = []
    real = track.eval_losses
    monkeypatch.setattr(track, "eval_losses", lambda run, *step: calls.append(run.dir.name) or real(run, *step))
    kw = dict(eval_data=held, eval_every=2, eval_train_sample=4, max_steps=2, batch_size=4)

    first = train(tiny(data, tmp_path / "it", loss="it", **kw))
    second = train(tiny(data, tmp_path / "im", loss="im", **kw))  # another arm, the same model and sets
    assert calls == ["it", "it", "im"]  # im's step 0 came from the cache: only its step-2 evaluation ran
    assert step0(second) == step0(first) and step0(first)["eval_output_loss"] > 0
    assert len(list((tmp_path / "cache" / "eval0").glob("*.json"))) == 1

    calls.clear()
    third = train(tiny(data, tmp_path / "seed1", seed=1, **kw))  # random:tiny with another seed: other weights
    assert calls == ["seed1", "seed1"] and step0(third) != step0(first)

    from imtune.train import baseline

    (entry,) = [p for p in (tmp_path / "cache" / "eval0").glob("*.json") if str(first) in p.read_text()]
    assert baseline.read(entry.stem)[0]["eval_output_loss"] == step0(first)["eval_output_loss"]
    entry.write_text("{not json", encoding="utf-8")  # a damaged entry is a miss (recomputed), never trusted
    assert baseline.read(entry.stem) is None


def test_only_single_process_cpu_runs_from_step0_use_it(monkeypatch):
    from types import SimpleNamespace as NS

    from imtune.train.baseline import usable

    def run(start=0, world=1, device="cpu"):
        return NS(start_step=start, acc=NS(num_processes=world, device=NS(type=device)))

    assert usable(run())
    assert not usable(run(start=3)) and not usable(run(world=2)) and not usable(run(device="cuda"))
    monkeypatch.setenv("IMTUNE_NO_CACHE", "1")
    assert not usable(run())


def test_the_key_holds_the_precision_used_not_the_probe_that_chose_it():
    """`--precision auto` measures speeds in every run: two runs that both chose fp32 share their step-0 scores."""
    from types import SimpleNamespace as NS

    from imtune.model.precision import Precision, Probe
    from imtune.train.baseline import forward_settings

    cfg = NS(attn_implementation=None, compile=False, chunk_size=1024)
    a = NS(cfg=cfg, precision=Precision("auto", "fp32", "measured", Probe(72.0, 1.0)))
    b = NS(cfg=cfg, precision=Precision("auto", "fp32", "measured", Probe(110.0, 1.3, 900.0, 60.0, "2 layers")))
    c = NS(cfg=cfg, precision=Precision("bf16", "bf16", "asked"))
    assert forward_settings(a) == forward_settings(b) != forward_settings(c)
