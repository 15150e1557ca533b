"""`imtune eval RUN|MODEL --data F`: per-class loss, the train/held-out gap, generations and BLEU-to-train.

Loss: mean NLL and perplexity per token class on --data (held-out) and on the training data (--train-data; for a
run directory, the `data` of RUN/config.yaml), and the gap held-out − train (the paper's overfitting measure: IM
keeps the output gap small). A run's own data is read exactly as training read it, and scored with its template,
system prompt, max length and truncation (imtune.evaluate.run.evaluate_run); flags override each. --generate:
answers for the prompts of --data (else the training data), saved as JSONL. --bleu-train: greedy answers for
training prompts scored by BLEU against the training outputs (memorisation).

Results go to RUN/eval/ for a run directory, or to --out DIR: eval-<data>.json and eval-<data>.md, plus
generations-<data>.jsonl and bleu-train-<data>.jsonl. --json OUT writes the same JSON anywhere."""
from __future__ import annotations

import re
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

from imtune import files
from imtune.commands.common import add_data_args, add_system_prompt_arg, add_template_args, fields_from, roles_from
from imtune.console import say
from imtune.rundir.read import RunDir, find_run
from imtune.types import CLASSES, UsageError

if TYPE_CHECKING:
    from imtune.evaluate.run import DataSet, Scoring

ROWS = [("output", "output (assistant+eot)"), ("instruction", "instruction (user+system)")] + \
       [(c, f"  {c}") for c in CLASSES] + [("all", "all tokens")]


def add_arguments(p) -> None:
    p.add_argument("model_pos", nargs="?", metavar="RUN|MODEL", default=None,
                   help="run directory, model directory, hub id, 'default' or 'random:<size>' (or use --model)")
    p.add_argument("--model", default=None, help="same as the positional RUN|MODEL")
    p.add_argument("--data", default=None,
                   help="held-out data, any format `imtune inspect` reads (default for a run: its eval_data); "
                        "read as --format/--field/--role say, else (for a run) as the run read its data; "
                        "--template, --system-prompt, --max-length, --truncation default to the run's too")
    p.add_argument("--train-data", default=None,
                   help="the training data (default for a run directory: `data` in RUN/config.yaml)")
    add_data_args(p, positional=False)
    add_template_args(p)
    add_system_prompt_arg(p)
    p.set_defaults(system_prompt=None)  # None: the run's own (else the template's default)
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per example (default: the run's max_length, else no limit)")
    p.add_argument("--truncation", choices=["drop", "truncate"], default=None,
                   help="over-long examples: score their first --max-length tokens, or leave them out (counted); "
                        "default: the run's setting, else truncate")
    p.add_argument("--limit", type=int, default=None, help="first N conversations of each data set")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", default=None, metavar="OUT", help="also write the results JSON here")
    p.add_argument("--out", default=None, metavar="DIR", help="output directory (default: RUN/eval for a run)")
    p.add_argument("--no-loss", action="store_true", help="skip the loss evaluation (only --generate/--bleu-train)")
    g = p.add_argument_group("generation")
    g.add_argument("--generate", action="store_true", help="generate answers for the prompts of --data")
    g.add_argument("--bleu-train", action="store_true",
                   help="memorisation: BLEU of greedy answers to training prompts against the training outputs")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy (--bleu-train is always greedy)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")


def _slug(data: str) -> str:
    name = Path(data.split(":", 1)[1] if data.startswith("hf:") else data).name
    for ext in (".gz", ".jsonl", ".json", ".parquet", ".csv", ".tsv"):
        name = name[: -len(ext)] if name.endswith(ext) else name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "data"


def _fmt(x, digits: int = 4) -> str:
    if x is None:
        return "–"
    return f"{x:.{digits}f}" if abs(x) < 1e5 else f"{x:.3g}"


def loss_table(columns: list[tuple[str, dict]], gap: dict | None) -> tuple[list[str], list[list[str]]]:
    """Header and rows: per class/group, tokens, NLL and perplexity for each data set (+ the gap)."""
    header = ["tokens"]
    for title, _ in columns:
        header += [f"{title} tokens", f"{title} NLL", f"{title} ppl"]
    header = ["class"] + header[1:] + (["gap (held-out − train)"] if gap else [])
    rows = []
    for key, label in ROWS:
        row = [label]
        for _, res in columns:
            s = res[key] if key in res else res["per_class"][key]
            row += [str(s["tokens"]), _fmt(s["nll"]), _fmt(s["ppl"], 2)]
        if gap:
            row.append(_fmt(gap[key] if key in gap else gap["per_class"][key], 4))
        rows.append(row)
    return header, rows


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def md_table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *("| " + " | ".join(c.strip() if i else c.replace("  ", "&nbsp;&nbsp;") for i, c in
                                          enumerate(r)) + " |" for r in rows)])


