"""`imtune eval RUN|MODEL --data F`: per-class loss, the train/held-out gap, generations and BLEU-to-train.

Loss: mean NLL and perplexity per token class on --data (held-out) and on the training data (--train-data; for a
run directory, the `data` of RUN/config.yaml), and the gap held-out − train (the paper's overfitting measure: IM
keeps the output gap small). --generate: answers for the prompts of --data (else the training data), saved as
JSONL. --bleu-train: greedy answers for training prompts scored by BLEU against the training outputs (memorisation).

Results go to RUN/eval/ for a run directory, or to --out DIR: eval-<data>.json and eval-<data>.md, plus
generations-<data>.jsonl and bleu-train-<data>.jsonl. --json OUT writes the same JSON anywhere."""
from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

from ..runlog import say
from ..types import CLASSES, UsageError
from .common import add_data_args, add_system_prompt_arg, add_template_args, fields_from, roles_from

ROWS = [("output", "output (assistant+eot)"), ("instruction", "instruction (user+system)")] + \
       [(c, f"  {c}") for c in CLASSES] + [("all", "all tokens")]


def add_arguments(p) -> None:
    p.add_argument("model_pos", nargs="?", metavar="RUN|MODEL", default=None,
                   help="run directory, model directory, hub id, 'default' or 'random:<size>' (or use --model)")
    p.add_argument("--model", default=None, help="same as the positional RUN|MODEL")
    p.add_argument("--data", default=None,
                   help="held-out data, any format `imtune inspect` reads (default for a run: its eval_data)")
    p.add_argument("--train-data", default=None,
                   help="the training data (default for a run directory: `data` in RUN/config.yaml)")
    add_data_args(p, positional=False)
    add_template_args(p)
    add_system_prompt_arg(p)
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


# ---------------------------------------------------------------------------------------------------------------
def run_dir_of(spec: str) -> Path | None:
    """The run directory a model spec names (RUN or RUN/final), or None."""
    p = Path(spec).expanduser()
    if (p / "final").is_dir() and (p / "config.yaml").is_file():
        return p
    if p.name == "final" and p.is_dir() and (p.parent / "config.yaml").is_file():
        return p.parent
    return None


