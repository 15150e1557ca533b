"""`imtune bench NAME`: offline benchmarks (gsm8k, humaneval, bbh) and lm-evaluation-harness tasks (harness).

    imtune bench gsm8k --model M --data ../shared/data/eval/gsm8k_test.jsonl [--shots 0|8] [--limit N]
    imtune bench bbh --model M --data ../shared/data/eval/bbh [--tasks a,b] [--cot] [--limit N]
    imtune bench humaneval --model M --data ../shared/data/eval/HumanEval.jsonl.gz [--n-samples N --temperature T]
    imtune bench NAME --samples S.jsonl --data PATH            score completions you already have
    imtune bench harness --model M --tasks mmlu,arc_challenge [--include-path DIR] [--num-fewshot K]
    imtune bench alpacaeval --model M --judge-url URL --judge-model J [--data PATH] [--limit N]
    imtune bench mtbench --model M --judge-url URL --judge-model J [--data DIR] [--limit N]

alpacaeval and mtbench find their data under $IMTUNE_DATA or ../shared/data when --data is not given.

A generation run writes LABEL.json, LABEL.samples.jsonl and LABEL.md into --out (default RUN/eval/ for a run
directory, else ./imtune-bench/NAME/); --json OUT also writes the result to OUT."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from imtune.commands.common import add_model_args, add_template_args
from imtune.console import say
from imtune.tasks import BENCHMARKS
from imtune.types import UsageError

# benchmark -> the flags (argparse dests) that become its Options fields
OPTION_FLAGS: dict[str, tuple[str, ...]] = {
    "gsm8k": ("shots",),
    "bbh": ("cot", "tasks", "prompts"),
    "humaneval": ("n_samples", "k", "timeout", "memory_mb", "workers", "unsafe_no_sandbox"),
    "harness": ("tasks", "include_path", "num_fewshot", "batch_size", "apply_chat_template"),
    "alpacaeval": ("judge_url", "judge_model", "judge_api_key_env", "judge_cache", "judge_workers", "judge_timeout",
                   "judge_max_tokens"),
    "mtbench": ("judge_url", "judge_model", "judge_api_key_env", "judge_cache", "judge_workers", "judge_timeout",
                   "judge_max_tokens"),
}
# where --data defaults to for these, under $IMTUNE_DATA or ../shared/data
DEFAULT_DATA = {"alpacaeval": "eval/alpaca_eval/text_davinci_003_outputs.json", "mtbench": "eval/mt_bench"}


def _names(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in _names(text))


def add_arguments(p) -> None:
    p.add_argument("name", choices=list(BENCHMARKS), help="the benchmark")
    source = p.add_mutually_exclusive_group()
    add_model_args(source, default=None)
    source.add_argument("--samples", default=None, metavar="S.jsonl",
                        help="score these completions instead of generating: rows {task_id, completion} "
                             "(humaneval) or {index, completion} (gsm8k; bbh also 'task')")
    p.add_argument("--data", default=None, help="the benchmark's data: a file, a folder (bbh) or "
                                                "hf:owner/name[/config][:split]; e.g. ../shared/data/eval/...")
    p.add_argument("--limit", type=int, default=None, help="first N examples (bbh, harness: per task)")
    add_template_args(p)
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: gsm8k 256, bbh 32 (--cot 512), humaneval 512")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    o = p.add_argument_group("output")
    o.add_argument("--json", default=None, metavar="OUT", help="write the result (JSON) to OUT")
    o.add_argument("--out", default=None, metavar="DIR",
                   help="folder for LABEL.json/.samples.jsonl/.md (default: RUN/eval for a run directory, "
                        "else imtune-bench/NAME)")
    b = p.add_argument_group("benchmark options")
    b.add_argument("--shots", type=int, default=8, help="gsm8k: chain-of-thought exemplars (0-8)")
    b.add_argument("--cot", action="store_true", help="bbh: 3-shot chain of thought (default: answer-only)")
    b.add_argument("--tasks", type=_names, default=(), metavar="A,B",
                   help="bbh: tasks (default all); harness: lm-eval tasks or `paper`")
    b.add_argument("--prompts", default=None, metavar="DIR", help="bbh: folder of <task>.txt 3-shot prompts")
    b.add_argument("--n-samples", type=int, default=1, help="humaneval: completions per problem")
    b.add_argument("--k", type=_ints, default=(1, 10, 100), metavar="1,10", help="humaneval: pass@k to report")
    b.add_argument("--timeout", type=float, default=10.0, help="humaneval: seconds per program")
    b.add_argument("--memory-mb", type=int, default=1024, help="humaneval: memory limit per program")
    b.add_argument("--workers", type=int, default=2, help="humaneval: programs run at once")
    b.add_argument("--unsafe-no-sandbox", action="store_true",
                   help="humaneval: run model code even without bubblewrap (it can reach your files and network)")
    b.add_argument("--include-path", default=None, metavar="DIR", help="harness: folder of extra task YAMLs")
    b.add_argument("--num-fewshot", type=int, default=None, help="harness: few-shot examples (default: task's)")
    b.add_argument("--apply-chat-template", action="store_true", help="harness: use the tokenizer's chat template")
    j = p.add_argument_group("LLM judge (alpacaeval, mtbench)")
    j.add_argument("--judge-url", default="", help="OpenAI-compatible URL of the judge, e.g. http://127.0.0.1:8000/v1 "
                                                   "(imtune serve, vLLM) or https://api.openai.com/v1")
    j.add_argument("--judge-model", default="", help="model name sent to the judge (e.g. gpt-4-0613)")
    j.add_argument("--judge-api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the judge's API key (sent when set, only over https or "
                        "to this machine)")
    j.add_argument("--judge-key-anywhere", action="store_true",
                   help="also send the API key over plain http to another machine (anyone on the way can read it)")
    j.add_argument("--judge-cache", default=None, help="SQLite file of judge replies (default: "
                                                       "$IMTUNE_CACHE/judge-cache.sqlite; 'none': no cache)")
    j.add_argument("--judge-workers", type=int, default=4, help="judge requests in flight at once")
    j.add_argument("--judge-timeout", type=float, default=600.0, help="seconds to wait for one judge reply")
    j.add_argument("--judge-max-tokens", type=int, default=None,
                   help="reply tokens asked of the judge (default: the protocol's, alpacaeval 100, mtbench 2048)")


def output_dir(args, default: bool = True) -> tuple[Path | None, bool]:
    """(where the result files go (None: no files), whether it is a directory of its own), checked before anything
    is written: --out DIR, an imtune "eval" directory of its own (imtune.files: new or empty, or one imtune made);
    else RUN/eval of a run given as --model; else imtune-bench/NAME. --json OUT is checked here too."""
    from imtune import files
    from imtune.rundir.read import find_run

    if args.json:
        files.check_target(args.json)
    run = None if args.out or not default else find_run(args.model)
    if run is not None:
        return files.check_target(run.path / "eval", files.owned(run.path, "run")), False
    out = Path(args.out) if args.out else Path("imtune-bench") / args.name if default else None
    if out is not None:
        files.check_claim(out, "eval")
    return out, out is not None


@contextmanager
def writing_to(out: Path | None, own: bool):
    """A directory of its own is claimed (imtune.files.claiming: removed again when the benchmark fails before
    writing); RUN/eval lies in a run imtune made; no output needs nothing."""
    from imtune import files

    if not own:
        yield
        return
    with files.claiming(out, "eval"):
        yield


def run(args) -> int:
    from imtune import tasks

    options = {flag: getattr(args, flag) for flag in OPTION_FLAGS[args.name]}
    if args.name == "harness":
        if args.samples:
            raise UsageError("harness: lm-eval generates and scores itself; give --model, not --samples")
        from imtune.tasks import harness

        out, own = output_dir(args)
        with writing_to(out, own):
            result = harness.run_benchmark(args.model or "default", limit=args.limit, out_dir=out, **options)
        print(harness.markdown_table(result), end="")
        return _finish(result, args)
    if not args.data and args.name in DEFAULT_DATA:
        args.data = _default_data(args.name)
    if not args.data:
        raise UsageError(f"{args.name}: --data PATH is required, e.g. ../shared/data/eval/"
                         + {"gsm8k": "gsm8k_test.jsonl", "bbh": "bbh", "humaneval": "HumanEval.jsonl.gz",
                            "alpacaeval": "alpaca_eval/text_davinci_003_outputs.json",
                            "mtbench": "mt_bench"}[args.name])
    if args.samples:
        out, own = output_dir(args, default=False)
        with writing_to(out, own):
            result = tasks.score_samples(args.name, args.samples, args.data, limit=args.limit, out_dir=out, **options)
    elif args.model:
        result = _generate(args, options)
    else:
        raise UsageError("give --model M to generate and score, or --samples S.jsonl to score completions you have")
    print(tasks.module(args.name).summary(result) if args.name in tasks.JUDGED else tasks.summary_line(result))
    if result.get("tasks"):
        print(tasks.markdown_table(result).split("\n\n", 1)[-1], end="")
    return _finish(result, args)


def _generate(args, options: dict) -> dict:
    import torch

    from imtune import tasks
    from imtune.data.templates import Renderer
    from imtune.model.generate import GenerationConfig
    from imtune.model.models import load_model, load_tokenizer

    out, own = output_dir(args)  # checked before the model is loaded
    mod = tasks.module(args.name)
    opts = tasks.make_options(args.name, options)
    tok = load_tokenizer(args.model)
    renderer = Renderer(args.template, tok)
    model = load_model(args.model)
    if torch.cuda.is_available():
        model = model.to("cuda")
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens or mod.max_new_tokens(opts), temperature=args.temperature,
                           top_p=args.top_p, batch_size=args.batch_size, seed=args.seed)
    if getattr(opts, "n_samples", 1) > 1 and cfg.temperature == 0:
        say(f"{args.name}: {opts.n_samples} samples per problem with greedy decoding are identical; "
            "use --temperature > 0 (e.g. 0.8) for pass@k")
    say(f"{args.name}: model {args.model}, template {renderer.name}, max_new_tokens {cfg.max_new_tokens}")
    if args.judge_key_anywhere:  # not an Option (kept out of the results): how this run may treat the API key
        options = {**options, "judge_key_anywhere": True}
    with writing_to(out, own):
        result = tasks.run_benchmark(args.name, model, tok, renderer, args.data, limit=args.limit, gen_cfg=cfg,
                                     out_dir=out, model_name=args.model, progress=True, **options)
    say(f"wrote {', '.join(result['files'].values())}")
    return result


def _default_data(name: str) -> str | None:
    roots = [Path(os.environ["IMTUNE_DATA"])] if os.environ.get("IMTUNE_DATA") else []
    for root in [*roots, Path("../shared/data"), Path("shared/data")]:
        if (root / DEFAULT_DATA[name]).exists():
            return str(root / DEFAULT_DATA[name])
    return None


def _finish(result: dict, args) -> int:
    if args.json:
        from imtune import files

        files.write_json(args.json, result, indent=2)
        say(f"wrote {args.json}")
    return 0
