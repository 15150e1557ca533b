"""Progress in every phase that can take a while (issue #26): the in-training evaluations have a bar of their own (the
training bar stands still meanwhile), saves say what they write and how long it took, compare's final scoring and
generation have bars; --no-progress turns the bars and the announcements off."""
from __future__ import annotations

from helpers import tiny, write_conversations


def test_training_shows_its_evaluations_and_saves_and_no_progress_silences_them(tmp_path, capsys, monkeypatch):
    from imtune.train.loop import train

    monkeypatch.setenv("IMTUNE_NO_CACHE", "1")  # step 0 is evaluated here, not taken from imtune.train.baseline's cache

    data = write_conversations(tmp_path / "d.jsonl", 12)
    held = write_conversations(tmp_path / "h.jsonl", 4, seed=1)
    kw = dict(eval_data=held, val_data=held, keep_best=True, eval_every=1, eval_train_sample=4, max_steps=2,
              batch_size=4, save_every=2)
    train(tiny(data, tmp_path / "on", progress=True, **kw))
    err = capsys.readouterr().err
    for step in (0, 1, 2):
        assert f"evaluating (step {step}): " in err  # a bar of its own, step 0's included
    assert "writing checkpoint step-2 (~" in err and "writing final/ (~" in err and "writing best/ (~" in err
    assert "at the rate of the last save" in err  # the second save on knows how long the first took
    assert next(x for x in err.splitlines() if "final model:" in x).endswith(" s)")

    train(tiny(data, tmp_path / "off", progress=False, **kw))
    err = capsys.readouterr().err
    assert "evaluating (step" not in err and "writing " not in err
    assert next(x for x in err.splitlines() if "final model:" in x).endswith(" s)")  # the outcome is still said


def test_final_scoring_and_generation_show_bars_unless_progress_is_off(tmp_path, capsys):
    from imtune.config import TrainConfig
    from imtune.data.prepare import load
    from imtune.evaluate.run import DataSet, Scoring, evaluate_run
    from imtune.experiments.arms import CompareSettings, parse_arms
    from imtune.experiments.score import generation_scores
    from imtune.model.models import load_model, load_tokenizer

    path = write_conversations(tmp_path / "d.jsonl", 6)
    convs = load(str(path), "auto")[0]
    model, tok = load_model("random:tiny"), load_tokenizer("random:tiny")
    renderer = Scoring().renderer(tok)
    for progress in (True, False):
        evaluate_run(None, model, tok, train=None, heldout=DataSet(tuple(convs)), progress=progress)
        s = CompareSettings(out=tmp_path, base=TrainConfig(progress=progress), arms=parse_arms("it"), bleu_samples=2,
                            max_new_tokens=2)
        generation_scores(s, model, tok, renderer, tmp_path, TrainConfig(), {"train": convs, "test": convs})
        err = capsys.readouterr().err
        assert ("loss: " in err and "generate: " in err) == progress, err
