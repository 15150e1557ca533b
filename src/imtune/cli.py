"""The `imtune` command: argument parsing and dispatch only.

Each command lives in imtune/commands/<name>.py with `add_arguments(parser)` and `run(args) -> int`; only the command
being run is imported. User mistakes print `imtune: ...` (or `path:line: ...`), never a traceback. `imtune help
[COMMAND]`, `imtune --version`, `imtune data --help` (a group's subcommands) and "did you mean" for a mistyped
command help people find their way."""
from __future__ import annotations

import argparse
import difflib
import importlib
import os
import shlex
import sys

from imtune import __doc__ as PACKAGE_DOC, __version__, files
from imtune.report import checks
from imtune.types import DataError, UsageError

# command (words) -> (module, one-line help). A dict literal: the whole CLI map at a glance.
COMMANDS: dict[str, tuple[str, str]] = {
    "inspect": ("imtune.commands.inspect", "show which tokens carry loss and with what weight"),
    "models prepare": ("imtune.commands.models", "convert the embedded default model to safetensors (once)"),
    "train": ("imtune.commands.train", "train one run: config + data -> run directory (checkpoints, metrics, final/)"),
    "eval": ("imtune.commands.eval", "per-class loss, train/held-out gap, generations and BLEU-to-train"),
    "bench": ("imtune.commands.bench", "benchmarks: gsm8k, humaneval, bbh (offline) and lm-eval tasks (harness)"),
    "judge": ("imtune.commands.judge", "pairwise LLM-judge win rate against reference outputs (AlpacaEval-style)"),
    "serve": ("imtune.commands.serve", "OpenAI-compatible chat-completions server on 127.0.0.1"),
    "data stats": ("imtune.commands.data_stats", "lengths, instruction/output ratio, supervised shares, loss advice"),
    "data synth": ("imtune.commands.data_synth",
                   "synthetic controlled tasks (long instructions, short checkable outputs)"),
    "compare": ("imtune.commands.compare",
                "train loss arms (it, im, weighted:λ, +neftune, +kl) alike, evaluate, report"),
    "sweep": ("imtune.commands.sweep", "prompt-loss weight finder: weighted:λ arms x seeds, intervals, a λ"),
    "study": ("imtune.commands.study", "IM − IT against instruction/output ratio or data size, with a trend"),
    "demo": ("imtune.commands.demo", "offline example: IT vs IM on the default model and synthetic data, with report"),
}


START = ("first steps on your own file:\n"
         "  imtune data stats FILE             what is in it, and which loss mode suits it\n"
         "  imtune inspect FILE                which tokens learn, and what the format was read as\n"
         "  imtune compare --data FILE         train IT vs IM alike, evaluate, write a report")


def _usage(group: str | None = None) -> str:
    """The command list (of one group: `imtune data --help`), with the package's one-line description."""
    shown = {w: h for w, (_, h) in COMMANDS.items() if group is None or w.split()[0] == group}
    width = max(len(w) for w in shown)
    lines = [f"  {w:<{width}}  {h}" for w, h in shown.items()]
    if group:
        return (f"usage: imtune {group} SUBCOMMAND [options]   (imtune {group} SUBCOMMAND --help for its options)"
                "\n\nsubcommands:\n" + "\n".join(lines))
    return ("usage: imtune COMMAND [options]   (imtune COMMAND --help, or imtune help COMMAND, for its options)\n\n"
            + PACKAGE_DOC.strip().splitlines()[0] + "\n\ncommands:\n" + "\n".join(lines) + "\n\n" + START
            + "\n\nimtune --version prints the version.")


GROUPS = {w.split()[0] for w in COMMANDS if " " in w}  # first words of two-word commands: data, models


def _find_command(argv: list[str]) -> str | None:
    """The longest registered command the arguments start with ('data stats' before 'data')."""
    for n in (2, 1):
        words = " ".join(argv[:n])
        if len(argv) >= n and words in COMMANDS:
            return words
    return None


def suggest(argv: list[str]) -> str | None:
    """The command a mistyped one probably meant: `stats` -> `data stats` (a subcommand typed without its group),
    `trian` -> `train`, `data stat` -> `data stats` (difflib)."""
    if not argv:
        return None
    by_last = {w.split()[-1]: w for w in COMMANDS if " " in w}
    if argv[0] in by_last:
        return by_last[argv[0]]
    for typed in dict.fromkeys([" ".join(argv[:2]), argv[0]]):  # `model prepare` as two words, `trian` as one
        close = difflib.get_close_matches(typed, list(COMMANDS), n=1, cutoff=0.6)
        if close:
            return close[0]
    return None


