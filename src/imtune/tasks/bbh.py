"""BIG-Bench Hard: 27 reasoning tasks, scored by exact match of the final answer.

Data: a folder of <task>.json files, each {"examples": [{input, target}]}, with the 3-shot prompts in
<folder>/cot-prompts/<task>.txt (../shared/data/eval/bbh), or one <task>.json file (prompts in the cot-prompts folder
beside it), or hf:owner/name[:split] with one config per task (e.g. hf:lukaemon/bbh:test; then give --prompts DIR).
`--tasks a,b` picks tasks (default: all in the folder), `--limit N` takes the first N examples of each.

Prompts: the BBH paper's 3 exemplars per task as earlier chat turns, the task description before the first
question, each user turn "Q: question". With `cot` the assistant turns are the paper's chain of thought ("Let's think
step by step. ... So the answer is X."); without, they are the answer alone ("X"): the paper's answer-only prompts.

Answer extraction: the completion is cut where a model starts a new "Q:"; the answer is what follows the first "the
answer is" (any case) to the end of its line, else the first non-empty line (answer-only) or the last (CoT); a leading
"A:", surrounding quotes/asterisks/backticks and a trailing "." are dropped. Multiple-choice targets "(B)" accept
"(B)", "B", "B)" and "(B) the option's text"; other targets compare case-insensitively with whitespace collapsed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from imtune.tasks import Verdict, read_rows, text_field
from imtune.types import Message, UsageError

HEADLINE = "accuracy"  # the one number this benchmark is reported by (imtune.tasks.headline)
KEY_FIELDS = ("task", "index")

TASKS: tuple[str, ...] = (
    "boolean_expressions", "causal_judgement", "date_understanding", "disambiguation_qa", "dyck_languages",
    "formal_fallacies", "geometric_shapes", "hyperbaton", "logical_deduction_five_objects",
    "logical_deduction_seven_objects", "logical_deduction_three_objects", "movie_recommendation",
    "multistep_arithmetic_two", "navigate", "object_counting", "penguins_in_a_table",
    "reasoning_about_colored_objects", "ruin_names", "salient_translation_error_detection", "snarks",
    "sports_understanding", "temporal_sequences", "tracking_shuffled_objects_five_objects",
    "tracking_shuffled_objects_seven_objects", "tracking_shuffled_objects_three_objects", "web_of_lies",
    "word_sorting",
)


@dataclass(frozen=True)
class Options:
    cot: bool = False
    """3-shot chain-of-thought prompts; otherwise 3-shot answer-only"""
    tasks: tuple[str, ...] = ()
    """tasks to run (default: every task in the data folder)"""
    prompts: str | None = None
    """folder of the 3-shot prompts, <task>.txt (default: cot-prompts beside the data)"""


@dataclass(frozen=True)
class Example:
    key: tuple[str, int]  # (task, 0-based index in the task's file)
    messages: tuple[Message, ...]
    reference: str  # the target, e.g. "(B)", "True", "] ] )"


@dataclass(frozen=True)
class Shots:
    description: str
    exemplars: tuple[tuple[str, str, str], ...]  # (question, chain of thought, answer)


def label(opts: Options) -> str:
    return "bbh-cot" if opts.cot else "bbh"


def max_new_tokens(opts: Options) -> int:
    return 512 if opts.cot else 32


def read_shots(path: Path) -> Shots:
    """A BBH prompt file: a canary header, '-----', the task description, then 'Q: ...\\nA: ...' blocks."""
    text = path.read_text(encoding="utf-8")
    body = text.split("-----\n", 1)[-1].strip()
    description, *blocks = body.split("\n\nQ: ")
    exemplars = []
    for block in blocks:
        question, sep, cot = block.partition("\nA: ")
        if not sep or "So the answer is" not in cot:
            raise UsageError(f"{path}: an exemplar without 'A: ... So the answer is X.'; is this a BBH prompt file?")
        answer = cot.rsplit("So the answer is", 1)[1].strip().removesuffix(".").strip()
        exemplars.append((question.removeprefix("Q: "), cot.strip(), answer))
    return Shots(description.strip(), tuple(exemplars))


def prompt(question: str, shots: Shots, cot: bool) -> tuple[Message, ...]:
    turns = []
    for i, (q, chain, answer) in enumerate(shots.exemplars):
        lead = f"{shots.description}\n\n" if i == 0 else ""
        turns += [Message("user", f"{lead}Q: {q}"), Message("assistant", chain if cot else answer)]
    lead = f"{shots.description}\n\n" if not shots.exemplars else ""
    return (*turns, Message("user", f"{lead}Q: {question}"))


def _sources(data: str, opts: Options) -> tuple[dict[str, str], Path | None]:
    """task -> data spec for that task, and the default prompts folder."""
    if data.startswith("hf:"):
        name, _, split = data[3:].partition(":")
        return {t: f"hf:{name}/{t}:{split or 'test'}" for t in (opts.tasks or TASKS)}, None
    path = Path(data).expanduser()
    if path.is_dir():
        found = {p.stem: str(p) for p in sorted(path.glob("*.json"))}
        if not found:
            raise UsageError(f"{data}: no <task>.json files in this folder")
        return found, path / "cot-prompts"
    if path.is_file():
        return {path.name.split(".")[0]: str(path)}, path.parent / "cot-prompts"
    raise UsageError(f"{data}: no such file or folder")


def load(data: str, limit: int | None, opts: Options) -> list[Example]:
    files, default_prompts = _sources(data, opts)
    tasks = list(opts.tasks) or list(files)
    unknown = [t for t in tasks if t not in files]
    if unknown:
        raise UsageError(f"bbh: no task {', '.join(unknown)} in {data}; valid: {', '.join(files)}")
    prompts = Path(opts.prompts).expanduser() if opts.prompts else default_prompts
    examples = []
    for task in tasks:
        shot_file = prompts / f"{task}.txt" if prompts else None
        if shot_file is None or not shot_file.is_file():
            raise UsageError(f"bbh: no 3-shot prompt file for {task} ({shot_file or 'no prompts folder'}); "
                             "give the folder of <task>.txt prompt files with --prompts DIR")
        shots = read_shots(shot_file)
        for where, record in read_rows(files[task], list_key="examples")[:limit]:
            question, target = text_field(where, record, "input"), text_field(where, record, "target")
            examples.append(Example((task, where.index), prompt(question, shots, opts.cot), target))
    return examples


ANSWER = re.compile(r"the answer is\b:?(.*)", re.IGNORECASE)
CHOICE = re.compile(r"\(([A-R])\)")


def clean(answer: str) -> str:
    s = " ".join(answer.split())
    s = re.sub(r"^A:\s+", "", s)
    s = s.strip("*\"'` ").removesuffix(".").strip("*\"'` ")
    return s


def extract_answer(completion: str, cot: bool) -> str:
    text = re.split(r"\n\s*Q:", completion, maxsplit=1)[0]
    found = ANSWER.search(text)
    if found and found.group(1).strip():
        return clean(found.group(1))
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return ""
    return clean(lines[-1] if cot else lines[0])


def matches(answer: str, target: str) -> bool:
    if CHOICE.fullmatch(target):
        letter = re.match(r"\(?([A-R])\)?(?!\w)", answer)
        return letter is not None and letter.group(1) == target[1]
    return " ".join(answer.split()).casefold() == " ".join(target.split()).casefold()


def postprocess(example: Example, reply: str) -> str:
    return reply


def score(pairs: list[tuple[Example, str]], opts: Options) -> list[Verdict]:
    verdicts = []
    for ex, completion in pairs:
        got = extract_answer(completion, opts.cot)
        verdicts.append(Verdict(matches(got, ex.reference), got))
    return verdicts


def summarize(pairs: list[tuple[Example, str]], verdicts: list[Verdict], opts: Options) -> dict:
    per: dict[str, list[int]] = {}
    for (ex, _), v in zip(pairs, verdicts):
        n_correct = per.setdefault(ex.key[0], [0, 0])
        n_correct[0] += 1
        n_correct[1] += v.correct
    tasks = {t: {"n": n, "accuracy": c / n} for t, (n, c) in per.items()}
    correct = sum(v.correct for v in verdicts)
    return {"accuracy": correct / len(verdicts) if verdicts else 0.0,
            "task_average": sum(r["accuracy"] for r in tasks.values()) / len(tasks) if tasks else 0.0,
            "correct": correct, "tasks": tasks}
