"""MT-Bench: 80 two-turn questions in 8 categories, each turn graded 1-10 by an LLM judge (FastChat's single-answer
grading).

Data: a folder with FastChat's question.jsonl ({question_id, category, turns: [2 user turns]}),
reference_answer_gpt-4.jsonl and judge_prompts.jsonl (../shared/data/eval/mt_bench). This mirrors FastChat's
fastchat/llm_judge (gen_model_answer.py, gen_judgment.py, common.py, show_result.py), not imported: the `fschat`
package does not ship judge_prompts.jsonl and pulls in its web-UI dependencies.

- Answers: the model answers turn 1, then turn 2 after its own first answer, with its (or its run's) chat template,
  at FastChat's per-category temperature (TEMPERATURE; below 1e-4 greedy), up to 1024 new tokens.
- Judging: turn 1 with prompt `single-v1`, turn 2 with `single-v1-multi-turn` (the whole conversation, judged on
  the second answer); math, reasoning and coding use `single-math-v1(-multi-turn)` with GPT-4's reference answers.
  The judge gets [system prompt, user prompt] at temperature 0 with up to 2048 reply tokens: 2 requests per
  question, 160 for the full set (60 of them reference-guided); cached, so a re-run asks none.
- Parsing: the first `[[rating]]`, else the first `[rating]` (FastChat's one_score_pattern and its backup); a reply
  with neither is unparseable (FastChat's -1): counted, and excluded from the means.

Result: `score` (mean over every graded turn) with `standard_error`, `turn1` and `turn2` and `categories`
({score, standard_error, n} each), `n` (questions), `judgements`, `unparseable_judgements`.
"""
from __future__ import annotations

import ast
import math
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from imtune.evaluate.judge import ask_all, cache_key, open_judge
from imtune.model.generate import GenerationConfig, generate
from imtune.report.render import md_cell, md_code
from imtune.tasks import JudgeOptions, make_options, read_rows, write_outputs
from imtune.types import DataError, Message, Problem, UsageError

HEADLINE = "score"  # the one number this benchmark is reported by (imtune.tasks.headline)
SCALE = "1-10"  # the judge's grades, not a fraction
KEY_FIELDS = ("question_id",)
MAX_NEW_TOKENS = 1024  # gen_model_answer.py --max-new-token
JUDGE_MAX_TOKENS = 2048  # common.py: chat_completion_openai(..., temperature=0, max_tokens=2048)
# common.py temperature_config
TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0, "reasoning": 0.0,
               "stem": 0.1, "humanities": 0.1}
NEED_REF_CATS = ("math", "reasoning", "coding")  # common.py NEED_REF_CATS
ONE_SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")  # common.py one_score_pattern
ONE_SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")  # common.py one_score_pattern_backup


Options = JudgeOptions  # judge_max_tokens None: the protocol's 2048


@dataclass(frozen=True)
class Question:
    key: tuple  # (question_id,)
    category: str
    turns: tuple[str, str]
    reference: tuple[str, str] | None  # GPT-4's answers, for NEED_REF_CATS


def label(opts: Options) -> str:
    return "mtbench"


def max_new_tokens(opts: Options) -> int:
    return MAX_NEW_TOKENS


def load(data: str, limit: int | None, opts: Options | None = None) -> list[Question]:
    folder = Path(data)
    if not (folder / "question.jsonl").is_file():
        raise UsageError(f"{data}: expected a folder with question.jsonl, reference_answer_gpt-4.jsonl and "
                         "judge_prompts.jsonl (FastChat's MT-Bench files)")
    refs = {}
    for w, r in read_rows(str(folder / "reference_answer_gpt-4.jsonl")):
        try:
            refs[r["question_id"]] = tuple(r["choices"][0]["turns"][:2])
        except (KeyError, IndexError, TypeError):
            raise DataError([Problem(w, "choices", "expected choices[0].turns with the reference answers")]) from None
    questions, problems = [], []
    for w, r in read_rows(str(folder / "question.jsonl")):
        turns, cat = r.get("turns"), r.get("category")
        if not (isinstance(turns, list) and len(turns) == 2 and all(isinstance(t, str) for t in turns)):
            problems.append(Problem(w, "turns", "expected two user turns (strings)"))
        elif cat not in TEMPERATURE:
            problems.append(Problem(w, "category", f"unknown category {cat!r}; MT-Bench's: {', '.join(TEMPERATURE)}"))
        elif cat in NEED_REF_CATS and r.get("question_id") not in refs:
            problems.append(Problem(w, "question_id", "a math/reasoning/coding question without a reference answer"))
        else:
            questions.append(Question((r["question_id"],), cat, tuple(turns), refs.get(r["question_id"])
                                      if cat in NEED_REF_CATS else None))
    if problems:
        raise DataError(problems)
    return questions[:limit] if limit else questions


