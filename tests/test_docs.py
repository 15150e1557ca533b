"""The README and docs/ show commands that work: every `imtune` command in their ```bash blocks parses with the real
CLI parser (the command exists, every flag exists, every value has the right type), and the README's own example
block runs end to end on `random:tiny` (models swapped, /tmp paths moved into the test's directory)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from conftest import ROOT, SHARED

PAGES = [ROOT / "README.md", ROOT / "EVIDENCE.md", *sorted((ROOT / "docs").glob("*.md"))]


def bash_lines(text: str) -> list[str]:
    """The shell lines of every ```bash block, continuation lines joined."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        out += [ln.strip() for ln in block.replace("\\\n", " ").splitlines() if ln.strip()]
    return out


def imtune_argv(line: str) -> list[str] | None:
    """The arguments after `imtune` (`.venv/bin/imtune`, `python -m imtune`, `-m imtune.cli`) of one shell line, or
    None when the line runs something else. Comments, a trailing `&` and everything after a pipe are dropped."""
    words = shlex.split(line, comments=True)
    for i, w in enumerate(words):
        if w.endswith("/imtune") or w == "imtune" or (w == "imtune.cli" and words[i - 1] == "-m"):
            rest = words[i + 1:]
            for j, r in enumerate(rest):
                if r in ("&", "|", "&&", ";", ">", "2>&1"):
                    return rest[:j]
            return rest
    return None


def commands_of(page: Path) -> list[list[str]]:
    return [a for a in map(imtune_argv, bash_lines(page.read_text(encoding="utf-8"))) if a]


def test_every_documented_command_parses():
    from imtune.cli import COMMANDS, build_parser

    seen = 0
    for page in PAGES:
        for argv in commands_of(page):
            words = next((w for w in sorted(COMMANDS, key=len, reverse=True)
                          if argv[:len(w.split())] == w.split()), None)
            assert words is not None, f"{page.name}: `imtune {' '.join(argv)}`: no such command"
            try:
                build_parser(words).parse_args(argv[len(words.split()):])
            except SystemExit as e:
                pytest.fail(f"{page.name}: `imtune {' '.join(argv)}` does not parse (exit {e.code})")
            seen += 1
    assert seen >= 40, f"only {seen} commands found in README.md and docs/: the extraction is broken"


def test_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    for page in re.findall(r"docs/[\w.-]+\.md", text):  # every page it points to exists
        assert (ROOT / page).exists(), page


def test_readme_example_block_runs_on_random_tiny(tmp_path, monkeypatch, capsys):
    """The README's block of one example per command, in order (synth writes what compare, sweep and study read),
    on random:tiny: each exits 0."""
    if not SHARED.exists():
        pytest.skip(f"{SHARED} is absent: the README's examples read the shared data")
    from imtune.cli import main

    monkeypatch.chdir(tmp_path)
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = next(b for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S) if "imtune compare" in b
                 and "imtune bench" in b)
    ran, swap = [], {"../shared/data": str(SHARED), "/tmp": str(tmp_path)}
    for line in bash_lines("```bash\n" + block + "```"):
        argv = [re.sub(r"^(\.\./shared/data|/tmp)", lambda m: swap[m.group(1)], a) for a in imtune_argv(line)]
        argv = ["random:tiny" if a == "default" and argv[i - 1] == "--model" else a for i, a in enumerate(argv)]
        if argv[0] == "train":  # LIMA's records are longer than random:tiny's test budget: its first 256 tokens
            argv += ["--output-dir", str(tmp_path / "run"), "--max-length", "256", "--truncation", "truncate",
                     "--limit", "16"]
        assert main(argv) == 0, f"`imtune {' '.join(argv)}` failed:\n{capsys.readouterr().err[-2000:]}"
        ran.append(argv[0])
    assert ran == ["inspect", "data", "data", "train", "compare", "sweep", "study", "eval", "bench"]
