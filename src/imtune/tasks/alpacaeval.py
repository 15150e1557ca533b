"""AlpacaEval 1.0: the model's answers to 805 instructions against text-davinci-003's, ranked by an LLM judge.

Data: the JSON array of {dataset, instruction, output, generator} with the text-davinci-003 reference outputs
(../shared/data/eval/alpaca_eval/text_davinci_003_outputs.json). The model answers each instruction as a single
user turn with its own (or its run's) chat template, greedy unless told otherwise. The judge is any
OpenAI-compatible endpoint (--judge-url, --judge-model) and follows AlpacaEval 1.0's `alpaca_eval_gpt4` annotator
(imtune.evaluate.judge: its ranking prompt verbatim, temperature 0, 100 reply tokens, ranking_parser), each pair
asked in both orders: 2 judge requests per instruction, 1,610 for the full set (cached: a re-run asks none).

Result: `win_rate` (fraction of pairs the model wins, a tie counting one half) with `standard_error`, wins,
losses, ties (the two orders disagreed), `unparseable_pairs` (no reply was a ranking: dropped, as AlpacaEval
drops them) and `unparseable_judgements`; `avg_length` (mean characters of the model's outputs, AlpacaEval's
avg_length) beside `reference_avg_length`. No length-controlled win rate: AlpacaEval 2.0's GLM needs the
leaderboard's other models to fit the instruction terms, which are not available offline.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from imtune.evaluate.judge import ALPACA_EVAL_MAX_TOKENS, judge_pairs, open_judge
from imtune.model.generate import GenerationConfig, generate
from imtune.report.render import md_cell, md_code
from imtune.tasks import JudgeOptions, make_options, read_rows, text_field, write_outputs
from imtune.types import Message, UsageError

HEADLINE = "win_rate"  # the one number this benchmark is reported by (imtune.tasks.headline)
KEY_FIELDS = ("index",)
MAX_NEW_TOKENS = 1024


Options = JudgeOptions  # judge_max_tokens None: the protocol's 100


@dataclass(frozen=True)
class Example:
    key: tuple
    messages: tuple[Message, ...]
    reference: str


def label(opts: Options) -> str:
    return "alpacaeval"


def max_new_tokens(opts: Options) -> int:
    return MAX_NEW_TOKENS


def load(data: str, limit: int | None, opts: Options) -> list[Example]:
    rows = read_rows(data)
    if limit:
        rows = rows[:limit]
    return [Example((w.index,), (Message("user", text_field(w, r, "instruction")),), text_field(w, r, "output"))
            for w, r in rows]


def run(model, tokenizer, renderer, data: str, limit: int | None = None, gen_cfg=None, out_dir=None,
        model_name: str | None = None, progress: bool = False, answers=None, **options) -> dict:
    """Answer every instruction, judge each answer against the reference in both orders, summarize. `answers`:
    imtune.evaluate.answers.Answers of the model (greedy answers given before are not generated again)."""

    key_anywhere = bool(options.pop("judge_key_anywhere", False))  # a choice about this run, not an Option
    opts = make_options("alpacaeval", options)
    if not data:
        raise UsageError("alpacaeval: give the reference outputs "
                         "(--data .../alpaca_eval/text_davinci_003_outputs.json)")
    client, cache = open_judge(opts.judge_url, opts.judge_model, opts.judge_api_key_env, opts.judge_cache,
                               opts.judge_max_tokens or ALPACA_EVAL_MAX_TOKENS, opts.judge_timeout, key_anywhere)
    try:
        examples = load(data, limit, opts)
        cfg = gen_cfg or GenerationConfig(max_new_tokens=MAX_NEW_TOKENS)
        outputs = generate(model, tokenizer, renderer, [list(ex.messages) for ex in examples], cfg, progress=progress,
                           answers=answers)
        pairs = [{"index": ex.key[0], "instruction": ex.messages[0].content, "output": out, "reference": ex.reference}
                 for ex, out in zip(examples, outputs)]
        judged = judge_pairs(pairs, client, cache, opts.judge_workers, progress=progress)
    finally:
        cache.close()
    s = judged["summary"]
    result = {"benchmark": "alpacaeval", "label": label(opts), "n": s["n"], "instructions": len(examples),
              "win_rate": s["win_rate"], "standard_error": s["standard_error"],
              **{k: s[k] for k in ("wins", "losses", "ties", "unparseable_pairs", "judgements",
                                   "unparseable_judgements", "inconsistent_pairs", "requests", "cache_hits")},
              "avg_length": sum(map(len, outputs)) / max(1, len(outputs)),
              "reference_avg_length": sum(len(ex.reference) for ex in examples) / max(1, len(examples)),
              "judge": {"model": client.model, "url": client.url, "protocol": s["protocol"]},
              "model": model_name or getattr(model.config, "name_or_path", "") or type(model).__name__,
              "generation": {"template": renderer.name, "max_new_tokens": cfg.max_new_tokens,
                             "temperature": cfg.temperature, "top_p": cfg.top_p, "seed": cfg.seed},
              "options": {k: v for k, v in asdict(opts).items() if k != "judge_api_key_env"}, "data": str(data),
              "limit": limit}
    if out_dir is not None:
        result["files"] = write_outputs(result, judged["pairs"], Path(out_dir), markdown(result))
    return result


def summary(result: dict) -> str:
    rate = "n/a" if result["win_rate"] is None else \
        f"{100 * result['win_rate']:.1f}% ± {100 * result['standard_error']:.1f}"
    return (f"alpacaeval: win rate {rate} against text-davinci-003 (n={result['n']} of {result['instructions']}, "
            f"{result['ties']} ties, {result['unparseable_pairs']} unparseable pairs dropped), judge "
            f"{result['judge']['model']}; avg length {result['avg_length']:.0f} chars "
            f"(references {result['reference_avg_length']:.0f})")


def markdown(result: dict) -> str:
    rate = "n/a" if result["win_rate"] is None else \
        f"{100 * result['win_rate']:.1f} ± {100 * result['standard_error']:.1f}"
    return "\n".join([
        f"Judge {md_code(result['judge']['model'])} at {md_code(result['judge']['url'])}: "
        f"{result['judge']['protocol']}.", "",
        "| model | n | win rate % (± s.e.) | wins | losses | ties | unparseable pairs | avg length | reference avg |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {md_cell(result['model'])} | {result['n']} | {rate} | {result['wins']} | {result['losses']} "
        f"| {result['ties']} | {result['unparseable_pairs']} | {result['avg_length']:.0f} "
        f"| {result['reference_avg_length']:.0f} |", ""])
