"""Hostile inputs for imtune.files' two classes of rules, through the commands people run.

Ownership: --out / --output-dir naming the working directory or a folder of the user's (data/train.jsonl,
config.yaml, metrics.jsonl beside each other) is refused by compare, train, sweep, study and demo, with every file
byte for byte as it was and nothing created; a bad argument after a good --out leaves nothing behind; no output is
written over an input. Links and strings: a run or comparison directory received from someone else, with a link
planted where imtune writes (metrics.jsonl, eval/, report.md) or a compare.json pointing outside itself, is refused
and the link's target untouched; a data file whose name holds a newline, a backtick, HTML and a link appears escaped
in report.md and report.html."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from helpers import tiny, write_conversations
from imtune.cli import main
from imtune.types import UsageError

EVIL = "evil`\n\n<img src=x onerror=alert(1)>|[x](javascript:alert(2))\n<svg onload=alert(3)>.jsonl"  # no "/"
FAST = ["--model", "random:tiny", "--max-steps", "1", "--batch-size", "2", "--max-length", "128", "--no-progress"]


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its bytes (None: a directory), links as their targets: what must not change."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


@pytest.fixture
def project(tmp_path) -> Path:
    """A user's project folder: data/train.jsonl, config.yaml and metrics.jsonl of their own."""
    d = tmp_path / "project"
    (d / "data").mkdir(parents=True)
    write_conversations(d / "data" / "train.jsonl", 12)
    (d / "config.yaml").write_text("model: my-own-settings\n")
    (d / "metrics.jsonl").write_text('{"mine": 1}\n')
    return d


# -- ownership -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [[], ["--lr", "-1"]], ids=["good-flags", "bad-flag"])
def test_compare_into_the_working_directory_is_refused_and_the_data_left_whole(project, monkeypatch, capsys, bad):
    monkeypatch.chdir(project)
    before = tree(project)
    assert main(["compare", "--data", "data/train.jsonl", "--arms", "it", "--bleu-samples", "0", *FAST, *bad,
                 "--out", "."]) == 2
    assert tree(project) == before  # data/train.jsonl byte for byte, and no arms/ or compare.json beside it
    assert "working directory" in capsys.readouterr().err or bad


@pytest.mark.parametrize("command", ["compare", "sweep", "study", "demo"])
def test_a_users_folder_is_never_an_out_directory(project, capsys, command):
    data = str(project / "data" / "train.jsonl")
    argv = {"compare": ["compare", "--data", data, "--arms", "it", *FAST],
            "sweep": ["sweep", "--data", data, "--prompt-weights", "0,1", *FAST],
            "study": ["study", "--factor", "n", "--values", "4,8", "--data", data, *FAST],
            "demo": ["demo", "--model", "random:tiny", "--max-steps", "1"]}[command]
    before = tree(project)
    assert main([*argv, "--out", str(project)]) == 2
    err = capsys.readouterr().err
    assert "not made by imtune" in err and "config.yaml, data, metrics.jsonl" in err, err
    assert tree(project) == before


def test_train_takes_no_folder_for_a_run_because_it_holds_a_config_yaml(project, capsys):
    before = tree(project)
    assert main(["train", "--data", str(project / "data" / "train.jsonl"), *FAST, "--output-dir", str(project)]) == 2
    assert "not made by imtune" in capsys.readouterr().err
    assert tree(project) == before  # config.yaml and metrics.jsonl are the user's still


def test_a_bad_argument_after_a_good_out_leaves_nothing_behind(tmp_path, capsys):
    data = write_conversations(tmp_path / "d.jsonl", 12)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n')
    for argv in (["compare", "--data", data, "--seeds", "1,1", *FAST],
                 ["compare", "--data", data, "--reference", "all", *FAST],
                 ["sweep", "--data", data, "--seeds", "0,0", *FAST],
                 ["study", "--factor", "n", "--values", "4,8", "--data", data, "--jobs", "0", *FAST],
                 ["compare", "--data", str(broken), *FAST],
                 ["train", "--data", str(broken), *FAST]):
        out = tmp_path / "new" / "out"
        flag = "--output-dir" if argv[0] == "train" else "--out"
        assert main([*argv, flag, str(out)]) == 2, argv
        capsys.readouterr()
        assert not (tmp_path / "new").exists(), (argv, tree(tmp_path / "new"))


