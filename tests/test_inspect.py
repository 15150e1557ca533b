"""`imtune inspect`: the view, the --jsonl rows, and errors for people (no tracebacks)."""
from __future__ import annotations

import json
import subprocess

import pytest

from conftest import ROOT, shared_file
from imtune.cli import main


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return str(p)


def test_jsonl_rows_and_view(tmp_path, capsys):
    data = write(tmp_path, "d.jsonl", json.dumps({"instruction": "Say hi", "output": "hi"}) + "\n"
                 + json.dumps({"instruction": "Count", "input": "1 2", "output": "3"}) + "\n")
    out = tmp_path / "rows.jsonl"
    assert main(["inspect", data, "--template", "tulu", "--loss", "it", "--jsonl", str(out), "--color", "never"]) == 0
    view = capsys.readouterr().out
    assert "<|user|>↵\nSay hi↵\n<|assistant|>↵\n[hi<|im_end|>]↵" in view
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1]
    r = rows[1]
    assert len(r["input_ids"]) == len(r["weights"]) == len(r["classes"])
    assert {c for c, w in zip(r["classes"], r["weights"]) if w > 0} == {"assistant", "eot"}
    assert "user" in r["classes"] and "template" in r["classes"]


def test_weighted_view_marks_partial_weights(tmp_path, capsys):
    data = write(tmp_path, "d.jsonl", json.dumps({"prompt": "Why?", "completion": "Because."}) + "\n")
    assert main(["inspect", data, "--template", "chatml", "--loss", "weighted", "--prompt-weight", "0.1",
                 "--color", "never"]) == 0
    assert "[Why?|0.1]" in capsys.readouterr().out


def test_bad_data_gets_path_line_and_no_traceback(tmp_path):
    data = write(tmp_path, "bad.jsonl", json.dumps({"messages": [{"role": "user", "content": "q"},
                                                                  {"role": "assistant", "content": "a"}]})
                 + "\n{not json\n")
    p = subprocess.run([str(ROOT / ".venv/bin/imtune"), "inspect", data], capture_output=True, text=True)
    assert p.returncode == 2
    assert f"{data}:2:" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("args, message", [
    (["--template", "nope"], "unknown template 'nope'"),
    (["--loss", "weighted"], "needs --prompt-weight"),
    (["--weights", "bogus=1"], "unknown class 'bogus'"),
])
def test_usage_errors(tmp_path, capsys, args, message):
    data = write(tmp_path, "d.jsonl", json.dumps({"prompt": "Why?", "completion": "Because."}) + "\n")
    assert main(["inspect", data, *args]) == 2
    assert message in capsys.readouterr().err


def test_inspect_lima_model_template(capsys):
    lima = shared_file("train/lima.jsonl")
    assert main(["inspect", str(lima), "--loss", "im", "--limit", "2", "--color", "never"]) == 0
    out = capsys.readouterr()
    assert "2/2 examples kept" in out.err and out.out.count("── example") == 2


def test_role_map_flag(tmp_path, capsys):
    rec = {"messages": [{"role": "human", "content": "Why?"}, {"role": "bot", "content": "Because."}]}
    data = write(tmp_path, "d.jsonl", json.dumps(rec) + "\n")
    assert main(["inspect", data, "--template", "tulu", "--color", "never"]) == 2
    assert "unknown role 'bot'" in capsys.readouterr().err
    assert main(["inspect", data, "--template", "tulu", "--color", "never", "--role", "bot=assistant"]) == 0
    assert "<|user|>↵\nWhy?↵\n<|assistant|>↵\n[Because.<|im_end|>]" in capsys.readouterr().out


def test_train_config_takes_the_role_map():
    import argparse

    from imtune.config import TrainConfig, add_train_arguments

    p = argparse.ArgumentParser()
    add_train_arguments(p)
    cfg = TrainConfig.from_args(p.parse_args(["--data", "d.jsonl", "--role", "bot=assistant"]))
    assert cfg.roles == {"bot": "assistant"} and "roles:\n  bot: assistant" in cfg.to_yaml()


def test_weights_other_than_0_and_1_are_written_out_and_above_1_warned(tmp_path, capsys):
    data = write(tmp_path, "d.jsonl", json.dumps({"prompt": "Why?", "completion": "Because."}) + "\n")
    assert main(["inspect", data, "--template", "chatml", "--loss", "weighted", "--prompt-weight", "2",
                 "--color", "never"]) == 0
    out, err = capsys.readouterr()
    assert "[Why?|2]" in out and "[Why?]" not in out  # 2 is never drawn like 1
    assert "weights other than 0 and 1 here: 2" in out
    assert "warning: class weight(s) above 1 (system=2, user=2)" in err
    assert main(["inspect", data, "--template", "chatml", "--loss", "weighted", "--prompt-weight", "-1"]) == 2
    assert "--prompt-weight must be a finite number >= 0" in capsys.readouterr().err


def test_inspect_and_data_stats_disclose_the_system_prompt(capsys, tmp_path):
    data = write(tmp_path, "d.jsonl", json.dumps({"prompt": "Why?", "completion": "Because."}) + "\n")
    assert main(["inspect", data, "--color", "never"]) == 0
    assert "system prompt: template model adds its default system prompt" in capsys.readouterr().err
    assert main(["data", "stats", data]) == 0
    assert "system prompt: template model adds its default system prompt" in capsys.readouterr().out
    assert main(["inspect", data, "--color", "never", "--system-prompt", "Be brief."]) == 0
    out, err = capsys.readouterr()
    assert "system prompt: 'Be brief.' (--system-prompt)" in err and "<|im_start|>system↵\nBe brief." in out
