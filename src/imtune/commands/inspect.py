"""`imtune inspect DATA`: which tokens learn. Tokens are shown in the rendered text, coloured by weight:
green = weight 1, yellow = between 0 and 1, magenta = above 1, dim = no weight; without colour, [text] is weight 1
and [text|w] any other weight, so a weight of 2 is never drawn like 1.
`--jsonl OUT` writes one row per example: index, input_ids, weights, classes."""
from __future__ import annotations

import os
import sys

from imtune.commands.common import (
    add_data_args,
    add_length_args,
    add_loss_args,
    add_model_args,
    add_system_prompt_arg,
    add_template_args,
    fields_from,
    loss_spec_from,
    roles_from,
)
from imtune.console import say
from imtune.data.tokenize import token_offsets
from imtune.data.weights import weight_warnings
from imtune.types import CLASSES

GREEN, YELLOW, MAGENTA, DIM, CYAN, RESET = ("\x1b[42;30m", "\x1b[43;30m", "\x1b[45;30m", "\x1b[2m", "\x1b[36m",
                                            "\x1b[0m")


def add_arguments(p) -> None:
    add_data_args(p)
    add_model_args(p)
    add_template_args(p)
    add_system_prompt_arg(p)
    add_loss_args(p)
    add_length_args(p)
    p.add_argument("--limit", type=int, default=3, help="examples to show (0: all; --jsonl writes all when 0)")
    p.add_argument("--jsonl", default=None, metavar="OUT", help="write index, input_ids, weights, classes per example")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    p.add_argument("--tokens", action="store_true", help="mark token boundaries with │")


def _use_color(mode: str) -> bool:
    if mode == "always":
        return True
    return mode == "auto" and sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def show(ex, rendered, tokenizer, color: bool, boundaries: bool, policy: str = "split") -> str:
    """The rendered text with runs of equally weighted tokens coloured (or, without colour, bracketed) by weight."""
    ids, offsets = token_offsets(rendered, tokenizer, policy)
    ids, offsets = ids[: len(ex.input_ids)], offsets[: len(ex.input_ids)]
    assert ids == ex.input_ids.tolist(), "token ids differ from imtune's tokenisation of the rendered text (a bug)"
    end = offsets[-1][1] if ex.truncated else len(rendered.text)
    starts = [s for s, _ in offsets] + [end]
    runs: list[tuple[float, str]] = []  # (weight, text) of consecutive tokens with the same weight
    for i, w in enumerate(ex.weights.tolist()):
        piece = rendered.text[starts[i]:max(starts[i], starts[i + 1])] + ("│" if boundaries else "")
        if runs and runs[-1][0] == w:
            runs[-1] = (w, runs[-1][1] + piece)
        else:
            runs.append((w, piece))
    out = []
    for w, text in runs:
        text = text.replace("\n", "↵\n")
        if color:
            style = GREEN if w == 1 else MAGENTA if w > 1 else YELLOW if w > 0 else DIM
            out.append(style + text.replace("\n", RESET + "\n" + style) + RESET)
        else:  # a weight other than 0 or 1 is always written out: 2 is never drawn like 1
            out.append(text if w == 0 else f"[{text}]" if w == 1 else f"[{text}|{w:g}]")
    return "".join(out)


def summary(ex) -> str:
    per = {c: [0, 0.0] for c in CLASSES}
    for c, w in zip(ex.classes[1:].tolist(), ex.weights[1:].tolist()):  # token 0 is never predicted
        per[CLASSES[c]][0] += 1
        per[CLASSES[c]][1] += w
    parts = [f"{c}: {n} tok, weight {s:g}" for c, (n, s) in per.items() if n]
    return f"{len(ex.input_ids)} tokens; " + "; ".join(parts)


def run(args) -> int:
    from imtune import files
    from imtune.data.prepare import DataSpec, prepare_examples
    from imtune.model.models import load_tokenizer

    if args.jsonl:
        files.check_target(args.jsonl)  # before any work: never over the data (imtune.cli protects it) or a link
    tok = load_tokenizer(args.model)
    spec = loss_spec_from(args)
    for w in weight_warnings(spec):
        say(w)
    limit = None if (args.limit == 0 or args.jsonl) else args.limit
    prep = prepare_examples(args.data, tok, spec, DataSpec.of(args, fields=fields_from(args), roles=roles_from(args),
                                                              limit=limit))
    color = _use_color(args.color)
    by_source = {c.source: c for c in prep.conversations}
    for line in prep.notes():
        say(line)
    say(f"template: {prep.renderer.name}; loss: {spec.describe()}; {prep.summary()}")
    for p in prep.load_skipped[:20]:
        say(f"skipped: {p}")
    shown = prep.examples if args.limit == 0 else prep.examples[: args.limit]
    others = sorted({w for ex in shown for w in ex.weights.tolist()} - {0.0, 1.0})
    values = ", ".join(f"{w:g}" for w in others)
    legend = (f"{GREEN}weight 1{RESET} {YELLOW}weight between 0 and 1{RESET} {MAGENTA}weight above 1{RESET} "
              f"{DIM}no weight{RESET}" if color else "[weight 1] [other weight|w] no weight")
    if others:
        legend += f" (weights other than 0 and 1 here: {values})"
    print(legend)
    for ex in shown:
        print(f"{CYAN if color else ''}── example {ex.source.index} ({ex.source}) ── {summary(ex)}"
              f"{RESET if color else ''}")
        rendered = prep.renderer.render(by_source[ex.source])
        print(show(ex, rendered, tok, color, args.tokens, args.special_tokens_in_content))
    if args.jsonl:
        files.write_jsonl(args.jsonl, ({"index": ex.source.index, "input_ids": ex.input_ids.tolist(),
                                        "weights": ex.weights.tolist(),
                                        "classes": [CLASSES[c] for c in ex.classes.tolist()]} for ex in prep.examples))
        say(f"wrote {len(prep.examples)} rows to {args.jsonl}")
    return 0
