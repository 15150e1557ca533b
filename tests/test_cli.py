"""The command map: every registered command imports, builds its parser and has a run(); help and unknown commands."""
from __future__ import annotations

import importlib

import pytest

from imtune.cli import COMMANDS, build_parser, main


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
