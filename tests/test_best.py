"""Best vs final: the best checkpoint is selected on the validation data only, never on the data it is scored on."""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from imtune.rundir.read import metrics as read_metrics


def test_keep_best_selects_on_validation_loss_not_on_the_scored_data(tmp_path, monkeypatch):
    from imtune.train import saving, track

    saved = []
    monkeypatch.setattr(saving, "save_final",
                        lambda run, name="final", info=None, state=None: saved.append((name, info)))
    monkeypatch.setattr(track, "held_copy", lambda run: None)  # not held in memory: every improvement is written
    run, best = SimpleNamespace(eval_sets={"train": 0, "eval": 0, "val": 0}, dir=tmp_path,
                                schedule=SimpleNamespace(total_steps=9)), None
    # validation improves at steps 0, 1, 3; the scored (eval) loss improves at 2 only
    for step, val, test in ((0, 3.0, 2.0), (1, 2.5, 2.1), (2, 2.6, 1.0), (3, 2.4, 1.5), (4, 2.4, 0.5)):
        best = track.keep_best(run, {"step": step, "val_output_loss": val, "eval_output_loss": test}, best)
    assert [info["step"] for _, info in saved] == [0, 1, 3]  # ties keep the earlier point
    assert {name for name, _ in saved} == {"best"} and {i["selected_on"] for _, i in saved} == {"val_output_loss"}
    assert track.flush(run, best) == best and len(saved) == 3  # nothing held: nothing more to write


def test_best_weights_held_in_memory_are_written_once_with_the_best_points_weights(tmp_path, monkeypatch):
    from imtune.train import saving, track

    saved = []
    monkeypatch.setattr(saving, "save_final", lambda run, name="final", info=None, state=None:
                        saved.append((name, info, state)))
    monkeypatch.setattr(track, "held_copy", lambda run: {"weights at step": run.step})
    run, best = SimpleNamespace(eval_sets={"eval": 0, "val": 0}, dir=tmp_path, step=None,
                                schedule=SimpleNamespace(total_steps=9)), None
    for step, val in ((0, 3.0), (1, 2.5), (2, 2.6), (3, 2.4), (4, 2.45)):
        run.step = step
        best = track.keep_best(run, {"step": step, "val_output_loss": val}, best)
    assert saved == []  # improvements at steps 0, 1 and 3 wrote nothing yet
    best = track.flush(run, best)
    assert saved == [("best", {"step": 3, "loss": 2.4, "selected_on": "val_output_loss"}, {"weights at step": 3})]
    assert best == track.Best(2.4) and track.flush(run, best) == best and len(saved) == 1  # written once


def test_a_best_point_at_the_last_step_is_final_not_a_second_copy(tmp_path):
    """best/ of the last step holds best.json alone ("same_as": "final"), even when an earlier best was written with
    its weights (before a checkpoint); every reader takes final/ for it: --model RUN/best, compare's scores (best ==
    final, scored once) and --keep best (final/ stays, being the best model)."""
    import torch

    from imtune.cli import main
    from imtune.config import TrainConfig
    from imtune.data.synth import synthesize, write_jsonl
    from imtune.model.models import load_model
    from imtune.rundir.read import best_model, model_dir, read_run
    from imtune.train.loop import train

    rows, held = synthesize("lookup", 12, 4.0, seed=0, heldout=6)
    data = write_jsonl(tmp_path / "d.jsonl", rows, "lookup", 0, "train")
    test = write_jsonl(tmp_path / "t.jsonl", held, "lookup", 0, "heldout")
    # validation on the training data itself: its loss falls at every step, so the last step is the best
    run_dir = train(TrainConfig(model="random:tiny", data=str(data), val_data=str(data), keep_best=True, max_steps=3,
                                batch_size=4, max_length=256, lr=1e-3, warmup_ratio=0.0, eval_every=1, save_every=1,
                                eval_train_sample=0, progress=False, threads=1, output_dir=str(tmp_path / "run")))
    vals = [e["val_output_loss"] for e in read_metrics(run_dir, "eval")]
    assert vals == sorted(vals, reverse=True) and len(set(vals)) == 4  # falling at every evaluation point
    best = json.loads((run_dir / "best" / "best.json").read_text())
    assert best["step"] == 3 and best["same_as"] == "final" and best["loss"] == vals[-1]
    assert [p.name for p in (run_dir / "best").iterdir()] == ["best.json"]  # the step-2 weights written before the
    assert not list(run_dir.glob(".*best*"))  # checkpoint were replaced, nothing half-written left
    assert best_model(run_dir) == read_run(run_dir).best == model_dir(run_dir / "best") == run_dir / "final"
    a, b = load_model(str(run_dir / "best")), load_model(str(run_dir / "final"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))

    out = tmp_path / "cmp"
    assert main(["compare", str(data), "--val-data", str(data), "--eval-data", str(test), "--model", "random:tiny",
                 "--arms", "it", "--max-steps", "3", "--eval-every", "1", "--lr", "1e-3", "--warmup-ratio", "0",
                 "--batch-size", "4", "--max-length", "256", "--eval-train-sample", "0", "--bleu-samples", "0",
                 "--keep", "best", "--no-progress", "--threads", "1", "--out", str(out)]) == 0
    run = out / "arms" / "it" / "seed-42"
    (res,) = [r["results"] for r in json.loads((out / "compare.json").read_text())["arms"][0]["runs"]]
    assert res["best"]["step"] == 3 and res["best"]["heldout"] == res["heldout"]
    assert [p.name for p in (run / "best").iterdir()] == ["best.json"] and (run / "final" / "config.json").exists()
    assert not list(run.rglob("best/*.safetensors"))


