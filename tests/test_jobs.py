"""imtune.experiments.jobs: compare's runs trained side by side (--jobs) end exactly where the same runs end one
after another, each writes its own RUN/train.log, and a run that fails stops the others and names its log."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import word_data
from imtune.cli import main
from imtune.config import TrainConfig
from imtune.experiments.jobs import Job, train_all
from imtune.types import UsageError

_data = word_data


def _compare(tmp_path, data: str, out: str, jobs: int) -> None:
    argv = ["compare", "--data", data, "--model", "random:tiny", "--arms", "it,im", "--max-steps", "3",
            "--batch-size", "2", "--max-length", "64", "--threads", "1", "--bleu-samples", "0", "--eval-every", "3",
            "--no-progress", "--out", str(tmp_path / out), "--jobs", str(jobs)]
    assert main(argv) == 0


def test_runs_side_by_side_end_where_they_end_one_after_another(tmp_path, capsys):
    data = _data(tmp_path / "d.jsonl")
    _compare(tmp_path, data, "seq", 1)
    _compare(tmp_path, data, "par", 2)
    err = capsys.readouterr().err
    assert "side by side" in err and "trained in" in err
    for arm in ("it", "im"):
        seq, par = tmp_path / "seq" / "arms" / arm / "seed-42", tmp_path / "par" / "arms" / arm / "seed-42"
        assert (par / "train.log").read_text().count("final model:") == 1  # the child's output went to its log
        assert not (seq / "train.log").exists()
        assert not (par / "eval" / "compare.log").exists()  # evaluations run one after another in this process
        a, b = load_file(seq / "final" / "model.safetensors"), load_file(par / "final" / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), arm
    summary = lambda d: json.loads((tmp_path / d / "compare.json").read_text())["evidence"]  # noqa: E731
    assert summary("seq") == summary("par")


def test_a_failing_run_names_its_log(tmp_path):
    data = _data(tmp_path / "d.jsonl")
    good = TrainConfig(model="random:tiny", data=data, output_dir=str(tmp_path / "a"), max_steps=1, progress=False)
    bad = good.replace(model=str(tmp_path / "no-such-model"), output_dir=str(tmp_path / "b"))
    with pytest.raises(UsageError, match=r"\[bad\] failed \(exit 2\); its log .*b/train.log ends:\n.*no-such-model"):
        train_all([Job("[bad]", bad), Job("[good]", good)], 2, lambda msg: None)
    assert (tmp_path / "b" / "train.log").exists()
