"""`imtune judge --outputs A.jsonl --references B --judge-url URL --judge-model NAME`: AlpacaEval-style win rate.

Model outputs (JSONL or JSON array of {instruction or prompt, output}; `imtune eval --generate` writes them) are
matched to reference outputs on the instruction text (AlpacaEval 1.0 references:
../shared/data/eval/alpaca_eval/text_davinci_003_outputs.json) and each pair is judged twice, positions swapped,
by an OpenAI-compatible chat endpoint. Replies are cached (--cache), so a re-run sends no requests.

--generate --model M first writes M's answers to the reference instructions (to --outputs, default
<out>/alpaca_eval-outputs.jsonl), then judges them (or stops there without --judge-url).
Results: <out>/judge-<outputs>.json, .md and .jsonl (every pair with both replies); <out> defaults to RUN/eval
for a run directory given as --model, else the folder of --outputs when imtune made it (RUN/eval, or an `imtune
eval --out` directory); a --out DIR that exists must be one imtune made (imtune.files)."""
from __future__ import annotations

import os
from pathlib import Path

from imtune import files
from imtune.commands.common import add_template_args
from imtune.console import say
from imtune.types import UsageError


def add_arguments(p) -> None:
    p.add_argument("--outputs", default=None, help="model outputs: JSONL/JSON of {instruction or prompt, output}")
    p.add_argument("--references", required=True,
                   help="reference outputs, same shape, e.g. "
                        "../shared/data/eval/alpaca_eval/text_davinci_003_outputs.json (AlpacaEval 1.0)")
    p.add_argument("--judge-url", default=None,
                   help="OpenAI-compatible base URL: http://HOST:PORT, http://HOST:PORT/v1 or the full "
                        ".../chat/completions URL")
    p.add_argument("--judge-model", default=None, help="model name sent to the judge endpoint")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the API key (sent as a Bearer token when set, only over "
                        "https or to this machine)")
    p.add_argument("--judge-key-anywhere", action="store_true",
                   help="also send the API key over plain http to another machine (anyone on the way can read it)")
    p.add_argument("--cache", default=None,
                   help="SQLite file of judge replies (default: $IMTUNE_CACHE/judge-cache.sqlite; 'none': no cache)")
    p.add_argument("--limit", type=int, default=None, help="judge (and generate) only the first N references")
    p.add_argument("--max-tokens", type=int, default=100, help="reply length asked of the judge (AlpacaEval 1.0: 100)")
    p.add_argument("--workers", type=int, default=4, help="judge requests in flight at once")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds to wait for one judge reply (queueing at a busy server included)")
    p.add_argument("--out", default=None, metavar="DIR", help="where results go (see above)")
    g = p.add_argument_group("generating the model outputs first")
    g.add_argument("--generate", action="store_true", help="generate --model's answers to the reference instructions")
    g.add_argument("--model", default=None, help="model for --generate (run directory, directory, default, ...)")
    add_template_args(g)
    g.add_argument("--max-new-tokens", type=int, default=512)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--device", default="auto")


def output_dir(args, run) -> tuple[Path, Path]:
    """(where results go, the imtune directory it lies in), checked before anything is generated or judged."""
    from imtune.types import UsageError

    if args.out:
        files.check_claim(args.out, "eval")
        return Path(args.out), Path(args.out)
    if run is not None:
        return run.path / "eval", files.owned(run.path, "run")
    folder = Path(args.outputs).parent if args.outputs else Path(".")
    if files.marker(folder) == "eval":
        return folder, files.owned(folder, "eval")
    if folder.name == "eval" and files.marker(folder.parent) == "run":
        return folder, files.owned(folder.parent, "run")
    raise UsageError(f"{folder} is not a directory imtune made for results: give --out DIR (a new or empty "
                     "directory, or one imtune made)")


def _claim(args, out_dir: Path) -> None:
    """--out DIR becomes imtune's right before the first file goes into it (output_dir checked it at the start)."""
    if args.out:
        files.claim(out_dir, "eval")


