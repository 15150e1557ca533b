"""The command map: every registered command imports, builds its parser and has a run(); help and unknown commands."""
from __future__ import annotations

import importlib

import pytest

from imtune.cli import COMMANDS, build_parser, main
from imtune.types import UsageError


@pytest.mark.parametrize("words", list(COMMANDS))
def test_every_command_builds_its_parser(words):
    module = importlib.import_module(COMMANDS[words][0])
    assert callable(module.run)
    assert build_parser(words).format_help().startswith(f"usage: imtune {words}")


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(w in out for w in COMMANDS)


def test_unknown_command(capsys):
    assert main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_version(capsys):
    import imtune

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"imtune {imtune.__version__}"


def test_help_command_lists_commands_and_shows_one_command(capsys):
    assert main(["help"]) == 0
    out = capsys.readouterr().out
    assert all(w in out for w in COMMANDS)
    assert main(["help", "data", "stats"]) == 0
    assert capsys.readouterr().out.startswith("usage: imtune data stats")


@pytest.mark.parametrize("group", ["data", "models"])
def test_group_help_lists_its_subcommands(group, capsys):
    assert main([group, "--help"]) == 0
    out = capsys.readouterr().out
    subs = [w for w in COMMANDS if w.split()[0] == group]
    assert subs and all(w in out for w in subs)
    assert "compare" not in out  # only the group's own


@pytest.mark.parametrize("argv, meant", [(["stats", "x.jsonl"], "data stats"), (["trian"], "train"),
                                         (["data", "stat"], "data stats"), (["model", "prepare"], "models prepare")])
def test_did_you_mean(argv, meant, capsys):
    assert main(argv) == 2
    assert f"did you mean `imtune {meant}`?" in capsys.readouterr().err


def test_description_is_whole_sentences(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    description = out.split("\n\n")[1]
    assert description.endswith(".") and "\n" not in description


def test_a_data_command_starts_without_torch(tmp_path):
    """Import cost: tokenizer-only commands never import torch (seconds of start-up; issue 12)."""
    import json
    import subprocess
    import sys

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi.", "output": "Hi!"}) + "\n")
    code = ("import sys; from imtune.cli import main; rc = main(['data', 'stats', sys.argv[1]]); "
            "print('torch' in sys.modules, rc)")
    out = subprocess.run([sys.executable, "-c", code, str(data)], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "False 0", out.stderr


def test_data_stats_and_inspect_say_how_the_file_was_read(tmp_path, capsys):
    import json

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi.", "output": "Hi!", "response": "Hello!"}) + "\n")
    line = "format: alpaca (detected) — instruction → user, output → assistant; ignored fields: response"
    assert main(["data", "stats", str(data), "--template", "tulu"]) == 0
    out = capsys.readouterr().out
    assert line in out and "response differs from output in 1 of the 1 records" in out
    assert main(["data", "stats", str(data), "--template", "tulu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["data_format"]["text"] == line
    assert main(["inspect", str(data), "--template", "tulu", "--color", "never"]) == 0
    assert line in capsys.readouterr().err


def test_eval_of_a_mistyped_run_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for spec in ("run_1", "runs/run_1"):
        assert main(["eval", spec]) == 2
        assert f"no such run directory or model: {spec}" in capsys.readouterr().err


def test_eval_of_a_run_without_held_out_data_says_how_to_get_the_gap(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "config.yaml").write_text("data: train.jsonl\neval_data: null\n")
    main(["eval", str(run), "--no-loss"])  # the empty final/ then fails to load: the note comes first
    err = capsys.readouterr().err
    assert "no held-out data, so no train/held-out gap" in err and "--data HELDOUT.jsonl" in err


def test_train_says_what_it_understood_and_stores_it(tmp_path, capsys):
    """Issue 12: format + mapping, system prompt and weight warnings in train's output and in the run directory."""
    import json

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {i}.", "output": f"{i}", "response": "x"}) + "\n"
                            for i in range(4)))
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--model", "random:tiny", "--max-steps", "1", "--no-progress",
                 "--output-dir", str(out), "--eval-train-sample", "0", "--loss", "weighted", "--prompt-weight", "2",
                 "--system-prompt", "none", "--max-length", "128"]) == 0
    err = capsys.readouterr().err
    assert "format: alpaca (detected) — instruction → user, output → assistant; ignored fields: response" in err
    assert "system prompt: none (--system-prompt none)" in err and "warning: class weight(s) above 1" in err
    assert "max_steps: 1" in err and "lora_r:" not in err  # only the fields set are printed (log less)
    assert "Loading weights" not in err
    stats = json.loads((out / "data_stats.json").read_text())
    assert stats["data_format"]["ignored_fields"] == ["response"]
    assert stats["system_prompt"]["mode"] == "none" and stats["system_prompt"]["tokens_each"] == 5
    assert (out / "chat_template.jinja").read_text().startswith("{%- if messages and messages[0]['role'] != 'system'")
    assert "system_prompt: none" in (out / "config.yaml").read_text()


# ----------------------------------------------------------------------------------------------------------------
# Flags as a newcomer types them (issue 26 item 5)

def _settings(words: str, argv: list[str]):
    from imtune.cli import build_parser

    args = build_parser(words).parse_args(argv)
    return importlib.import_module(args._module).settings_from(args)


def test_a_flag_prefix_is_not_taken_for_the_flag_and_a_mistake_is_one_line(capsys):
    assert_exit = pytest.raises(SystemExit)
    with assert_exit:
        main(["compare", "--data", "x.jsonl", "--max-step", "3"])  # argparse used to take it as --max-steps
    err = capsys.readouterr().err
    assert "unrecognized arguments: --max-step; did you mean --max-steps?" in err
    assert "imtune compare --help lists the options" in err and "usage:" not in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit):
        main(["compare", "--data", "x.jsonl", "--seed", "0,1"])
    assert "give several seeds with --seeds 0,1" in capsys.readouterr().err


def test_list_flags_take_commas_or_spaces_and_modes_any_case():
    s = _settings("compare", ["--data", "d.jsonl", "--arms", "IT,", "IM", "Weighted:0.1", "--seeds", "0", "1,2"])
    assert [a.spec for a in s.arms] == ["it", "im", "weighted:0.1"] and s.seeds == [0, 1, 2]
    sw = _settings("sweep", ["--data", "d.jsonl", "--prompt-weights", "0.1", "0.5"])  # was "0.5: config not found"
    assert sw.prompt_weights == ["0.1", "0.5"]
    from imtune.cli import build_parser

    assert build_parser("train").parse_args(["--loss", "IM"]).loss == "im"


def test_compare_and_train_take_the_data_file_positionally(tmp_path, capsys):
    s = _settings("compare", ["mydata.json", "--model", "random:tiny"])
    assert s.base.data == "mydata.json"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: from-config.jsonl\nmax_step: 3\n")
    with pytest.raises(UsageError, match="did you mean 'max_steps' for 'max_step'"):
        _settings("compare", [str(cfg)])  # a .yaml stays a config
    with pytest.raises(UsageError, match="given twice"):
        _settings("compare", ["a.jsonl", "--data", "b.jsonl"])


def test_help_shows_each_default_once_and_never_none(capsys):
    for words in ("compare", "train", "sweep", "study"):
        p = build_parser(words)
        assert "(default: None)" not in p.format_help()
        fmt = p._get_formatter()
        for action in p._actions:
            assert (fmt._get_help_string(action) or "").count("(default:") <= 1, (words, action.dest)