def run_settings(run: Path) -> dict:
    """What eval takes from RUN/config.yaml (imtune.config.TrainConfig): the training data and how it was read
    (data, format, fields, on_invalid, limit, max_length, truncation) and the held-out data (eval_data)."""
    import yaml

    try:
        cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"{run / 'config.yaml'}: not valid YAML: {e}") from None
    if not isinstance(cfg, dict):
        raise UsageError(f"{run / 'config.yaml'}: expected a mapping of config keys")
    out = {k: cfg.get(k) for k in ("data", "eval_data", "format", "fields", "on_invalid", "limit", "max_length",
                                   "truncation", "roles")}
    for k in ("data", "eval_data"):  # a path relative to the run directory, if it is not one relative to here
        if isinstance(out[k], str) and out[k] and not Path(out[k]).exists() and (run / out[k]).exists():
            out[k] = str(run / out[k])
    return out


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
    from ..evaluate.bleu import generation_rows, memorisation_bleu
    from ..evaluate.loss import evaluate_loss, gap as loss_gap
    from ..generate import GenerationConfig
    from ..models import load_model, load_tokenizer, resolve
    from ..prepare import load
    from ..templates import Renderer
    from .serve import pick_device

    if args.model_pos and args.model and args.model_pos != args.model:
        raise UsageError(f"two models given: {args.model_pos!r} and --model {args.model!r}")
    spec = args.model_pos or args.model or "default"
    resolve(spec)  # a mistyped run directory is "no such run directory", before anything else is asked for
    run_dir = run_dir_of(spec)
    settings = run_settings(run_dir) if run_dir else {}
    train_data = args.train_data or settings.get("data") or None
    heldout_data = args.data or settings.get("eval_data") or None
    if not heldout_data and not train_data:
        raise UsageError("nothing to evaluate: give --data F (held-out) and/or --train-data T")
    if run_dir and not heldout_data:
        say(f"imtune eval: no held-out data, so no train/held-out gap (the overfitting measure): pass --data "
            f"HELDOUT.jsonl, or train with --eval-data HELDOUT.jsonl (the run remembers it); "
            f"`imtune compare` splits one off by itself")
    if args.bleu_train and not train_data:
        raise UsageError("--bleu-train needs the training data: --train-data T (or a run directory)")
    out_dir = Path(args.out) if args.out else (run_dir / "eval" if run_dir else None)
    if args.generate and out_dir is None:
        raise UsageError("--generate writes JSONL: give --out DIR (a run directory writes to RUN/eval)")
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise UsageError("--batch-size and --limit must be >= 1")
    # A run's own data is read as it was read for training (format, fields, limit, max length, truncation), so the
    # train loss is over what the model trained on and the gap compares like with like.
    max_length = args.max_length or settings.get("max_length")
    truncation = args.truncation or settings.get("truncation") or "truncate"
    read = {"held-out": (args.format, fields_from(args) or None, args.on_invalid, args.limit,
                         roles_from(args) or settings.get("roles") or None)}
    if args.train_data or not run_dir:
        read["train"] = read["held-out"]
    else:
        limit = min([x for x in (args.limit, settings.get("limit")) if x] or [0]) or None
        read["train"] = (settings.get("format") or "auto", settings.get("fields") or None,
                         settings.get("on_invalid") or "error", limit, settings.get("roles") or None)

    tok = load_tokenizer(spec)
    renderer = Renderer(args.template, tok, args.system_prompt)
    model = load_model(spec).to(pick_device(args.device))
    say(f"imtune eval: model {spec} ({resolve(spec).path or 'random init'}), template {renderer.name}, "
        f"max length {max_length or 'none'}, device {next(model.parameters()).device}")
    sets = [(name, path) for name, path in (("train", train_data), ("held-out", heldout_data)) if path]
    result: dict = {"model": spec, "template": renderer.name, "max_length": max_length, "truncation": truncation,
                    "limit": args.limit}
    convs, skipped = {}, {}
    for name, path in sets:
        convs[name], skipped[name] = load(path, *read[name])
        if skipped[name]:
            say(f"imtune eval: {len(skipped[name])} invalid records of {path} skipped (--on-invalid skip)")

    if not args.no_loss:
        for name, path in sets:
            say(f"imtune eval: loss on {path} ({len(convs[name])} conversations)")
            res = evaluate_loss(model, tok, renderer, convs[name], max_length, args.batch_size,
                                truncation=truncation, progress=True)
            res["skipped"] = [str(p) for p in skipped[name]] + res["skipped"]
            result[name.replace("-", "")] = {"data": str(path), **res}
            if res["truncated"] or res["skipped"]:
                say(f"  {res['truncated']} truncated to {max_length} tokens, {len(res['skipped'])} left out")
        if "train" in result and "heldout" in result:
            result["gap"] = loss_gap(result["train"], result["heldout"])
            if Path(str(train_data)).resolve() == Path(str(heldout_data)).resolve():
                say("imtune eval: note: --data is the training data, so the gap is 0 by construction")

    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                           batch_size=args.batch_size, seed=args.seed)
    slug = _slug(str(heldout_data or train_data))
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    if args.generate:
        name, path = ("held-out", heldout_data) if heldout_data else ("train", train_data)
        say(f"imtune eval: generating for {len(convs[name])} prompts of {path}")
        rows = generation_rows(model, tok, renderer, convs[name], cfg, progress=True)
        gen_path = out_dir / f"generations-{_slug(str(path))}.jsonl"
        _write_jsonl(gen_path, [{**r, "generator": spec} for r in rows])
        result["generation"] = {"data": str(path), "n": len(rows), "path": str(gen_path), "config": asdict(cfg)}
        say(f"imtune eval: wrote {len(rows)} generations to {gen_path}")
    if args.bleu_train:
        say(f"imtune eval: memorisation BLEU on {len(convs['train'])} training prompts (greedy)")
        mem = memorisation_bleu(model, tok, renderer, convs["train"], None, cfg, progress=True)
        rows = mem.pop("rows")
        mem.pop("sentence_bleu")
        result["bleu_train"] = {"data": str(train_data), **mem}
        if out_dir:
            p = out_dir / f"bleu-train-{_slug(str(train_data))}.jsonl"
            _write_jsonl(p, rows)
            result["bleu_train"]["path"] = str(p)

    report = markdown(result)
    print(report_text(result))
    if out_dir:
        (out_dir / f"eval-{slug}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        (out_dir / f"eval-{slug}.md").write_text(report, encoding="utf-8")
        say(f"imtune eval: wrote {out_dir / f'eval-{slug}.json'} and .md")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


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
    lines = [f"# Evaluation of `{result['model']}`", "",
             f"Template `{result['template']}`, max length {result['max_length'] or 'none'}, "
             f"limit {result['limit'] or 'none'}. NLL is the mean per token (nats); ppl = exp(NLL).", ""]
    cols = _columns(result)
    if cols:
        for title, res in cols:
            lines.append(f"- {title}: `{res['data']}` — {res['n']} examples, {res['tokens']} tokens")
        lines += ["", md_table(*loss_table(cols, result.get("gap"))), ""]
    if "generation" in result:
        g = result["generation"]
        lines += [f"Generations: {g['n']} answers for `{g['data']}` in `{g['path']}`.", ""]
    if "bleu_train" in result:
        b = result["bleu_train"]
        lines += ["## Memorisation (BLEU of greedy answers vs training outputs)", "",
                  "| n | corpus BLEU | mean sentence BLEU |", "|---|---|---|",
                  f"| {b['n']} | {_fmt(b['corpus_bleu'], 2)} | {_fmt(b['sentence_bleu_mean'], 2)} |", "",
                  f"sacrebleu `{b['signature']}`", ""]
    return "\n".join(lines)
