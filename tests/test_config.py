"""imtune.config: each TrainConfig field's help is written once, on the field; the library does not import the CLI."""
from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

from imtune.config import TrainConfig, add_train_arguments, field_help


def test_building_the_train_flags_imports_nothing_from_the_cli_layer():
    code = ("import argparse, sys; from imtune.config import add_train_arguments; "
            "add_train_arguments(argparse.ArgumentParser()); "
            "print(sorted(m for m in sys.modules if m.startswith('imtune.commands')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_field_is_a_flag_whose_help_is_the_fields():
    p = argparse.ArgumentParser()
    add_train_arguments(p)
    by_dest = {a.dest: a for a in p._actions}
    for f in dataclasses.fields(TrainConfig):
        action = by_dest[{"fields": "field", "roles": "role"}.get(f.name, f.name)]
        assert f.metadata["help"] and action.help.startswith(f.metadata["help"]), f.name


def test_commands_sharing_a_flag_print_the_fields_help():
    from imtune.commands import common

    p = argparse.ArgumentParser()
    for add in (common.add_model_args, common.add_template_args, common.add_system_prompt_arg, common.add_loss_args,
                common.add_length_args):
        add(p)
    common.add_data_args(p, positional=False)
    helps = {a.dest: a.help for a in p._actions}
    for dest, name in {"model": "model", "template": "template", "system_prompt": "system_prompt", "loss": "loss",
                       "prompt_weight": "prompt_weight", "weights": "weights", "last_turn_only": "last_turn_only",
                       "max_length": "max_length", "truncation": "truncation", "format": "format",
                       "field": "fields", "role": "roles", "on_invalid": "on_invalid",
                       "special_tokens_in_content": "special_tokens_in_content"}.items():
        assert helps[dest] == field_help(name), dest


def test_field_alternatives_in_yaml_and_on_the_command_line_are_one_setting(tmp_path):
    """`fields: {output: [output, response]}`, `output|response` in YAML and `--field output=output|response` give
    the same config (so a re-run with either is the same run); a single key stays a string."""
    from imtune.cli import build_parser
    from imtune.types import UsageError

    want = {"output": ["output", "response"], "instruction": "question"}
    for body in ("fields: {output: [output, response], instruction: question}\n",
                 "fields: {output: 'output|response', instruction: question}\n"):
        (tmp_path / "c.yaml").write_text("data: d.jsonl\n" + body)
        assert TrainConfig.from_yaml(tmp_path / "c.yaml").fields == want
    args = build_parser("train").parse_args(["d.jsonl", "--field", "output=output|response",
                                             "--field", "instruction=question"])
    cfg = TrainConfig.from_args(args)
    assert cfg.fields == want
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # config.yaml round trip
    (tmp_path / "c.yaml").write_text("data: d.jsonl\nfields: {ouput: response}\n")
    try:
        TrainConfig.from_yaml(tmp_path / "c.yaml")
    except UsageError as e:
        assert "did you mean 'output'" in str(e)
    else:
        raise AssertionError("an unknown canonical field was accepted")