# ---------------------------------------------------------------------------------------------------------------
def run(args) -> int:
    from imtune.commands.serve import pick_device
    from imtune.evaluate.run import evaluate_run
    from imtune.model.models import load_model, load_tokenizer, resolve

    spec = model_spec(args)
    run = find_run(spec)
    train, heldout = data_sets(args, run)
    out_dir, root = check_request(args, run, train, heldout)
    scoring = scoring_of(args, run)
    tok = load_tokenizer(spec)
    renderer = scoring.renderer(tok)
    model = load_model(spec).to(pick_device(args.device))
    say(f"imtune eval: model {spec} ({resolve(spec).path or 'random init'}), template {renderer.name}, "
        f"max length {scoring.max_length or 'none'}, device {next(model.parameters()).device}")
    ev = evaluate_run(run, model, tok, train=train, heldout=heldout, scoring=scoring, batch_size=args.batch_size,
                      loss=not args.no_loss, progress=True, log=lambda m: say(f"imtune eval: {m}"))
    result: dict = {"model": spec, "template": ev.template, "max_length": scoring.max_length,
                    "truncation": scoring.truncation, "limit": args.limit}
    for key, side in (("train", ev.train), ("heldout", ev.heldout)):
        if side is not None and side.loss is not None:
            result[key] = {"data": side.data.label, **side.loss}
    if ev.gap is not None:
        result["gap"] = ev.gap
        if Path(train.label).resolve() == Path(heldout.label).resolve():
            say("imtune eval: note: --data is the training data, so the gap is 0 by construction")
    if out_dir and root == out_dir:
        files.claim(out_dir, "eval")
    elif out_dir:
        files.make_dirs(out_dir, root)
    generate(args, spec, ev, model, tok, renderer, out_dir, root, result)
    write_results(result, out_dir, root, args.json, _slug((heldout or train).label))
    return 0


def model_spec(args) -> str:
    if args.model_pos and args.model and args.model_pos != args.model:
        raise UsageError(f"two models given: {args.model_pos!r} and --model {args.model!r}")
    spec = args.model_pos or args.model or "default"
    from imtune.model.models import resolve

    resolve(spec)  # a mistyped run directory is "no such run directory", before anything else is asked for
    return spec


def data_sets(args, run: RunDir | None) -> tuple[DataSet | None, DataSet | None]:
    """(train, held-out): --train-data / --data as the flags read them; without them, a run's own data (its `data`
    and `eval_data`) read exactly as training read it (imtune.evaluate.run)."""
    from imtune.evaluate.run import DataSet, heldout_data, training_data  # the stage loads torch (~4 s): here, so
    # that `imtune eval --help` stays fast

    given = reading_of(args, run)
    train = DataSet(args.train_data, **given) if args.train_data else training_data(run, args.limit) if run else None
    heldout = DataSet(args.data, **given) if args.data else heldout_data(run, args.limit) if run else None
    return train, heldout


def reading_of(args, run: RunDir | None) -> dict:
    """How --data / --train-data records become conversations: the flags, else (for a run) the run's own reading."""
    c = run.config if run else None
    return {"format": args.format if args.format != "auto" or c is None else c.format,
            "fields": fields_from(args) or (dict(c.fields) if c else {}),
            "roles": roles_from(args) or (dict(c.roles) if c else {}),
            "on_invalid": args.on_invalid if args.on_invalid != "error" or c is None else c.on_invalid,
            "limit": args.limit}


def scoring_of(args, run: RunDir | None) -> Scoring:
    """Template, system prompt, max length and truncation: the flags, else the run's (else no limit, truncate)."""
    from imtune.evaluate.run import Scoring, scoring_as_trained  # the stage loads torch: see data_sets

    base = scoring_as_trained(run) if run else Scoring()
    return replace(base, template=args.template or base.template,
                   system_prompt=args.system_prompt or base.system_prompt,
                   max_length=args.max_length or base.max_length, truncation=args.truncation or base.truncation)


def check_request(args, run: RunDir | None, train: DataSet | None, heldout: DataSet | None
                  ) -> tuple[Path | None, Path | None]:
    """Refuse what cannot be done before loading anything; returns the output directory (None: print only) and the
    imtune directory it lies in (the run for RUN/eval; --out DIR itself, claimed as an "eval" directory)."""
    if heldout is None and train is None:
        raise UsageError("nothing to evaluate: give --data F (held-out) and/or --train-data T")
    if run and heldout is None:
        say("imtune eval: no held-out data, so no train/held-out gap (the overfitting measure): pass --data "
            "HELDOUT.jsonl, or train with --eval-data HELDOUT.jsonl (the run remembers it); "
            "`imtune compare` splits one off by itself")
    if args.bleu_train and train is None:
        raise UsageError("--bleu-train needs the training data: --train-data T (or a run directory)")
    out_dir = Path(args.out) if args.out else (run.path / "eval" if run else None)
    if args.generate and out_dir is None:
        raise UsageError("--generate writes JSONL: give --out DIR (a run directory writes to RUN/eval)")
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise UsageError("--batch-size and --limit must be >= 1")
    if args.json:
        files.check_target(args.json)
    if out_dir is None:
        return None, None
    if args.out:
        files.check_claim(out_dir, "eval")
        return out_dir, out_dir
    return out_dir, files.owned(run.path, "run")


