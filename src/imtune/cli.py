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
    "train": ("imtune.commands.train", "train one run: config + data -> run directory (checkpoints, metrics, final/)"),
    "eval": ("imtune.commands.eval", "per-class loss, train/held-out gap, generations and BLEU-to-train"),
    "bench": ("imtune.commands.bench", "benchmarks: gsm8k, humaneval, bbh (offline) and lm-eval tasks (harness)"),
    "judge": ("imtune.commands.judge", "pairwise LLM-judge win rate against reference outputs (AlpacaEval-style)"),
    "serve": ("imtune.commands.serve", "OpenAI-compatible chat-completions server on 127.0.0.1"),
    "data stats": ("imtune.commands.data_stats", "lengths, instruction/output ratio, supervised shares, loss advice"),
    "data synth": ("imtune.commands.data_synth", "synthetic controlled tasks (long instructions, short checkable outputs)"),
    "compare": ("imtune.commands.compare", "train loss arms (it, im, weighted:λ, +neftune, +kl) alike, evaluate, report"),
    "sweep": ("imtune.commands.sweep", "prompt-loss weight finder: weighted:λ arms x seeds, intervals, a λ"),
    "study": ("imtune.commands.study", "IM − IT against instruction/output ratio or data size, with a trend"),
    "demo": ("imtune.commands.demo", "offline example: IT vs IM on the default model and synthetic data, with report"),
}


def _usage() -> str:
    width = max(len(w) for w in COMMANDS)
    lines = [f"  {w:<{width}}  {h}" for w, (_, h) in COMMANDS.items()]
    return ("usage: imtune COMMAND [options]   (imtune COMMAND --help for its options)\n\n"
            + __doc__.splitlines()[0] + "\n\ncommands:\n" + "\n".join(lines))


def _find_command(argv: list[str]) -> str | None:
    """The longest registered command the arguments start with ('data stats' before 'data')."""
    for n in (2, 1):
        words = " ".join(argv[:n])
        if len(argv) >= n and words in COMMANDS:
            return words
    return None


def build_parser(words: str) -> argparse.ArgumentParser:
    """The parser of one command. Only that command's module is imported: `imtune --help` and every command stay
    fast, and one command's heavy imports never slow another."""
    module, help_ = COMMANDS[words]
    p = argparse.ArgumentParser(prog=f"imtune {words}", description=help_,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.set_defaults(_module=module)
    importlib.import_module(module).add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    words = _find_command(argv)
    if words is None:
        print(_usage(), file=sys.stdout if argv[:1] in (["-h"], ["--help"]) else sys.stderr)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nimtune: unknown command {' '.join(argv[:2])!r}", file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    args = build_parser(words).parse_args(argv[len(words.split()):])
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