def judge_prompts(data: str) -> dict[str, dict]:
    """FastChat's judge prompts by name (single-v1, single-v1-multi-turn, single-math-v1, ...)."""
    path = Path(data) / "judge_prompts.jsonl"
    if not path.is_file():
        raise UsageError(f"{path}: FastChat's judge_prompts.jsonl is needed beside question.jsonl")
    prompts = {r["name"]: r for _, r in read_rows(str(path)) if "name" in r}
    missing = [n for n in ("single-v1", "single-v1-multi-turn", "single-math-v1", "single-math-v1-multi-turn")
               if n not in prompts]
    if missing:
        raise DataError(f"{path}: missing the judge prompt(s) {', '.join(missing)}")
    return prompts


# ---------------------------------------------------------------------------------------------------------------
def answer(model, tokenizer, renderer, questions: list[Question], cfg, progress: bool = False,
           answers=None) -> list[tuple]:
    """(turn-1 answer, turn-2 answer) per question: turn 2 is asked after the model's own turn-1 answer. Questions
    are generated in groups of one category temperature (gen_model_answer.py: do_sample when temperature >= 1e-4).
    `answers`: imtune.evaluate.answers.Answers of the model (its greedy answers given before are not generated
    again)."""

    given: dict[tuple, list[str]] = {q.key: [] for q in questions}
    for temp in sorted({TEMPERATURE[q.category] for q in questions}):
        group = [q for q in questions if TEMPERATURE[q.category] == temp]
        gcfg = replace(cfg, temperature=temp if temp >= 1e-4 else 0.0)
        first = generate(model, tokenizer, renderer, [[Message("user", q.turns[0])] for q in group], gcfg,
                         progress=progress, answers=answers)
        second = generate(model, tokenizer, renderer,
                          [[Message("user", q.turns[0]), Message("assistant", a), Message("user", q.turns[1])]
                           for q, a in zip(group, first)], gcfg, progress=progress, answers=answers)
        for q, a1, a2 in zip(group, first, second):
            given[q.key] = [a1, a2]
    return [tuple(given[q.key]) for q in questions]


def judge_messages(prompts: dict, q: Question, answers: tuple[str, str], turn: int) -> list[dict]:
    """run_judge_single's request for one turn (1 or 2): [system, user] with the prompt template filled in."""
    ref = q.category in NEED_REF_CATS
    name = ("single-math-v1" if ref else "single-v1") + ("-multi-turn" if turn == 2 else "")
    kwargs = {}
    if ref:
        kwargs["ref_answer_1"] = q.reference[0]
        if turn == 2:
            kwargs["ref_answer_2"] = q.reference[1]
    template = prompts[name]
    if turn == 2:
        user = template["prompt_template"].format(question_1=q.turns[0], question_2=q.turns[1],
                                                  answer_1=answers[0], answer_2=answers[1], **kwargs)
    else:
        user = template["prompt_template"].format(question=q.turns[0], answer=answers[0], **kwargs)
    return [{"role": "system", "content": template["system_prompt"]}, {"role": "user", "content": user}]


def parse_rating(reply: str | None) -> float | None:
    """The judge's rating: the first [[x]], else the first [x] (ast.literal_eval of the number); None if neither."""
    if not reply:
        return None
    match = ONE_SCORE.search(reply) or ONE_SCORE_BACKUP.search(reply)
    return float(ast.literal_eval(match.group(1))) if match else None


def mean_se(values: list[float]) -> dict:
    n = len(values)
    if n == 0:
        return {"score": None, "standard_error": None, "n": 0}
    m = sum(values) / n
    se = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n) if n > 1 else 0.0
    return {"score": m, "standard_error": se, "n": n}


def summarize(questions: list[Question], ratings: list[tuple]) -> dict:
    """score, turn1, turn2 and per-category means (show_result.py: ratings of -1, here None, are left out)."""
    turns = {1: [], 2: []}
    cats: dict[str, list[float]] = {}
    for q, rs in zip(questions, ratings):
        for turn, r in zip((1, 2), rs):
            if r is not None:
                turns[turn].append(r)
                cats.setdefault(q.category, []).append(r)
    overall = mean_se(turns[1] + turns[2])
    return {"score": overall["score"], "standard_error": overall["standard_error"], "n": len(questions),
            "turn1": mean_se(turns[1]), "turn2": mean_se(turns[2]),
            "categories": {c: mean_se(cats.get(c, [])) for c in TEMPERATURE if any(q.category == c for q in questions)},
            "judgements": 2 * len(questions),
            "unparseable_judgements": sum(r is None for rs in ratings for r in rs)}