def test_held_copy_is_a_detached_copy_that_keeps_tied_weights_tied():
    import torch

    from imtune.model.models import load_model
    from imtune.train import track

    model = load_model("random:tiny")
    run = SimpleNamespace(acc=SimpleNamespace(num_processes=1), cfg=SimpleNamespace(lora=False), model=model,
                          memory=None)
    state = track.held_copy(run)
    live = model.state_dict()
    assert state.keys() == live.keys()
    for k, v in state.items():
        assert torch.equal(v, live[k]) and v.untyped_storage().data_ptr() != live[k].untyped_storage().data_ptr()
    tied = [k for k in live if k != "model.embed_tokens.weight" and
            live[k].untyped_storage().data_ptr() == live["model.embed_tokens.weight"].untyped_storage().data_ptr()]
    for k in tied:  # a tied lm_head stays one tensor, so save_pretrained drops the alias as it does for the model
        assert state[k].untyped_storage().data_ptr() == state["model.embed_tokens.weight"].untyped_storage().data_ptr()
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # training goes on: the held copy does not move
    assert not torch.equal(next(iter(state.values())), next(iter(model.state_dict().values())))
    several = SimpleNamespace(acc=SimpleNamespace(num_processes=2), cfg=SimpleNamespace(lora=False), model=model,
                              memory=None)
    assert track.held_copy(several) is None  # several processes: written at once, collectively
    low = SimpleNamespace(**{**vars(run), "memory": SimpleNamespace(hold_best=False)})
    assert track.held_copy(low) is None  # planned under --memory-limit: best/ written at each improvement


def test_compare_scores_final_and_best_on_test_data_disjoint_from_validation(tmp_path):
    from imtune.config import TrainConfig
    from imtune.data.synth import synthesize, write_jsonl
    from imtune.experiments.arms import CompareSettings, parse_arms
    from imtune.experiments.compare import compare

    train, heldout = synthesize("lookup", 8, 4.0, seed=0, heldout=8)
    data = write_jsonl(tmp_path / "d.jsonl", train, "lookup", 0, "train")
    held = write_jsonl(tmp_path / "h.jsonl", heldout, "lookup", 0, "heldout")
    base = TrainConfig(model="random:tiny", data=str(data), eval_data=str(held), max_steps=4, batch_size=2,
                       max_length=256, lr=3e-3, warmup_ratio=0.0, eval_every=1, eval_train_sample=4, progress=False,
                       threads=1)
    out = compare(CompareSettings(out=tmp_path / "cmp", base=base, arms=parse_arms("it"), seeds=[0, 1],
                                  val_fraction=0.5, bleu_samples=0))
    read = lambda p: [json.loads(x) for x in Path(p).read_text().splitlines()]  # noqa: E731
    key = lambda r: json.dumps(r["messages"])  # noqa: E731
    val, test = read(out / "data" / "val.jsonl"), read(out / "data" / "test.jsonl")
    assert val and test and not ({key(r) for r in val} & {key(r) for r in test})
    assert sorted(map(key, val + test)) == sorted(map(key, read(held)))
    summary = json.loads((out / "compare.json").read_text())
    assert summary["data"]["n_val"] == len(val) and summary["data"]["n_test"] == len(test)
    (arm,) = summary["arms"]
    assert [r["seed"] for r in arm["runs"]] == [0, 1]
    for run in arm["runs"]:
        d = out / run["dir"]
        cfg = (d / "config.yaml").read_text()
        assert f"val_data: {out / 'data' / 'val.jsonl'}" in cfg and f"eval_data: {out / 'data' / 'test.jsonl'}" in cfg
        evals = read_metrics(d, kind="eval")
        vals = [e["val_output_loss"] for e in evals]
        best = json.loads((d / "best" / "best.json").read_text())
        assert best["step"] == evals[vals.index(min(vals))]["step"]  # argmin of the validation curve, first on ties
        assert best["loss"] == min(vals) and best["selected_on"] == "val_output_loss"
        # best/ is scored on the test part: the trainer's test-curve value at that step
        at = next(e for e in evals if e["step"] == best["step"])
        assert run["results"]["best"]["heldout"]["output_loss"] == pytest.approx(at["eval_output_loss"], rel=1e-4)
        assert run["results"]["heldout"]["n"] == len(test)
    ev = summary["evidence"]["measures"]
    assert set(ev) >= {"heldout_loss", "best_heldout_loss", "gap"}
    assert math.isfinite(ev["best_heldout_loss"]["values"]["it"]["low"])
    assert "Best vs final" not in summary["verdict"]["text"]  # one arm: nothing to compare, but no crash
    assert (out / "report.md").read_text().count("best") >= 1