def generate(args, spec: str, ev, model, tok, renderer, out_dir: Path | None, root: Path | None, result: dict
             ) -> None:
    """--generate: answers for the held-out prompts (else the training prompts), saved as JSONL; --bleu-train:
    memorisation BLEU of greedy answers to the training prompts against the training outputs."""
    from imtune.evaluate.bleu import generation_rows, memorisation_bleu
    from imtune.model.generate import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                           batch_size=args.batch_size, seed=args.seed)
    if args.generate:
        side = ev.heldout or ev.train
        say(f"imtune eval: generating for {len(side.conversations)} prompts of {side.data.label}")
        rows = generation_rows(model, tok, renderer, list(side.conversations), cfg, progress=True)
        gen_path = out_dir / f"generations-{_slug(side.data.label)}.jsonl"
        files.write_jsonl(gen_path, [{**r, "generator": spec} for r in rows], root)
        result["generation"] = {"data": side.data.label, "n": len(rows), "path": str(gen_path), "config": asdict(cfg)}
        say(f"imtune eval: wrote {len(rows)} generations to {gen_path}")
    if args.bleu_train:
        say(f"imtune eval: memorisation BLEU on {len(ev.train.conversations)} training prompts (greedy)")
        mem = memorisation_bleu(model, tok, renderer, list(ev.train.conversations), None, cfg, progress=True)
        rows = mem.pop("rows")
        mem.pop("sentence_bleu")
        result["bleu_train"] = {"data": ev.train.data.label, **mem}
        if out_dir:
            p = out_dir / f"bleu-train-{_slug(ev.train.data.label)}.jsonl"
            files.write_jsonl(p, rows, root)
            result["bleu_train"]["path"] = str(p)


def write_results(result: dict, out_dir: Path | None, root: Path | None, json_path: str | None, slug: str) -> None:
    """Print the tables; write eval-<slug>.json and .md to the output directory, and the JSON to --json."""
    print(report_text(result))
    if out_dir:
        files.write_json(out_dir / f"eval-{slug}.json", result, root, indent=2)
        files.write_text(out_dir / f"eval-{slug}.md", markdown(result), root)
        say(f"imtune eval: wrote {out_dir / f'eval-{slug}.json'} and .md")
    if json_path:
        files.write_json(json_path, result, indent=2)


def _columns(result: dict) -> list[tuple[str, dict]]:
    return [(title, result[key]) for key, title in (("train", "train"), ("heldout", "held-out")) if key in result]


def report_text(result: dict) -> str:
    parts = []
    cols = _columns(result)
    if cols:
        for title, res in cols:
            parts.append(f"{title}: {res['data']} ({res['n']} examples, {res['tokens']} tokens)")
        parts.append(text_table(*loss_table(cols, result.get("gap"))))
    if "bleu_train" in result:
        b = result["bleu_train"]
        parts.append(f"memorisation (BLEU of greedy answers vs training outputs, n={b['n']}): corpus "
                     f"{_fmt(b['corpus_bleu'], 2)}, mean sentence {_fmt(b['sentence_bleu_mean'], 2)}")
    return "\n".join(parts)


def markdown(result: dict) -> str:
    from imtune.report.render import md_code

    lines = [f"# Evaluation of {md_code(result['model'])}", "",
             f"Template {md_code(result['template'])}, max length {result['max_length'] or 'none'}, "
             f"limit {result['limit'] or 'none'}. NLL is the mean per token (nats); ppl = exp(NLL).", ""]
    cols = _columns(result)
    if cols:
        for title, res in cols:
            lines.append(f"- {title}: {md_code(res['data'])} — {res['n']} examples, {res['tokens']} tokens")
        lines += ["", md_table(*loss_table(cols, result.get("gap"))), ""]
    if "generation" in result:
        g = result["generation"]
        lines += [f"Generations: {g['n']} answers for {md_code(g['data'])} in {md_code(g['path'])}.", ""]
    if "bleu_train" in result:
        b = result["bleu_train"]
        lines += ["## Memorisation (BLEU of greedy answers vs training outputs)", "",
                  "| n | corpus BLEU | mean sentence BLEU |", "|---|---|---|",
                  f"| {b['n']} | {_fmt(b['corpus_bleu'], 2)} | {_fmt(b['sentence_bleu_mean'], 2)} |", "",
                  f"sacrebleu {md_code(b['signature'])}", ""]
    return "\n".join(lines)