def run(model, tokenizer, renderer, data: str, limit: int | None = None, gen_cfg=None, out_dir=None,
        model_name: str | None = None, progress: bool = False, answers=None, **options) -> dict:
    """Answer both turns of every question, have the judge grade each turn, summarize. `answers`:
    imtune.evaluate.answers.Answers of the model (greedy answers given before are not generated again)."""
    key_anywhere = bool(options.pop("judge_key_anywhere", False))  # a choice about this run, not an Option
    opts = make_options("mtbench", options)
    if not data:
        raise UsageError("mtbench: give FastChat's MT-Bench folder (--data .../mt_bench)")
    questions, prompts = load(data, limit, opts), judge_prompts(data)
    client, cache = open_judge(opts.judge_url, opts.judge_model, opts.judge_api_key_env, opts.judge_cache,
                               opts.judge_max_tokens or JUDGE_MAX_TOKENS, opts.judge_timeout, key_anywhere)
    try:
        cfg = gen_cfg or GenerationConfig(max_new_tokens=MAX_NEW_TOKENS)
        given = answer(model, tokenizer, renderer, questions, cfg, progress, answers)
        requests = {}
        plan = []
        for q, a in zip(questions, given):
            keys = []
            for turn in (1, 2):
                msgs = judge_messages(prompts, q, a, turn)
                k = cache_key(client.model, msgs)
                requests[k] = msgs
                keys.append(k)
            plan.append(keys)
        replies, sent = ask_all(requests, client, cache, opts.judge_workers, progress)
    finally:
        cache.close()
    ratings = [tuple(parse_rating(replies[k]) for k in keys) for keys in plan]
    result = {"benchmark": "mtbench", "label": label(opts), **summarize(questions, ratings),
              "requests": sent, "cache_hits": len(requests) - sent,
              "judge": {"model": client.model, "url": client.url,
                        "protocol": "FastChat single-answer grading (single-v1, single-v1-multi-turn, "
                                    "single-math-v1 with GPT-4 references)"},
              "model": model_name or getattr(model.config, "name_or_path", "") or type(model).__name__,
              "generation": {"template": renderer.name, "max_new_tokens": cfg.max_new_tokens,
                             "temperature": "per category (FastChat)", "seed": cfg.seed},
              "options": {k: v for k, v in asdict(opts).items() if k != "judge_api_key_env"}, "data": str(data),
              "limit": limit}
    rows = [{"question_id": q.key[0], "category": q.category, "turns": list(q.turns), "answers": list(a),
             "replies": [replies[k] for k in keys], "ratings": list(r)}
            for q, a, keys, r in zip(questions, given, plan, ratings)]
    if out_dir is not None:
        result["files"] = write_outputs(result, rows, Path(out_dir), markdown(result))
    return result


def _fmt(s: dict) -> str:
    return "n/a" if s["score"] is None else f"{s['score']:.2f} ± {s['standard_error']:.2f}"


def summary(result: dict) -> str:
    return (f"mtbench: score {_fmt(result)} (turn 1 {_fmt(result['turn1'])}, turn 2 {_fmt(result['turn2'])}; "
            f"n={result['n']} questions, {result['unparseable_judgements']} of {result['judgements']} judgements "
            f"unparseable), judge {result['judge']['model']}")


def markdown(result: dict) -> str:
    lines = [f"Judge {md_code(result['judge']['model'])} at {md_code(result['judge']['url'])}: "
             f"{result['judge']['protocol']}.", "",
             "| model | n | score (± s.e.) | turn 1 | turn 2 | unparseable judgements |",
             "|---|---:|---:|---:|---:|---:|",
             f"| {md_cell(result['model'])} | {result['n']} | {_fmt(result)} | {_fmt(result['turn1'])} | "
             f"{_fmt(result['turn2'])} | {result['unparseable_judgements']} of {result['judgements']} |", "",
             "| category | graded turns | score (± s.e.) |", "|---|---:|---:|"]
    lines += [f"| {md_cell(c)} | {s['n']} | {_fmt(s)} |" for c, s in result["categories"].items()]
    return "\n".join(lines) + "\n"