def test_scores_reused_from_training_equal_a_fresh_evaluation_of_final_and_best(tmp_path):
    """compare takes final/'s and best/'s test scores from the trainer's evaluation at that step (no second forward
    pass); that is only right if they equal evaluate_run's on the saved model, example by example, same sources."""
    from imtune.config import TrainConfig
    from imtune.data.synth import synthesize, write_jsonl
    from imtune.evaluate.run import DataSet, evaluate_run
    from imtune.experiments.score import scored_in_training
    from imtune.model.models import load_model, load_tokenizer
    from imtune.rundir.read import read_run
    from imtune.train.loop import train

    train_set, heldout = synthesize("lookup", 8, 4.0, seed=0, heldout=6)
    data_path = write_jsonl(tmp_path / "d.jsonl", train_set, "lookup", 0, "train")
    held = write_jsonl(tmp_path / "held.jsonl", heldout, "lookup", 0, "heldout")
    test = tmp_path / "test.jsonl"  # as compare does: test.jsonl holds records first read from another file
    test.write_text(Path(held).read_text(encoding="utf-8"), encoding="utf-8")
    run_dir = train(TrainConfig(model="random:tiny", data=str(data_path), eval_data=str(test), val_data=str(test),
                                keep_best=True, max_steps=4, batch_size=2, max_length=256, lr=0.3, warmup_ratio=0.0,
                                eval_every=1, eval_train_sample=5, progress=False, threads=1,
                                output_dir=str(tmp_path / "run")))
    run = read_run(run_dir)
    from imtune.data.prepare import load

    convs, _ = load(str(held), "auto")  # sources held.jsonl:N, while the trainer read test.jsonl:N
    train_convs, _ = load(str(data_path), "auto")
    data = {"test_path": str(test), "test": convs, "train_path": str(data_path), "train": train_convs}
    best_step = json.loads((run_dir / "best" / "best.json").read_text())["step"]
    assert best_step < 4  # best/ holds an earlier point's weights (held in memory, written at the end)
    tok = load_tokenizer(str(run.final))
    for where, step in ((run.final, 4), (run_dir / "best", best_step)):
        reused, per = scored_in_training(run, data, step)
        fresh = evaluate_run(run, load_model(str(where)), tok, train=None, heldout=DataSet(tuple(convs)),
                             per_example=True).heldout.loss
        assert per["source"] == fresh["per_example"]["source"] == [str(c.source) for c in convs]
        assert per["output_tokens"] == fresh["per_example"]["output_tokens"]
        assert per["output_nll"] == pytest.approx(fresh["per_example"]["output_nll"], rel=1e-5)
        assert reused["output_loss"] == pytest.approx(fresh["output"]["nll"], rel=1e-5)
    # the train side of the gap: the trainer's fixed sample of 5 training examples, scored at the last step
    reused, per = scored_in_training(run, data, 4, "train")
    picked = [c for c in train_convs if str(c.source) in per["source"]]
    fresh = evaluate_run(run, load_model(str(run.final)), tok, train=DataSet(tuple(picked)), heldout=None,
                         per_example=True).train.loss
    assert len(picked) == reused["n"] == 5 and per["source"] == fresh["per_example"]["source"]
    assert per["output_nll"] == pytest.approx(fresh["per_example"]["output_nll"], rel=1e-5)
    assert reused["output_loss"] == pytest.approx(fresh["output"]["nll"], rel=1e-5)
    assert scored_in_training(run, {**data, "test_path": str(tmp_path / "other.jsonl")}, 4) is None
    assert scored_in_training(run, {**data, "train_path": str(tmp_path / "other.jsonl")}, 4, "train") is None
    assert scored_in_training(run, data, 99) is None  # no evaluation at that step: compare scores it afresh


