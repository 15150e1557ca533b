"""Dataset statistics: will Instruction Modelling help on this data?

    conversations ─▶ measure ─▶ Lengths (per example) ─▶ summarize ─▶ the stats object ─▶ recommend

Two units:
- `tokens` (default): ONE tokenisation of each rendered conversation (tokenize.encode, the same pass training
  uses); instruction = tokens of class system/user, output = tokens of class assistant. End-of-turn and template
  tokens are not content and count in neither (they do count in the sequence length).
- `words` (the paper's Table 5 convention): whitespace-separated words of each message rendered as
  `"<|role|>\\n" + content`, summed per example; instruction = system + user messages, output = assistant messages.

Per length: mean, population std, median, mode (the smallest of the most common values), p90 (linear
interpolation, numpy's default) and max. `ratio` = mean instruction / mean output in `unit` (the paper's
instruction/output ratio), `inverse_ratio` its inverse, and `ratio_words` the ratio in words whatever the unit:
`recommend` reads that one, because its thresholds come from the paper's word counts (units shift the ratio: code
outputs take more tokens per word, so Code Alpaca's ratio is 0.65 in words but 0.42 in SmolLM2 tokens).
`supervised_share[mode]` = the share of predicted tokens (positions 1..n-1, the ones a label exists for) with
weight > 0 under loss mode `it`, `im` or `all`; in tokens whenever a tokenizer is given, else in words (role tags
as template) — `share_unit` says which.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from imtune import files
from imtune.analysis.advice import recommend
from imtune.analysis.findings import Scan, format_findings
from imtune.data.load import stream_conversations
from imtune.data.templates import Renderer
from imtune.data.tokenize import Encoded, content_policy, encode
from imtune.data.weights import LOSS_MODES
from imtune.types import CLASS_ID, CLASSES, ROLES, Conversation, DataError, Problem, UsageError

UNITS = ("tokens", "words")
STAT_KEYS = ("mean", "std", "median", "mode", "p90", "max")
SHARE_MODES = ("it", "im", "all")

CHUNK = 4096  # conversations measured per batch: memory stays bounded whatever the size of the data


@dataclass(frozen=True)
class Lengths:
    """Per-example measurements, before summarizing. `class_counts[i, c]`: predicted tokens (or words) of example i in
    class CLASSES[c], used for supervised shares; `sequence`: tokens per rendered example (None without tokenizer);
    `words[i]`: instruction and output words (the paper's convention, whatever the unit); `roles[i, r]`: messages of
    role ROLES[r]. Held as numpy arrays (a few bytes per example), never as Python objects per token."""

    unit: str
    instruction: np.ndarray
    output: np.ndarray
    class_counts: np.ndarray
    share_unit: str
    sequence: np.ndarray | None = None
    words: np.ndarray | None = None  # [K, 2] int64
    roles: np.ndarray | None = None  # [K, len(ROLES)] int32

    @staticmethod
    def concat(parts: list[Lengths]) -> Lengths:
        first = parts[0]
        cat = lambda name: (None if getattr(first, name) is None  # noqa: E731
                            else np.concatenate([getattr(p, name) for p in parts]))
        return Lengths(first.unit, cat("instruction"), cat("output"), cat("class_counts"), first.share_unit,
                       cat("sequence"), cat("words"), cat("roles"))


def _words(conv: Conversation) -> tuple[int, int, list[int]]:
    """Instruction words, output words (paper convention) and the per-class word counts (tags = template). Plain
    Python ints: this runs once per record (a numpy array per record cost 0.5 ms each, minutes on a million)."""
    ins = out = 0
    counts = [0] * len(CLASSES)
    for m in conv.messages:
        n = len(f"<|{m.role}|>\n{m.content}".split())
        if m.role == "assistant":
            out += n
        else:
            ins += n
        content = len(m.content.split())
        counts[CLASS_ID[m.role]] += content
        counts[CLASS_ID["template"]] += n - content
    return ins, out, counts


def _tokens(conversations: list[Conversation], tokenizer, renderer,
            special_tokens_in_content: str = "split") -> tuple[Encoded, list[Problem]]:
    """One batched tokenisation (tokenize.encode, as training does) and the examples whose content spells a control
    token."""
    renderer = renderer or Renderer(None, tokenizer)
    rendered = [renderer.render(c) for c in conversations]
    split, specials = content_policy(rendered, tokenizer, special_tokens_in_content)
    return encode(rendered, tokenizer, split), specials


def _counts(enc: Encoded) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per example: class counts over all tokens, class counts over predicted tokens, sequence length."""
    n, k = len(enc.lengths), len(CLASSES)
    example = np.repeat(np.arange(n), enc.lengths)
    every = np.bincount(example * k + enc.classes, minlength=n * k).reshape(n, k)
    predicted_mask = np.ones(len(example), dtype=bool)
    predicted_mask[enc.bounds[:-1][enc.lengths > 0]] = False  # nothing predicts an example's first token
    predicted = np.bincount(example[predicted_mask] * k + enc.classes[predicted_mask], minlength=n * k).reshape(n, k)
    return every, predicted, enc.lengths.copy()


def measure_chunk(conversations: list[Conversation], tokenizer=None, renderer=None, unit: str = "tokens",
                  special_tokens_in_content: str = "split", encoded: Encoded | None = None) -> tuple[Lengths,
                                                                                                      list[Problem]]:
    """One batch of conversations -> their Lengths, and the ones whose content spells a control token. `encoded`:
    their tokenisation, already made (imtune.experiments.data measures what it prepares): not tokenized again."""
    w = [_words(c) for c in conversations]
    words = np.array([x[:2] for x in w], dtype=np.int64).reshape(-1, 2)
    roles = np.array([[sum(m.role == r for m in c.messages) for r in ROLES] for c in conversations],
                     dtype=np.int32).reshape(-1, len(ROLES))
    if tokenizer is None and encoded is None:
        counts = np.array([x[2] for x in w], dtype=np.int64).reshape(-1, len(CLASSES))
        return Lengths(unit, words[:, 0], words[:, 1], counts, "words", None, words, roles), []
    specials = []
    if encoded is None:
        encoded, specials = _tokens(conversations, tokenizer, renderer, special_tokens_in_content)
    every, predicted, sequence = _counts(encoded)
    if unit == "words":
        instruction, output = words[:, 0], words[:, 1]
    else:
        instruction = every[:, CLASS_ID["system"]] + every[:, CLASS_ID["user"]]
        output = every[:, CLASS_ID["assistant"]]
    return Lengths(unit, instruction, output, predicted, "tokens", sequence, words, roles), specials


def chunks(items: Iterable, size: int = CHUNK) -> Iterator[list]:
    """Consecutive lists of `size` items of any iterable (a list or a stream)."""
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


def measure(conversations: Iterable[Conversation], tokenizer=None, renderer=None, unit: str = "tokens",
            special_tokens_in_content: str = "split") -> Lengths:
    """Conversations (a list or a stream) -> per-example lengths in `unit` (tokens need a tokenizer; words use one, if
    given, for shares). Measured CHUNK conversations at a time, so memory does not grow with the data's size."""
    check_unit(unit, tokenizer)
    parts = [measure_chunk(batch, tokenizer, renderer, unit, special_tokens_in_content)[0]
             for batch in chunks(conversations)]
    if not parts:
        raise DataError("no conversations to measure")
    return Lengths.concat(parts)


def check_unit(unit: str, tokenizer) -> None:
    if unit not in UNITS:
        raise UsageError(f"unknown unit {unit!r}; valid: {', '.join(UNITS)}")
    if tokenizer is None and unit == "tokens":
        raise UsageError("unit tokens needs a tokenizer (or use unit words)")


def summarize(values) -> dict:
    """mean, population std, median, mode (smallest most common), p90 (linear interpolation), max."""
    v = np.asarray(values, dtype=np.float64)
    uniq, counts = np.unique(v, return_counts=True)
    as_num = lambda x: int(x) if float(x).is_integer() else float(x)  # noqa: E731 - counts print as integers
    return {"mean": float(v.mean()), "std": float(v.std()), "median": float(np.median(v)),
            "mode": as_num(uniq[np.argmax(counts)]), "p90": float(np.percentile(v, 90)), "max": as_num(v.max())}


def supervised_share(class_counts: np.ndarray) -> dict[str, float]:
    """Share of predicted tokens (or words) with weight > 0 under each of it, im, all."""
    total = class_counts.sum()
    out = {}
    for mode in SHARE_MODES:
        carries = np.array([LOSS_MODES[mode][c] > 0 for c in CLASSES])
        out[mode] = float(class_counts[:, carries].sum() / total) if total else 0.0
    return out


def dataset_stats(conversations: Iterable[Conversation], tokenizer=None, renderer=None, unit: str = "tokens",
                  max_length: int | None = None, encoded: Encoded | None = None) -> dict:
    """The stats object (what `imtune data stats --json` prints for one file and the run directory saves).
    `encoded`: the conversations' tokenisation (one row each, in order), already made: measured, not made again."""
    if max_length is not None and tokenizer is None:
        raise UsageError("max_length is in tokens: pass a tokenizer")
    if tokenizer is not None and renderer is None:
        renderer = Renderer(None, tokenizer)  # the tokenizer's own chat template, else tulu (as everywhere)
    if encoded is None:
        lengths = measure(conversations, tokenizer, renderer, unit)
    else:
        convs = list(conversations)
        if len(convs) != len(encoded.lengths) or not convs:
            raise ValueError(f"dataset_stats: {len(convs)} conversations, {len(encoded.lengths)} encoded")
        lengths = Lengths.concat([measure_chunk(convs[a:a + CHUNK], tokenizer, renderer, unit,
                                                encoded=encoded.rows(a, a + CHUNK))[0]
                                  for a in range(0, len(convs), CHUNK)])
    return stats_from_lengths(lengths, max_length, getattr(renderer, "name", None))


def stats_from_lengths(lengths: Lengths, max_length: int | None = None, template: str | None = None) -> dict:
    n_asst = lengths.roles[:, ROLES.index("assistant")]
    roles = dict(zip(ROLES, lengths.roles.sum(axis=0).tolist()))
    ins, out = summarize(lengths.instruction), summarize(lengths.output)
    words = lengths.words.sum(axis=0)  # the rule's unit, whatever `unit` is
    share = supervised_share(lengths.class_counts)
    stats = {
        "n_examples": len(lengths.instruction),
        "n_turns": int(n_asst.sum()),  # assistant turns
        "multi_turn_share": float((n_asst > 1).mean()),
        "roles": {r: n for r, n in roles.items() if n},
        "unit": lengths.unit,
        "instruction": ins,
        "output": out,
        "ratio": ins["mean"] / out["mean"] if out["mean"] else None,
        "inverse_ratio": out["mean"] / ins["mean"] if ins["mean"] else None,
        "ratio_words": float(words[0] / words[1]) if words[1] else None,
        "supervised_share": share,
        "share_unit": lengths.share_unit,
        "im_over_it": share["im"] / share["it"] if share["it"] else None,
        "sequence_tokens": summarize(lengths.sequence) if lengths.sequence is not None else None,
        "template": template,
        "max_length": None,
    }
    if max_length is not None and lengths.sequence is not None:
        over = lengths.sequence > max_length
        stats["max_length"] = {"limit": max_length, "over": int(over.sum()), "over_share": float(over.mean()),
                               "tokens_beyond": int((lengths.sequence - max_length)[over].sum())}
    stats["recommendation"] = recommend(stats)
    return stats


def analyse(spec: str, tokenizer=None, renderer=None, unit: str = "tokens", format: str = "auto",
            fields: dict | None = None, on_invalid: str = "error", max_length: int | None = None,
            special_tokens_in_content: str = "split",
            roles: dict | None = None) -> tuple[dict, Lengths, list[Problem]]:
    """A data file as it is -> (the stats object with its `findings`, the Lengths, records that could not be read).

    Streams the file CHUNK records at a time (bounded memory: a million records stay well under 2 GB). Every parsable
    record counts, empty outputs included (quality problems are findings, imtune.analysis.findings, not refusals); a
    record
    that cannot be parsed at all is still an error (on_invalid="error") or skipped and returned. The stats also say
    how the file was read (`data_format`: format, field mapping, ignored fields) and, with a renderer, what its
    system prompt costs (`system_prompt`). roles: extra role spellings (formats.parse_roles)."""
    check_unit(unit, tokenizer)
    stream = stream_conversations(spec, format, fields, on_invalid, allow_empty=True, roles=roles)
    scan, parts = Scan(), []
    n_conversations = n_without_system = 0  # for the system prompt's share
    for batch in chunks(stream):
        n_conversations += len(batch)
        n_without_system += sum(1 for c in batch if not c.messages or c.messages[0].role != "system")
        batch = [c for c in batch if not scan.too_long(c)]
        if not batch:
            continue
        lengths, specials = measure_chunk(batch, tokenizer, renderer, unit, special_tokens_in_content)
        scan.add(batch, specials)
        parts.append(lengths)
    if not parts:
        raise DataError(f"{spec}: no record to measure")
    lengths = Lengths.concat(parts)
    stats = stats_from_lengths(lengths, max_length, getattr(renderer, "name", None))
    stats["findings"] = scan.result()
    stats["format"] = stream.format
    stats["data_format"] = stream.understood().as_dict()
    if renderer is not None:
        total = int(lengths.sequence.sum()) if lengths.sequence is not None else 0
        stats["system_prompt"] = renderer.system_note_counts(n_without_system, n_conversations, total)
    return stats, lengths, stream.skipped


# ----------------------------------------------------------------------------------------------------------------
# Text output

def _num(x, digits: int = 2) -> str:
    if x is None:
        return "-"
    return f"{x:,}" if isinstance(x, int) else f"{x:,.{digits}f}"


def format_one(stats: dict, name: str) -> str:
    s = stats
    lines = [f"{name}: {s['n_examples']:,} examples, {s['n_turns']:,} assistant turns "
             f"({s['multi_turn_share']:.1%} multi-turn), roles: "
             + ", ".join(f"{r} {n:,}" for r, n in s["roles"].items())
             + (f"   [template: {s['template']}]" if s.get("template") else "")]
    head = f"  {'length (' + s['unit'] + ')':<20}" + "".join(f"{k:>10}" for k in STAT_KEYS)
    lines.append(head)
    for part in ("instruction", "output") + (("sequence_tokens",) if s.get("sequence_tokens") else ()):
        label = "sequence (tokens)" if part == "sequence_tokens" else part
        lines.append(f"  {label:<20}" + "".join(f"{_num(s[part][k]):>10}" for k in STAT_KEYS))
    inv = f" (output/instruction {_num(s['inverse_ratio'])})" if s.get("inverse_ratio") is not None else ""
    words = f"; in words {_num(s['ratio_words'], 4)}" if s["unit"] != "words" and s.get("ratio_words") else ""
    lines.append(f"  instruction/output ratio {_num(s['ratio'], 4)}{inv}{words}")
    sh = s["supervised_share"]
    gain = f"; IM trains on x{s['im_over_it']:.2f} the {s['share_unit']} of IT" if s.get("im_over_it") else ""
    lines.append(f"  {s['share_unit']} carrying loss: it {sh['it']:.1%}   im {sh['im']:.1%}   all {sh['all']:.1%}"
                 + gain)
    ml = s.get("max_length")
    if ml:
        fate = ("truncated" if ml.get("truncation") == "truncate"
                else "dropped (or truncated, with --truncation truncate)")
        lines.append(f"  --max-length {ml['limit']:,}: {ml['over']:,} examples ({ml['over_share']:.1%}) are longer "
                     f"({ml['tokens_beyond']:,} tokens beyond it): training would see them {fate}")
    if s.get("findings") is not None:
        lines += format_findings(s["findings"])
    rec = s["recommendation"]
    lam = f" (prompt weight {rec['prompt_weight']})" if rec["prompt_weight"] is not None else ""
    lines.append(f"  recommendation (advice, not a guarantee): --loss {rec['mode']}{lam}")
    lines += [f"    - {r}" for r in rec["reasons"]]
    return "\n".join(lines)


def format_table(rows: list[tuple[str, dict]]) -> str:
    """Several datasets side by side: one row each."""
    unit = rows[0][1]["unit"]
    cols = ["file", "N", f"instr mean ({unit})", "instr std", f"out mean ({unit})", "out std", "ratio", "it %",
            "im %", "over max-len", "advice"]
    body = []
    for name, s in rows:
        rec = s["recommendation"]
        ml = s.get("max_length")
        body.append([name, f"{s['n_examples']:,}", _num(s["instruction"]["mean"]), _num(s["instruction"]["std"]),
                     _num(s["output"]["mean"]), _num(s["output"]["std"]), _num(s["ratio"], 4),
                     f"{s['supervised_share']['it']:.1%}", f"{s['supervised_share']['im']:.1%}",
                     f"{ml['over']:,}" if ml else "-",
                     rec["mode"] + (f" λ={rec['prompt_weight']}" if rec["prompt_weight"] is not None else "")])
    width = [max(len(c), *(len(r[i]) for r in body)) for i, c in enumerate(cols)]
    fmt = lambda r: "  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(r, width)))  # noqa
    return "\n".join([fmt(cols), fmt(["-" * w for w in width]), *map(fmt, body)])


# ----------------------------------------------------------------------------------------------------------------
# Plots

def plot(lengths: Lengths, out_dir: str | Path, name: str) -> list[Path]:
    """`<name>.lengths.png` (histograms of instruction and output lengths, log-x when they span > 2 decades) and
    `<name>.scatter.png` (instruction vs output length per example, log-log, with the lines ratio = 1 and the
    dataset's ratio of means). Zero lengths are drawn at 1 on log axes."""
    from matplotlib.figure import Figure  # the object API: no pyplot state, renders with Agg

    out = files.make_dirs(out_dir)
    ins, outp = lengths.instruction.astype(float), lengths.output.astype(float)
    unit = lengths.unit
    fig = Figure(figsize=(11, 4), layout="constrained")
    for ax, v, label, color in zip(fig.subplots(1, 2), (ins, outp), ("instruction", "output"), ("C0", "C1")):
        pos = np.maximum(v, 1)
        log = pos.max() / max(np.percentile(pos, 5), 1) > 100
        bins = np.geomspace(pos.min(), pos.max() * 1.01, 40) if log else 40
        ax.hist(pos if log else v, bins=bins, color=color, alpha=0.85)
        if log:
            ax.set_xscale("log")
        ax.axvline(v.mean(), color="k", ls="--", lw=1, label=f"mean {v.mean():.1f}")
        ax.axvline(np.median(v), color="k", ls=":", lw=1, label=f"median {np.median(v):.1f}")
        ax.set(xlabel=f"{label} length ({unit}{', log scale' if log else ''})", ylabel="examples",
               title=f"{name}: {label} length (N={len(v):,})")
        ax.legend()
    p1 = files.save_figure(fig, out / f"{name}.lengths.png", out, dpi=110)

    fig = Figure(figsize=(6, 5.5), layout="constrained")
    ax = fig.subplots()
    x, y = np.maximum(outp, 1), np.maximum(ins, 1)
    ax.scatter(x, y, s=6, alpha=0.4, edgecolors="none")
    ax.set_xscale("log")
    ax.set_yscale("log")
    lim = np.array([1, max(x.max(), y.max()) * 1.2])
    ax.plot(lim, lim, "k-", lw=0.8, label="instruction = output")
    ratio = ins.mean() / outp.mean() if outp.mean() else None
    if ratio:
        ax.plot(lim, lim * ratio, "r--", lw=0.8, label=f"ratio of means {ratio:.3g}")
    ax.set(xlim=lim, ylim=lim, xlabel=f"output length ({unit}, log)", ylabel=f"instruction length ({unit}, log)",
           title=f"{name}: instruction vs output per example")
    ax.legend(loc="upper left")
    p2 = files.save_figure(fig, out / f"{name}.scatter.png", out, dpi=110)
    return [p1, p2]
