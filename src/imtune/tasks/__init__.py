"""Offline benchmarks. Each is one small module that reads top to bottom, `load → prompts → score`:

    load(data, limit, opts) -> [Example]      the records of a local file (or hf:owner/name[/config][:split]),
                                              each with the chat messages it is asked as and its reference
    generate (imtune.model.generate)                the model's reply to each prompt
    postprocess(example, reply) -> str        the completion that is scored and saved (code extraction for HumanEval)
    score(pairs, opts) -> [Verdict]           each (example, completion) right or wrong, and what was compared
    summarize(pairs, verdicts, opts) -> dict  the metrics (accuracy, pass@k, per task)

`run_benchmark` generates and scores; `score_samples` scores completions someone already has: a JSONL file whose
rows name their example by the module's KEY_FIELDS (gsm8k: index; bbh: task, index; humaneval: task_id) and carry a
"completion". The `harness` entry hands the model to lm-evaluation-harness instead (imtune.tasks.harness).

Results are plain dicts, e.g. {"benchmark": "gsm8k", "n": 1319, "accuracy": 0.41, ...}; a generation run also writes
LABEL.json, LABEL.samples.jsonl (prompt, completion, reference, correct) and LABEL.md into its output folder.
"""
from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Protocol, runtime_checkable

from imtune import files as fs
from imtune.data.records import read_records
from imtune.model.generate import GenerationConfig, generate
from imtune.report.render import md_cell
from imtune.types import DataError, Message, Problem, UsageError, Where

# name -> module: a ScoredTask (gsm8k, humaneval, bbh), a JudgedTask (JUDGED) or the harness, which hands the model
# to lm-eval (imtune.tasks.harness).
BENCHMARKS: dict[str, str] = {
    "gsm8k": "imtune.tasks.gsm8k",  # grade-school math; 0- or 8-shot chain of thought; final-number exact match
    "humaneval": "imtune.tasks.humaneval",  # 164 Python functions; pass@k by running their tests in a sandbox
    "bbh": "imtune.tasks.bbh",  # BIG-Bench Hard, 27 tasks; answer-only or 3-shot chain of thought; exact match
    "harness": "imtune.tasks.harness",  # lm-evaluation-harness tasks (mmlu, arc_challenge, ..., or `paper`)
    "alpacaeval": "imtune.tasks.alpacaeval",  # AlpacaEval 1.0: win rate against text-davinci-003, an LLM judge
    "mtbench": "imtune.tasks.mtbench",  # MT-Bench: 80 two-turn questions graded 1-10 by an LLM judge
}
JUDGED = ("alpacaeval", "mtbench")  # scored by an LLM judge: their module's run() generates, judges and writes


class Example(Protocol):
    key: tuple  # the values of the module's KEY_FIELDS: how a samples file names this example
    messages: tuple[Message, ...]  # what the model is asked (few-shot exemplars as earlier turns)
    reference: str  # the reference answer, as the data file has it


@dataclass(frozen=True)
class JudgeOptions:
    """The LLM judge of a judged task (alpacaeval, mtbench: each module's `Options`)."""
    judge_url: str = ""  # the judge's OpenAI-compatible URL (http://HOST:PORT/v1)
    judge_model: str = ""  # the model name sent to the judge
    judge_api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the judge's API key
    judge_cache: str | None = None  # SQLite file of judge replies (None: $IMTUNE_CACHE/judge-cache.sqlite)
    judge_workers: int = 4  # judge requests in flight at once
    judge_timeout: float = 600.0  # seconds for one judge reply
    judge_max_tokens: int | None = None  # reply tokens asked of the judge (None: the protocol's own)


@dataclass(frozen=True)
class Verdict:
    correct: bool
    extracted: str  # what was compared with the reference: the final answer, or the program's outcome