def _generate(args, references: list[dict], out_dir: Path, root: Path) -> Path:
    from imtune.commands.serve import pick_device
    from imtune.data.templates import Renderer
    from imtune.evaluate.bleu import generation_rows
    from imtune.model.generate import GenerationConfig
    from imtune.model.models import load_model, load_tokenizer
    from imtune.types import Conversation, Message, Where

    tok = load_tokenizer(args.model)
    renderer = Renderer(args.template, tok)
    model = load_model(args.model).to(pick_device(args.device))
    refs = references[: args.limit] if args.limit else references
    convs = [Conversation((Message("user", r["instruction"]),), Where(args.references, i + 1, i))
             for i, r in enumerate(refs)]
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           batch_size=args.batch_size)
    say(f"imtune judge: generating {len(convs)} answers with {args.model} (template {renderer.name})")
    rows = generation_rows(model, tok, renderer, convs, cfg, progress=True)
    path = Path(args.outputs) if args.outputs else out_dir / "alpaca_eval-outputs.jsonl"
    files.write_jsonl(path, [{"instruction": r["instruction"], "output": r["output"], "generator": args.model}
                             for r in rows], root if not args.outputs else None)
    say(f"imtune judge: wrote {len(rows)} outputs to {path}")
    return path


def run(args) -> int:
    from imtune.evaluate.judge import JudgeCache, JudgeClient, chat_url, judge_pairs, markdown, pair_up, read_outputs
    from imtune.files import cache_dir
    from imtune.rundir.read import find_run

    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be >= 1")
    if args.generate and not args.model:
        raise UsageError("--generate needs --model M")
    if not args.generate and not args.outputs:
        raise UsageError("give --outputs A.jsonl (or --generate --model M to produce them)")
    if not args.generate and not args.judge_url:
        raise UsageError("give --judge-url URL (an OpenAI-compatible endpoint, e.g. one `imtune serve` prints)")
    if args.judge_url and not args.judge_model:
        raise UsageError("give --judge-model NAME (the model name the endpoint serves)")
    url = chat_url(args.judge_url) if args.judge_url else None
    client = JudgeClient(url, args.judge_model, os.environ.get(args.api_key_env) or None, args.max_tokens,
                         args.timeout, key_anywhere=args.judge_key_anywhere) if url else None  # first: a key refused
    run = find_run(args.model)
    out_dir, root = output_dir(args, run)
    if args.generate and args.outputs:
        files.check_target(args.outputs)
    references = read_outputs(args.references)
    if args.generate:
        _claim(args, out_dir)
    outputs_path = _generate(args, references, out_dir, root) if args.generate else Path(args.outputs)
    if url is None:
        return 0

    pairs, unmatched = pair_up(read_outputs(outputs_path), references, args.limit)
    if not pairs:
        raise UsageError(f"no output in {outputs_path} has an instruction found in {args.references}")
    if unmatched:
        say(f"imtune judge: {unmatched} outputs have no reference with the same instruction (left out)")
    cache_path = None if (args.cache or "").lower() == "none" else (args.cache or cache_dir() / "judge-cache.sqlite")
    cache = JudgeCache(cache_path)
    try:
        say(f"imtune judge: {len(pairs)} pairs x 2 orders, judge {args.judge_model} at {url}, cache {cache_path}")
        result = judge_pairs(pairs, client, cache, args.workers, progress=True)
    finally:
        cache.close()
    s = result["summary"]
    s.update({"outputs": str(outputs_path), "references": args.references, "unmatched_outputs": unmatched,
              "cache": str(cache_path) if cache_path else None})
    stem = outputs_path.name.rsplit(".", 1)[0]
    report = markdown(s, outputs_path.name, Path(args.references).name)
    _claim(args, out_dir)
    files.write_json(out_dir / f"judge-{stem}.json", s, root, indent=2)
    files.write_text(out_dir / f"judge-{stem}.md", report, root)
    files.write_jsonl(out_dir / f"judge-{stem}.jsonl", result["pairs"], root)
    print(report)
    say(f"imtune judge: {s['requests']} requests, {s['cache_hits']} cached; wrote {out_dir / f'judge-{stem}.json'}")
    return 0
