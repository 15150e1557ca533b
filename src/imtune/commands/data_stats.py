"""`imtune data stats DATA [DATA...]`: lengths, instruction/output ratio, the share of tokens each loss mode trains
on, and advice on the loss mode (imtune.analysis.stats). One file: a detailed block; several: one row each, side by
side. `--json`: one file prints the stats object; several print a JSON list of them, in the order given, each with its
`path`. `--plot DIR` writes `<file stem>.lengths.png` and `<file stem>.scatter.png` per file.

Data is analysed as it is: empty outputs, duplicates, near-duplicate long prompts and content that spells control
tokens are findings (counted, first path:lines), not refusals (imtune.analysis.findings); only unparsable records are
errors (or skipped with --on-invalid skip). Files are streamed, so memory stays bounded on millions of records."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

from imtune.commands.common import (
    add_data_args,
    add_length_args,
    add_model_args,
    add_system_prompt_arg,
    add_template_args,
    fields_from,
    roles_from,
)
from imtune.console import say


def add_arguments(p) -> None:
    add_data_args(p, nargs="+")
    add_model_args(p)
    add_template_args(p)
    add_system_prompt_arg(p)
    p.add_argument("--unit", choices=["tokens", "words"], default="tokens",
                   help="tokens: counted from one tokenisation of the rendered text (what training sees); words: "
                        "the IM paper's convention (whitespace words of '<|role|>\\n' + content)")
    add_length_args(p)
    p.add_argument("--json", action="store_true", help="print JSON (an object for one file, a list for several)")
    p.add_argument("--plot", default=None, metavar="DIR", help="write length histograms and a scatter plot here")


def _plot_name(path: str, taken: set[str]) -> str:
    stem = Path(path).name.split(".")[0] or "data"
    name, k = stem, 2
    while name in taken:  # two files with the same stem keep both plots
        name, k = f"{stem}-{k}", k + 1
    taken.add(name)
    return name


def _block(text: str, stats: dict) -> str:
    """One file's report with how it was read (format, field mapping, ignored fields) under its first line."""
    d = stats["data_format"]
    head, _, rest = text.partition("\n")
    return "\n".join([head, f"  {d['text']}", *(f"    note: {n}" for n in d["notes"]),
                      f"  {stats['system_prompt']['line']}", rest])


def next_step(stats: dict, args) -> str:
    """The `imtune compare` that would test this file's advice: the advised arm against the other (IT against IM,
    plus the advised weighted:λ), three seeds, the same model and template; sized for a first look on a CPU."""
    rec, path = stats["recommendation"], stats["path"]
    arms = f"it,im,weighted:{rec['prompt_weight']:g}" if rec["mode"] == "weighted" else "it,im"
    flags = [f"--model {shlex.quote(args.model)}"] + ([f"--template {shlex.quote(args.template)}"]
                                                      if args.template else [])
    n = stats["n_examples"]
    small = " --limit 512 --max-length 512" if n > 512 else ""
    return (f"  next: test this advice on your data (IT and IM trained alike, 3 seeds, intervals; a GPU makes it "
            f"minutes):\n    imtune compare {shlex.quote(path)} --arms {arms} --seeds 0,1,2 {' '.join(flags)}{small}"
            + (f"\n    ({n:,} examples: --limit 512 keeps a CPU run to a first look; drop it on a GPU)"
               if small else ""))


def run(args) -> int:
    from imtune.analysis.stats import analyse, format_one, format_table, plot
    from imtune.data.templates import Renderer
    from imtune.model.models import load_tokenizer
    from imtune.types import UsageError

    if args.max_length is not None and args.max_length < 1:
        raise UsageError("--max-length must be >= 1")
    if args.plot:
        from imtune import files

        files.check_claim(args.plot, "plots")  # a new or empty directory, or one imtune made for plots
    tok = load_tokenizer(args.model)
    renderer = Renderer(args.template, tok, args.system_prompt)
    fields, roles = fields_from(args), roles_from(args)
    results, taken = [], set()
    for path in args.data:
        stats, lengths, skipped = analyse(path, tok, renderer, args.unit, args.format, fields, args.on_invalid,
                                          args.max_length, args.special_tokens_in_content, roles)
        if skipped:
            say(f"{path}: {len(skipped)} unreadable records skipped (first: {skipped[0]})")
        stats = {"path": str(path), **stats, "skipped": len(skipped)}
        if args.max_length is not None:
            stats["max_length"]["truncation"] = args.truncation
        results.append(stats)
        if args.plot:
            from imtune import files

            files.claim(args.plot, "plots")
            for f in plot(lengths, args.plot, _plot_name(path, taken)):
                say(f"wrote {f}")
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else results, indent=2))
        return 0
    if len(results) > 1:
        print(format_table([(Path(s["path"]).name, s) for s in results]))
        print()
    print("\n\n".join(_block(format_one(s, s["path"]), s) + "\n" + next_step(s, args) for s in results))
    return 0