@runtime_checkable
class ScoredTask(Protocol):
    """What a benchmark module scored by a rule (gsm8k, humaneval, bbh) defines; run_benchmark and score_samples
    call nothing else. `opts` is the module's own frozen Options dataclass."""

    Options: type  # the module's options (frozen dataclass), built from keyword options by make_options
    KEY_FIELDS: tuple[str, ...]  # the fields that name an example in a samples file (gsm8k: index)
    HEADLINE: str  # the key of summarize()'s result the benchmark is reported by (compare's tables: headline())

    def label(self, opts) -> str: ...  # the result's name, e.g. gsm8k-8shot (file names, tables)

    def max_new_tokens(self, opts) -> int: ...  # the generation budget when none is given

    def load(self, data: str, limit: int | None, opts) -> list[Example]: ...

    def postprocess(self, example: Example, reply: str) -> str: ...  # the completion that is scored and saved

    def score(self, pairs: list[tuple[Example, str]], opts) -> list[Verdict]: ...

    def summarize(self, pairs: list[tuple[Example, str]], verdicts: list[Verdict], opts) -> dict: ...


@runtime_checkable
class JudgedTask(Protocol):
    """What a benchmark module scored by an LLM judge (alpacaeval, mtbench) defines: run() generates, judges and
    writes the files itself."""

    Options: type
    KEY_FIELDS: tuple[str, ...]
    HEADLINE: str  # the key of run()'s result the benchmark is reported by (SCALE: "fraction" unless it says)

    def label(self, opts) -> str: ...

    def max_new_tokens(self, opts) -> int: ...

    def load(self, data: str, limit: int | None, opts) -> list: ...

    def run(self, model, tokenizer, renderer, data: str, limit: int | None = None, gen_cfg=None, out_dir=None,
            model_name: str | None = None, progress: bool = False, answers=None, **options) -> dict: ...

    def summary(self, result: dict) -> str: ...  # one line for the terminal

    def markdown(self, result: dict) -> str: ...  # the LABEL.md table


def module(name: str):
    """The module of benchmark `name`: a JudgedTask for the JUDGED ones, a ScoredTask for the others but harness."""
    if name not in BENCHMARKS:
        raise UsageError(f"unknown benchmark {name!r}; valid: {', '.join(BENCHMARKS)}")
    return importlib.import_module(BENCHMARKS[name])


def headline(name: str) -> tuple[str | None, str]:
    """(metric, scale) a benchmark is reported by, as its module declares them (HEADLINE; SCALE, default
    "fraction"): never guessed from the keys of a result."""
    mod = module(name)
    return mod.HEADLINE, getattr(mod, "SCALE", "fraction")