def _unknown(argv: list[str]) -> int:
    group = argv[0] if argv[0] in GROUPS else None
    print(_usage(group), file=sys.stderr)
    typed = " ".join(argv[:2]) if group and len(argv) > 1 and not argv[1].startswith("-") else argv[0]
    guess = suggest(argv)
    hint = f"; did you mean `imtune {guess}`?" if guess else ""
    print(f"\nimtune: unknown command {typed!r}{hint}", file=sys.stderr)
    return 2


def _help(topic: list[str]) -> int:
    """`imtune help` (the command list), `imtune help data` (a group), `imtune help data stats` (its options)."""
    words = _find_command(topic)
    if words is not None:
        print(build_parser(words).format_help())
        return 0
    if not topic or topic[0] in GROUPS and len(topic) == 1:
        print(_usage(topic[0] if topic else None))
        return 0
    return _unknown(topic)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's formatter extension point: a default is shown once, and only when it says something (never
    "(default: None)", never after a help text that already names its default)."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser(words: str) -> argparse.ArgumentParser:
    """The parser of one command. Only that command's module is imported: `imtune --help` and every command stay
    fast, and one command's heavy imports never slow another. No prefix matching (`--max-step` is not
    `--max-steps`), and a mistake is one line with a did-you-mean and the --help hint, not a usage dump."""
    module, help_ = COMMANDS[words]
    p = argparse.ArgumentParser(prog=f"imtune {words}", description=help_, formatter_class=HelpFormatter,
                                allow_abbrev=False)
    p.set_defaults(_module=module)
    importlib.import_module(module).add_arguments(p)
    p.error = lambda message: _flag_error(p, words, message)  # type: ignore[method-assign]
    return p


def _flag_error(p: argparse.ArgumentParser, words: str, message: str):
    """One line: what is wrong, the flag probably meant, and where the options are listed; exits 2 as argparse does."""
    hint = ""
    flags = [o for o in p._option_string_actions if o.startswith("--")]
    if message.startswith("unrecognized arguments:"):
        typed = [a.split("=", 1)[0] for a in message.split(":", 1)[1].split() if a.startswith("-")]
        guesses = [g for t in typed for g in difflib.get_close_matches(t, flags, n=1, cutoff=0.6)]
        if guesses:
            hint = f"; did you mean {', '.join(guesses)}?"
    elif message.startswith("argument --seed:") and "," in message and "--seeds" in flags:
        hint = "; --seed takes one number: give several seeds with --seeds 0,1"
    print(f"imtune {words}: {message}{hint} (imtune {words} --help lists the options)", file=sys.stderr)
    sys.exit(2)


RESUMABLE = ("compare", "sweep", "study")  # the same command again continues where Ctrl-C stopped it

INPUTS = ("data", "eval_data", "val_data", "train_data", "references")  # flags naming files a command only reads


def inputs_of(args) -> list[str]:
    """The files named by a command's input flags (imtune.files.protecting keeps every write off them)."""
    found = []
    for name in INPUTS:
        value = getattr(args, name, None)
        found += value if isinstance(value, list) else [value] if value else []
    return found


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["--version"], ["-V"]):
        print(f"imtune {__version__}")
        return 0
    if argv[:1] == ["help"]:
        return _help(argv[1:])
    words = _find_command(argv)
    if words is None:
        asks_help = len(argv) in (1, 2) and argv[-1] in ("-h", "--help") and (len(argv) == 1 or argv[0] in GROUPS)
        if asks_help:  # imtune --help, imtune data --help
            print(_usage(argv[0] if len(argv) == 2 else None))
            return 0
        if not argv or argv[0] in GROUPS and len(argv) == 1:  # imtune, imtune data: the list, and a failure
            print(_usage(argv[0] if argv else None), file=sys.stderr)
            return 2
        return _unknown(argv)
    args = build_parser(words).parse_args(argv[len(words.split()):])
    args._argv = ["imtune", *argv]  # the command as typed: compare.json records it, the reports' next steps edit it
    try:
        with files.protecting(*inputs_of(args)):  # no command writes over a file it was given to read
            return int(importlib.import_module(args._module).run(args) or 0)
    except DataError as e:
        print(e.render(), file=sys.stderr)
        if getattr(args, "on_invalid", None) == "error" and e.problems and hasattr(e.problems[0], "where") \
                and not e.hint:
            print("imtune: fix these records, or pass --on-invalid skip to train on the valid ones",
                  file=sys.stderr)
        return 2
    except UsageError as e:
        print(f"imtune: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C; compare, sweep and study say what was kept (types.Interrupted)
        print("imtune: interrupted", file=sys.stderr)
        for line in getattr(e, "lines", []):
            print(f"  {line}", file=sys.stderr)
        if words in RESUMABLE:
            print(f"to continue (finished runs are kept, a run in progress resumes from its newest checkpoint), run "
                  f"the same command again (in {os.getcwd()}):\n  {shlex.join(['imtune', *argv])}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())


checks.register_parser(build_parser)  # the report's next steps are command lines this parser reads
