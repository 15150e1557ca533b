"""RunDir (imtune.rundir.read) reads a run directory once for everyone, and evaluate_run (imtune.evaluate.run) scores a
run on its data read exactly as training read it: a run trained with a field mapping and --system-prompt TEXT is re-read
to the same tokens, per class, that training counted in RUN/data_stats.json."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from imtune.cli import main
from imtune.config import TrainConfig
from imtune.evaluate.run import DataSet, Scoring, evaluate_run, scoring_as_trained, training_data
from imtune.rundir.read import find_run, model_dir, read_run
from imtune.types import CLASSES, UsageError

SYSTEM = "Answer in one word."


def _alpaca(path: Path, rows: list[tuple[str, str]]) -> str:
    """Records whose keys only a field mapping understands (q -> instruction, a -> output)."""
    path.write_text("".join(json.dumps({"q": q, "a": a}) + "\n" for q, a in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished random:tiny run: alpaca records under other keys, a system prompt of its own, a limit."""
    from imtune.train.loop import train

    d = tmp_path_factory.mktemp("rundir")
    data = _alpaca(d / "train.jsonl", [(f"Name a colour number {i}.", f"Colour {i}") for i in range(6)])
    held = _alpaca(d / "held.jsonl", [("Name a fruit.", "Apple"), ("Name a tree.", "Oak")])
    cfg = TrainConfig(model="random:tiny", data=data, eval_data=held, output_dir=str(d / "run"), format="alpaca",
                      fields={"instruction": "q", "output": "a"}, system_prompt=SYSTEM, limit=5, loss="it",
                      max_length=64, max_steps=1, eval_train_sample=0, progress=False, threads=1)
    return Path(train(cfg))


# -- RunDir ----------------------------------------------------------------------------------------------------------
def test_read_run_reads_config_final_done_and_metrics(run):
    r = read_run(run)
    assert r.path == run and r.config == TrainConfig.from_yaml(run / "config.yaml")
    assert r.config.system_prompt == SYSTEM and r.config.fields == {"instruction": "q", "output": "a"}
    assert r.final == run / "final" and r.finished
    assert json.loads(r.done_text())  # the summary train() writes last
    assert [m["step"] for m in r.metrics()] == [1]
    assert r.metrics("eval") and all(m["type"] == "eval" for m in r.metrics("eval"))
    assert read_run(run / "final") == r == find_run(str(run)) == find_run(str(run / "final"))
    assert model_dir(run) == run / "final" and model_dir(run / "final") == run / "final"


def test_unfinished_and_foreign_directories(tmp_path):
    assert find_run("random:tiny") is None and find_run(None) is None
    plain = tmp_path / "model"
    plain.mkdir()
    assert find_run(str(plain)) is None and model_dir(plain) == plain
    with pytest.raises(UsageError, match="not an imtune run directory"):
        read_run(plain)
    with pytest.raises(UsageError, match="no such run directory or model: .*nope"):
        read_run(tmp_path / "nope")
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.yaml").write_text("data: d.jsonl\n")
    r = read_run(half)
    assert not r.finished and r.done_text() == "" and r.metrics() == [] and r.config.data == "d.jsonl"
    assert find_run(str(half)) is None  # no final/ yet: not a model to evaluate


def test_config_errors_name_the_file(tmp_path):
    for text, why in (("data: [unclosed\n", "not valid YAML"), ("- a\n", "mapping"),
                      ("data: d.jsonl\nlearning_rate: 1\n", "unknown config key")):
        (tmp_path / "config.yaml").write_text(text)
        with pytest.raises(UsageError, match=why) as e:
            read_run(tmp_path)
        assert str(tmp_path / "config.yaml") in str(e.value)


def test_data_paths_resolve_beside_a_moved_run_and_a_moved_template_file_falls_back(tmp_path):
    (tmp_path / "train.jsonl").write_text("{}\n")
    (tmp_path / "config.yaml").write_text("data: train.jsonl\ntemplate: gone/t.jinja\n")
    r = read_run(tmp_path)
    assert r.data_path("train.jsonl") == str(tmp_path / "train.jsonl") and r.data_path(None) is None
    assert r.data_path("hf:owner/name") == "hf:owner/name"
    assert r.template == str(tmp_path / "chat_template.jinja")


# -- evaluate_run ----------------------------------------------------------------------------------------------------
def test_evaluate_run_rereads_the_training_data_as_training_did(run):
    stats = json.loads((run / "data_stats.json").read_text())
    r = read_run(run)
    assert scoring_as_trained(r) == Scoring(None, SYSTEM, 64, "drop", "split")
    assert training_data(r) == DataSet(r.config.data, "alpaca", {"instruction": "q", "output": "a"}, {}, "error", 5)
    assert training_data(r, limit=2).limit == 2 and training_data(r, limit=9).limit == 5
    ev = evaluate_run(r, per_example=True)
    train = ev.train.loss
    # Same examples, same tokens, and each token in the same class as training counted them (token 0 never).
    assert train["n"] == stats["examples"] == 5 and train["tokens"] == stats["tokens"]
    assert {c: train["per_class"][c]["tokens"] for c in CLASSES} == stats["predicted_tokens_by_class"]
    assert train["per_class"]["system"]["tokens"] > 0  # the run's system prompt, scored as system tokens
    # The conversations as read (q -> user, a -> assistant); the system prompt is the template's, added at render.
    assert [[m.role for m in c.messages] for c in ev.train.conversations] == [["user", "assistant"]] * 5
    held = ev.heldout.loss
    assert held["n"] == 2 and held["per_class"]["system"]["tokens"] > 0  # eval_data read with the same mapping
    assert ev.output_gap == pytest.approx(held["output"]["nll"] - train["output"]["nll"])
    assert ev.gap["instruction"] == pytest.approx(held["instruction"]["nll"] - train["instruction"]["nll"])
    assert len(train["per_example"]["output_nll"]) == 5


def test_evaluate_run_sides_can_be_given_or_left_out(run):
    from imtune.types import Conversation, Message

    r = read_run(run)
    conv = Conversation((Message("user", "Name a colour."), Message("assistant", "Red")))
    ev = evaluate_run(r, train=None, heldout=DataSet((conv,)))
    assert ev.train is None and ev.gap is None and ev.output_gap is None and ev.heldout.loss["n"] == 1
    assert ev.heldout.data.label == "1 conversations"
    plain = evaluate_run(r, train=None, heldout=DataSet((conv,)), scoring=Scoring(max_length=64))
    # Without the run's system prompt the conversation has no system tokens: the scoring is what differs.
    assert plain.heldout.loss["per_class"]["system"]["tokens"] == 0 < ev.heldout.loss["per_class"]["system"]["tokens"]
    read_only = evaluate_run(r, loss=False)
    assert read_only.train.loss is None and len(read_only.train.conversations) == 5


def test_eval_command_is_evaluate_run(run, capsys):
    assert main(["eval", str(run), "--json", str(run.parent / "e.json")]) == 0
    res = json.loads((run.parent / "e.json").read_text())
    ev = evaluate_run(read_run(run))
    assert res["train"]["tokens"] == ev.train.loss["tokens"] and res["heldout"]["n"] == ev.heldout.loss["n"] == 2
    assert res["train"]["output"]["nll"] == pytest.approx(ev.train.loss["output"]["nll"], abs=1e-6)
    assert res["gap"]["output"] == pytest.approx(ev.output_gap, abs=1e-6)
    assert res["truncation"] == "drop" and res["max_length"] == 64
    assert (run / "eval" / "eval-held.json").exists()