def test_no_output_is_written_over_an_input(tmp_path, capsys):
    data = Path(write_conversations(tmp_path / "d.jsonl", 4))
    before = data.read_bytes()
    assert main(["inspect", str(data), "--model", "random:tiny", "--jsonl", str(data)]) == 2
    assert "input of this command" in capsys.readouterr().err and data.read_bytes() == before
    os.link(data, tmp_path / "same.jsonl")  # the same file under another name
    assert main(["inspect", str(data), "--model", "random:tiny", "--jsonl", str(tmp_path / "same.jsonl")]) == 2
    assert data.read_bytes() == before


# -- links and strings in directories from elsewhere ----------------------------------------------------------------
@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished random:tiny run with a checkpoint at every step, and its data."""
    from imtune.train.loop import train

    d = tmp_path_factory.mktemp("finished")
    data, held = write_conversations(d / "d.jsonl", 8), write_conversations(d / "held.jsonl", 2, seed=1)
    cfg = tiny(data, d / "run", batch_size=4, max_steps=2, save_every=1, eval_data=held)
    return Path(train(cfg)), cfg


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    """A finished comparison on a data file whose name is an attack on the report."""
    d = tmp_path_factory.mktemp("comparison")
    data = write_conversations(d / EVIL, 12)
    assert main(["compare", "--data", data, "--arms", "it", "--bleu-samples", "0", "--val-fraction", "0", *FAST,
                 "--out", str(d / "cmp")]) == 0
    return d / "cmp"


def received(src: Path, tmp_path: Path) -> Path:
    """A copy of a directory as it would arrive from someone else (links kept as links)."""
    return Path(shutil.copytree(src, tmp_path / src.name, symlinks=True))


def test_a_metrics_link_in_a_received_run_is_refused_on_resume(finished, tmp_path):
    from imtune.train.loop import train

    run_dir, cfg = finished
    run = received(run_dir, tmp_path)
    shutil.rmtree(run / "final")
    (run / "DONE").unlink()
    victim = tmp_path / "victim"
    victim.write_text('{"step": 1, "precious": true}\n{"step": 9}\n')
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(Path("..") / "victim")
    with pytest.raises(UsageError, match="metrics.jsonl is a symbolic link"):
        train(cfg.replace(output_dir=str(run), resume="auto"))
    assert victim.read_text() == '{"step": 1, "precious": true}\n{"step": 9}\n'


def test_an_eval_link_in_a_received_run_is_refused(finished, tmp_path, capsys):
    run_dir, cfg = finished
    run = received(run_dir, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (run / "eval").symlink_to(elsewhere)
    assert main(["eval", str(run), "--data", cfg.eval_data]) == 2
    assert "eval is a symbolic link" in capsys.readouterr().err and list(elsewhere.iterdir()) == []


def test_a_report_link_in_a_received_comparison_is_refused(comparison, tmp_path, capsys):
    cmp = received(comparison, tmp_path)
    victim = tmp_path / "victim.md"
    victim.write_text("my notes\n")
    (cmp / "report.md").unlink()
    (cmp / "report.md").symlink_to(victim)
    assert main(["compare", "--report-only", str(cmp)]) == 2
    assert "report.md is a symbolic link" in capsys.readouterr().err and victim.read_text() == "my notes\n"


def test_a_received_compare_json_cannot_point_outside_its_directory(comparison, tmp_path, capsys):
    cmp = received(comparison, tmp_path)
    summary = json.loads((cmp / "compare.json").read_text())
    summary["arms"][0]["runs"][0]["dir"] = "../../elsewhere"
    (cmp / "compare.json").write_text(json.dumps(summary))
    assert main(["compare", "--report-only", str(cmp)]) == 2
    assert "not a path inside it" in capsys.readouterr().err


def test_a_hostile_data_file_name_is_escaped_in_the_reports(comparison):
    markdown_it = pytest.importorskip("markdown_it")
    md = (comparison / "report.md").read_text()
    rendered = markdown_it.MarkdownIt("commonmark", {"html": True}).enable("table").render(md)
    assert not re.search(r"<img[^>]*onerror|<svg\b", rendered), [line for line in md.splitlines() if "alert" in line]
    assert "javascript:" not in "".join(re.findall(r"href=\"[^\"]*\"", rendered))
    assert "alert(1)" in rendered  # the name is shown, as text
    page = (comparison / "report.html").read_text()
    assert not re.search(r"<img[^>]*onerror|<svg\b", page) and "&lt;img src=x onerror=alert(1)&gt;" in page
