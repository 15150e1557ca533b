"""A command that fails before training leaves no folder behind (issue 26): `train` and `compare` with a missing data
file, a model that is not there, a flag value only the model or the tokenizer can refuse. The output directory (and
the parents made for it) must not exist afterwards, and the error is one line, not a traceback."""
from __future__ import annotations

import pytest

from helpers import word_data
from imtune.cli import main

LATE = {  # what is wrong -> the flags that say it; each is found only after the output directory could be made
    "missing data": ["--data", "missing.jsonl"],
    "model not found": ["--model", "no-such-owner/no-such-model"],
    "unknown template": ["--template", "nope"],
    "no such LoRA module": ["--lora", "--lora-targets", "no_such_proj"],
    "no example fits": ["--max-length", "4"],
}


def _argv(command: str, data: str, out, flags: list[str]) -> list[str]:
    given = dict(zip(flags[::2], flags[1::2])) if "--lora" not in flags else {}
    where = ["--output-dir", str(out)] if command == "train" else ["--out", str(out), "--bleu-samples", "0"]
    return [command, *(["--data", data] if "--data" not in given else []), *(["--model", "random:tiny"]
            if "--model" not in given else []), *flags, "--max-steps", "1", "--no-progress", "--threads", "1", *where]


@pytest.mark.parametrize("what", list(LATE))
@pytest.mark.parametrize("command", ["train", "compare"])
def test_a_command_that_fails_before_training_leaves_no_folder(tmp_path, monkeypatch, capsys, command, what):
    monkeypatch.chdir(tmp_path)  # `missing.jsonl` is relative
    data = word_data(tmp_path / "d.jsonl", 12)
    out = tmp_path / "made" / "for" / "it"
    assert main(_argv(command, data, out, LATE[what])) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("imtune")
    assert not (tmp_path / "made").exists(), sorted(str(p) for p in (tmp_path / "made").rglob("*"))


def test_a_compare_that_trained_something_keeps_its_folder(tmp_path, monkeypatch):
    """The other side: once a run has begun training, a failure later keeps everything (the re-run resumes)."""
    from imtune.experiments import compare as cmp

    data = word_data(tmp_path / "d.jsonl", 12)
    out = tmp_path / "cmp"

    def fail(*args, **kwargs):  # every run trained; the evaluation fails
        raise cmp.UsageError("evaluation failed")

    monkeypatch.setattr("imtune.experiments.compare.evaluate_arm", fail)
    assert main(["compare", "--data", data, "--model", "random:tiny", "--max-steps", "1", "--no-progress",
                 "--threads", "1", "--bleu-samples", "0", "--arms", "it", "--out", str(out)]) == 2
    assert (out / "arms" / "it" / "seed-42" / "DONE").exists() and (out / "data" / "train.jsonl").exists()


@pytest.mark.parametrize("command", [
    ["sweep", "--prompt-weights", "0,1"],
    ["study", "--factor", "n", "--values", "4,8"],
])
def test_sweep_and_study_that_fail_before_training_leave_no_folder(tmp_path, capsys, command):
    data = word_data(tmp_path / "d.jsonl", 20)
    out = tmp_path / "made" / "grid"
    assert main([*command, "--data", data, "--model", "random:tiny", "--template", "nope", "--max-steps", "1",
                 "--no-progress", "--out", str(out)]) == 2
    assert "unknown template 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "made").exists(), sorted(str(p) for p in (tmp_path / "made").rglob("*"))
