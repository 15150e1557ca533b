"""The `imtune` command: argument parsing and dispatch only. Each command lives in imtune/commands/<name>.py with
`add_arguments(parser)` and `run(args) -> int`. User mistakes print `imtune: ...` (or `path:line: ...`), never a
traceback."""
from __future__ import annotations

import argparse
import importlib
import sys

from .types import DataError, UsageError

# command (words) -> (module, one-line help). A dict literal: the whole CLI map at a glance.
COMMANDS: dict[str, tuple[str, str]] = {
    "inspect": ("imtune.commands.inspect", "show which tokens carry loss and with what weight"),
    "models prepare": ("imtune.commands.models", "convert the embedded default model to safetensors (once)"),
    "eval": ("imtune.commands.eval", "per-class loss, train/held-out gap, generations and BLEU-to-train"),
    "judge": ("imtune.commands.judge", "pairwise LLM-judge win rate against reference outputs (AlpacaEval-style)"),
    "serve": ("imtune.commands.serve", "OpenAI-compatible chat-completions server on 127.0.0.1"),
    "data stats": ("imtune.commands.data_stats", "lengths, instruction/output ratio, supervised shares, loss advice"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imtune", description=__doc__.splitlines()[0])
    top = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for words, (module, help_) in COMMANDS.items():
        *group, name = words.split()
        sub = top
        if group:
            if group[0] not in groups:
                g = top.add_parser(group[0], help=f"{group[0]} commands")
                groups[group[0]] = g.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
            sub = groups[group[0]]
        p = sub.add_parser(name, help=help_, description=help_,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except DataError as e:
        print(e.render(), file=sys.stderr)
        if getattr(args, "on_invalid", None) == "error" and e.problems and hasattr(e.problems[0], "where"):
            print("imtune: fix these records, or pass --on-invalid skip to train on the valid ones",
                  file=sys.stderr)
        return 2
    except UsageError as e:
        print(f"imtune: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("imtune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