def make_options(name: str, options: dict):
    """The module's Options from keyword options; an unknown one is a user mistake, listed with the valid ones."""
    mod = module(name)
    valid = [f.name for f in fields(mod.Options)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise UsageError(f"{name}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    return mod.Options(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})


# ---------------------------------------------------------------------------------------------------------------
# Reading records


def read_rows(spec: str, list_key: str | None = None) -> list[tuple[Where, dict]]:
    """Records of a .jsonl / .json file (either optionally .gz) or of hf:owner/name[/config][:split] (split `test`
    by default), each with where it came from, through the one record reader (imtune.data.load). A .json file holds a
    list, or an object whose `list_key` field is the list (BBH: "examples"); every element keeps its own line."""
    _, rows = read_records(spec, split="test", list_key=list_key)
    bad = [r if isinstance(r, Problem) else Problem(w, "", "expected a JSON object") for w, r in rows
           if not isinstance(r, dict)]
    if bad:
        raise DataError(bad)
    return rows


def text_field(where: Where, record: dict, name: str) -> str:
    """A required string field of a data record, or a DataError saying which record lacks it."""
    value = record.get(name)
    if not isinstance(value, str):
        raise DataError([Problem(where, name, "missing or not a string")])
    return value


# ---------------------------------------------------------------------------------------------------------------
# Generating and scoring


def run_benchmark(name: str, model, tokenizer, renderer, data: str | None, limit: int | None = None, gen_cfg=None,
                  out_dir: Path | str | None = None, model_name: str | None = None, progress: bool = False,
                  answers=None, **options) -> dict:
    """Generate with `model` for every example of `data` and score; write the files into `out_dir` if given.
    `answers`: imtune.evaluate.answers.Answers of the model (greedy answers it gave before are not generated again)."""
    if name == "harness":
        return module(name).run_benchmark(model, tokenizer, limit=limit, out_dir=out_dir, model_name=model_name,
                                     **options)
    if name in JUDGED:
        return module(name).run(model, tokenizer, renderer, data, limit=limit, gen_cfg=gen_cfg, out_dir=out_dir,
                                model_name=model_name, progress=progress, answers=answers, **options)
    mod, opts = module(name), make_options(name, options)
    if not data:
        raise UsageError(f"{name}: give the data file (--data PATH)")
    examples = mod.load(data, limit, opts)
    cfg = gen_cfg or GenerationConfig(max_new_tokens=mod.max_new_tokens(opts))
    asked = [ex for ex in examples for _ in range(getattr(opts, "n_samples", 1))]
    replies = generate(model, tokenizer, renderer, [list(ex.messages) for ex in asked], cfg, progress=progress,
                       answers=answers)
    pairs = [(ex, mod.postprocess(ex, reply)) for ex, reply in zip(asked, replies)]
    verdicts = mod.score(pairs, opts)
    result = _result(name, mod, opts, examples, pairs, verdicts, data, limit)
    result["model"] = model_name or getattr(model.config, "name_or_path", "") or type(model).__name__
    result["generation"] = {"template": renderer.name, "max_new_tokens": cfg.max_new_tokens,
                            "temperature": cfg.temperature, "top_p": cfg.top_p, "seed": cfg.seed}
    rows = []
    for (ex, completion), reply, verdict in zip(pairs, replies, verdicts):
        row = {**dict(zip(mod.KEY_FIELDS, ex.key)), "prompt": renderer.prompt(list(ex.messages)),
               "completion": completion, "reference": ex.reference, "extracted": verdict.extracted,
               "correct": verdict.correct}
        if reply != completion:
            row["response"] = reply  # the model's words, when the completion was taken out of them
        rows.append(row)
    if out_dir is not None:
        result["files"] = write_outputs(result, rows, Path(out_dir))
    return result


def score_samples(name: str, samples_path: str, data: str, limit: int | None = None,
                  out_dir: Path | str | None = None, **options) -> dict:
    """Score completions someone already has. Rows name their example by the module's KEY_FIELDS; a leading key
    field that is missing is taken from the data when all its examples share one value (BBH's task, with one task);
    the last one (index, task_id) is always required."""
    if name == "harness":
        raise UsageError("harness: lm-eval scores its own generations; --samples is for gsm8k, humaneval and bbh")
    if name in JUDGED:
        raise UsageError(f"{name}: --samples is for gsm8k, humaneval and bbh; judge AlpacaEval outputs you already "
                         "have with `imtune judge --outputs A.jsonl`")
    mod, opts = module(name), make_options(name, options)
    examples = mod.load(data, limit, opts)
    by_key = {ex.key: ex for ex in examples}
    shared = {f: {ex.key[i] for ex in examples} for i, f in enumerate(mod.KEY_FIELDS)}
    everything = None  # keys of the whole data set, read only when a sample's key is not among the examples
    pairs, problems, ignored = [], [], 0
    for where, row in read_rows(samples_path):
        key_values = []
        for f in mod.KEY_FIELDS:  # (a row with a key field missing breaks out and skips the else below)
            if f in row:
                key_values.append(row[f])
            elif len(shared[f]) == 1 and f != mod.KEY_FIELDS[-1]:
                key_values.append(next(iter(shared[f])))
            else:
                problems.append(Problem(where, f, f"missing; rows name their example by {', '.join(mod.KEY_FIELDS)}"))
                break
        else:
            key = tuple(key_values)
            completion = row.get("completion")
            if not isinstance(completion, str):
                problems.append(Problem(where, "completion", "missing or not a string"))
            elif key in by_key:
                pairs.append((by_key[key], completion))
            else:
                if everything is None:  # the whole data set, without --limit or --tasks
                    whole = replace(opts, tasks=()) if hasattr(opts, "tasks") else opts
                    everything = {ex.key for ex in mod.load(data, None, whole)}
                if key in everything:
                    ignored += 1
                else:
                    problems.append(Problem(where, "", f"no example {dict(zip(mod.KEY_FIELDS, key))} in {data}"))
    if problems:
        raise DataError(problems)
    if not pairs:
        raise DataError(f"{samples_path}: no samples for the examples of {data}")
    verdicts = mod.score(pairs, opts)
    result = _result(name, mod, opts, examples, pairs, verdicts, data, limit)
    result["samples_file"] = str(samples_path)
    if ignored:
        result["ignored"] = ignored  # samples of examples left out by --limit or --tasks
    if out_dir is not None:
        rows = [{**dict(zip(mod.KEY_FIELDS, ex.key)), "completion": c, "reference": ex.reference,
                 "extracted": v.extracted, "correct": v.correct} for (ex, c), v in zip(pairs, verdicts)]
        result["files"] = write_outputs(result, rows, Path(out_dir))
    return result


def _result(name, mod, opts, examples, pairs, verdicts, data, limit) -> dict:
    scored = {ex.key for ex, _ in pairs}
    result = {"benchmark": name, "label": mod.label(opts), "n": len(scored), "samples": len(pairs),
              **mod.summarize(pairs, verdicts, opts), "options": _jsonable(asdict(opts)), "data": str(data),
              "limit": limit}
    if len(scored) < len(examples):
        result["missing"] = len(examples) - len(scored)  # examples without a sample
    return result


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------------------------
# Showing and writing

METRIC_ORDER = ("accuracy", "task_average")


def metric_names(result: dict) -> list[str]:
    """The headline metrics of a result, in a fixed order (pass@k after accuracy)."""
    names = [m for m in METRIC_ORDER if m in result]
    names += sorted((m for m in result if m.startswith("pass@")), key=lambda m: int(m[5:]))
    return names


def summary_line(result: dict) -> str:
    metrics = ", ".join(f"{m} {100 * result[m]:.1f}%" for m in metric_names(result))
    extra = f", {result['missing']} without a sample" if result.get("missing") else ""
    extra += f", {result['ignored']} samples outside --limit/--tasks ignored" if result.get("ignored") else ""
    return f"{result['label']}: {metrics} (n={result['n']}{extra})"


def markdown_table(result: dict) -> str:
    names = metric_names(result)
    lines = [f"| benchmark | model | n | {' | '.join(names)} |", "|---|---|---:|" + "---:|" * len(names),
             f"| {md_cell(result['label'])} | {md_cell(result.get('model', ''))} | {result['n']} | "
             + " | ".join(f"{100 * result[m]:.1f}" for m in names) + " |"]
    tasks = result.get("tasks")
    if tasks:
        lines += ["", "| task | n | accuracy |", "|---|---:|---:|"]
        lines += [f"| {md_cell(t)} | {r['n']} | {100 * r['accuracy']:.1f} |" for t, r in tasks.items()]
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, rows: list[dict] | None, out_dir: Path, markdown: str | None = None) -> dict[str, str]:
    """LABEL.json (the result), LABEL.samples.jsonl (one row a sample, when there are rows) and LABEL.md (a table)."""
    label = result["label"]
    files = {"json": str(out_dir / f"{label}.json"), "markdown": str(out_dir / f"{label}.md")}
    if rows is not None:
        files["samples"] = str(fs.write_jsonl(out_dir / f"{label}.samples.jsonl", rows, out_dir))
    fs.write_text(files["markdown"], f"# {label}\n\n" + (markdown or markdown_table(result)), out_dir)
    fs.write_json(files["json"], {**result, "files": files}, out_dir, indent=2)
    return files