@pytest.mark.slow
def test_best_of_the_last_step_is_final_and_answers_are_not_generated_twice(tmp_path, monkeypatch):
    """compare_eval never loads, scores or asks a model whose answers it already has: best/ of the last step is final/
    (its test score is final/'s), and an evaluation repeated with other settings takes the greedy answers the same
    weights gave before from RUN/eval/answers.json, generating only the new prompts. A cached evaluation hands back
    its measured time marked reused."""
    from helpers import patch_everywhere, tiny
    from imtune.data.prepare import load
    from imtune.data.synth import synthesize, write_jsonl
    from imtune.experiments import score as compare_eval
    from imtune.experiments.arms import CompareSettings, parse_arms
    from imtune.model import models
    from imtune.train.loop import train

    train_set, heldout = synthesize("lookup", 8, 4.0, seed=0, heldout=6)
    data_path = write_jsonl(tmp_path / "d.jsonl", train_set, "lookup", 0, "train")
    test_path = write_jsonl(tmp_path / "t.jsonl", heldout[:3], "lookup", 0, "heldout")
    val_path = write_jsonl(tmp_path / "v.jsonl", heldout[3:], "lookup", 0, "heldout")
    cfg = tiny(data_path, tmp_path / "run", loss="it", eval_data=str(test_path), val_data=str(val_path),
               keep_best=True, max_steps=2, batch_size=4, max_length=256, eval_every=1, eval_train_sample=0)
    run_dir = train(cfg)
    best = json.loads((run_dir / "best" / "best.json").read_text())
    (run_dir / "best" / "best.json").write_text(json.dumps({**best, "step": 2}))  # as if the last step were best
    data = {"train": load(str(data_path), "auto")[0], "test": load(str(test_path), "auto")[0],
            "train_path": str(data_path), "test_path": str(test_path)}
    loaded, asked, real = [], [], models.load_model

    def spy(spec, *a, **kw):
        loaded.append(spec)
        model = real(spec, *a, **kw)
        generate = model.generate
        model.generate = lambda **k: asked.append(k["input_ids"].shape[0]) or generate(**k)
        return model

    patch_everywhere(monkeypatch, models, "load_model", spy)
    monkeypatch.setattr(compare_eval, "scored_in_training", lambda *a: None)  # every score computed here
    settings = lambda **kw: CompareSettings(out=tmp_path, base=cfg, arms=parse_arms("it"),  # noqa: E731
                                            max_new_tokens=3, **kw)
    first = compare_eval.evaluate_arm(settings(bleu_samples=4), parse_arms("it")[0], cfg, data, "run")
    assert loaded == [str(run_dir / "final")]  # best/ (step 2 of 2) is final/: neither loaded nor scored again
    assert first["best"]["heldout"] == first["heldout"]
    assert first["best"]["step"] == 2 and sum(asked) == 4
    again = compare_eval.evaluate_arm(settings(bleu_samples=4, exact_match=2), parse_arms("it")[0], cfg, data, "run")
    assert sum(asked) == 4 + 2  # only the exact-match prompts are new to these weights
    assert again["bleu"] == first["bleu"] and again["exact_match"]["n"] == 2
    answers = json.loads((run_dir / "eval" / "answers.json").read_text())["answers"]
    assert len(answers) == 6 and len({a["weights"] for a in answers}) == 1
    assert set(first["time"]["seconds"]) == {"startup", "final_scoring", "generation"}
    cached = compare_eval.evaluate_arm(settings(bleu_samples=4, exact_match=2), parse_arms("it")[0], cfg, data, "run")
    assert cached["time"] == {**again["time"], "reused": True} and sum(asked) == 6
