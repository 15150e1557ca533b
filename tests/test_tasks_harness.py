"""The lm-evaluation-harness bridge, offline: a small local multiple-choice task run on a tiny random model."""
from __future__ import annotations

import json
import socket

import pytest

from imtune.tasks import harness, run_benchmark

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[eval]')")

QUESTIONS = [
    ("What color is the sky on a clear day?", ["blue", "green", "red", "black"], 0),
    ("How many legs does a spider have?", ["six", "eight", "ten", "four"], 1),
    ("Which of these is a fruit?", ["carrot", "potato", "apple", "onion"], 2),
    ("What is 2 + 2?", ["3", "5", "22", "4"], 3),
    ("Which animal barks?", ["dog", "cat", "cow", "fish"], 0),
    ("At what temperature in Celsius does water freeze?", ["100", "0", "50", "-50"], 1),
    ("Which planet do we live on?", ["Mars", "Venus", "Earth", "Jupiter"], 2),
    ("What do bees make?", ["milk", "silk", "wool", "honey"], 3),
]

TASK_YAML = """task: imtune_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def test_paper_group_expands_to_the_papers_tasks():
    names = harness.expand(["paper", "arc_challenge", "mmlu"])
    assert names[: len(harness.PAPER_TASKS)] == list(harness.PAPER_TASKS) and names[-1] == "arc_challenge"
    assert len(harness.PAPER_TASKS) == 16 and {"mmlu", "truthfulqa_mc2", "bbh_cot_fewshot"} <= set(names)


def test_local_task_runs_offline(tmp_path, monkeypatch, capsys):
    import datasets
    import huggingface_hub

    from imtune.cli import main
    from imtune.model.models import load_model, load_tokenizer

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    attempts = []
    real_connect = socket.socket.connect

    def connect(self, address):  # record (and refuse) any connection attempt that is not a local Unix socket
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError("network access attempted in an offline test")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tasks / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (tasks / "tiny_mc.yaml").write_text(TASK_YAML.format(data=data))
    model, tok = load_model("random:tiny"), load_tokenizer("random:tiny")
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)

    out, js = tmp_path / "out", tmp_path / "result.json"
    code = main(["bench", "harness", "--model", str(model_dir), "--tasks", "imtune_tiny_mc", "--include-path",
                 str(tasks), "--out", str(out), "--json", str(js)])
    assert code == 0 and attempts == []
    result = json.loads(js.read_text())
    assert result["benchmark"] == "harness" and result["n"] == 8 and result["n_per_task"] == {"imtune_tiny_mc": 8}
    acc = result["tasks"]["imtune_tiny_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0 and acc * 8 == round(acc * 8)
    assert (out / "harness-imtune_tiny_mc.json").exists()
    assert "| imtune_tiny_mc | acc |" in (out / "harness-imtune_tiny_mc.md").read_text()
    assert "| imtune_tiny_mc | acc |" in capsys.readouterr().out

    # the Python API with a model already loaded (lm-eval gets an HFLM wrapping it); --limit counts per task
    loaded = run_benchmark("harness", model, tok, None, None, limit=4, tasks=["imtune_tiny_mc"],
                           include_path=str(tasks))
    assert loaded["n"] == 4 and "acc,none" in loaded["tasks"]["imtune_tiny_mc"] and attempts == []
