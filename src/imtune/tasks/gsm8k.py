"""GSM8K: grade-school math word problems, scored by exact match of the final number.

Data: JSONL records {question, answer} whose answer ends with `#### N` (../shared/data/eval/gsm8k_test.jsonl, or
hf:openai/gsm8k/main:test). Prompts: 0-shot (an instruction to think step by step and end with "The answer is N.")
or k-shot (k <= 8, default 8) with the chain-of-thought exemplars of Wei et al. (2022) as earlier chat turns, each
user turn "Q: question" and each assistant turn the worked answer ending "The answer is N." (the same exemplars as
lm-eval's gsm8k_cot).

Answer extraction (`extract_answer`): the completion is cut where a model starts a new "Q:"; then the number after
the first "####" or "The answer is" on the same line, else the last number in the completion; "$", "," and a
trailing "." are dropped and numbers compare as decimals (18 == 18.00). The reference is the number after "####".
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from imtune.tasks import Verdict, read_rows, text_field
from imtune.types import DataError, Message, Problem, UsageError

HEADLINE = "accuracy"  # the one number this benchmark is reported by (imtune.tasks.headline)
KEY_FIELDS = ("index",)

EXEMPLARS: tuple[tuple[str, str], ...] = (
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
     "there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have "
     "been 21 - 15 = 6. The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, "
     "they had 74 - 35 = 39. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did "
     "Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. "
     "The answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have "
     "now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. "
     "The answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to "
     "thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers "
     "were added. 9 + 20 is 29. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf "
     "balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, "
     "he had 35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
     "left. 23 - 15 is 8. The answer is 8."),
)

ZERO_SHOT = ("Solve the following math problem. Think step by step, then finish with \"The answer is N.\" where N "
             "is the final number.\n\n{question}")


@dataclass(frozen=True)
class Options:
    shots: int = 8
    """chain-of-thought exemplars shown before the question (0-8)"""


@dataclass(frozen=True)
class Example:
    key: tuple[int]  # (0-based record index in the data file,)
    messages: tuple[Message, ...]
    reference: str  # the full reference solution, ending "#### N"
    answer: str  # N, normalised


def label(opts: Options) -> str:
    return f"gsm8k-{opts.shots}shot"


def max_new_tokens(opts: Options) -> int:
    return 256


def prompt(question: str, shots: int) -> tuple[Message, ...]:
    if shots == 0:
        return (Message("user", ZERO_SHOT.format(question=question)),)
    turns = []
    for q, a in EXEMPLARS[:shots]:
        turns += [Message("user", f"Q: {q}"), Message("assistant", a)]
    return (*turns, Message("user", f"Q: {question}"))


def load(data: str, limit: int | None, opts: Options) -> list[Example]:
    if not 0 <= opts.shots <= len(EXEMPLARS):
        raise UsageError(f"gsm8k: --shots must be between 0 and {len(EXEMPLARS)}, not {opts.shots}")
    examples = []
    for where, record in read_rows(data)[:limit]:
        question, solution = text_field(where, record, "question"), text_field(where, record, "answer")
        answer = normalize(solution.rsplit("####", 1)[-1].strip()) if "####" in solution else None
        if answer is None:
            raise DataError([Problem(where, "answer", "no final answer: expected the solution to end with '#### N'")])
        examples.append(Example((where.index,), prompt(question, opts.shots), solution, answer))
    return examples


NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
MARKER = re.compile(r"####|the answer is", re.IGNORECASE)


def normalize(number: str) -> str | None:
    """'$1,200.' -> '1200', '18.50' -> '18.5'; None when it is not a number."""
    s = number.strip().replace("$", "").replace(",", "").rstrip(".")
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    return str(d.quantize(Decimal(1))) if d == d.to_integral_value() else str(d.normalize())


def extract_answer(completion: str) -> str | None:
    text = re.split(r"\n\s*Q:", completion, maxsplit=1)[0]
    marker = MARKER.search(text)
    if marker:
        line = text[marker.end():].split("\n", 1)[0]
        found = NUMBER.search(line)
        if found:
            return normalize(found.group())
    numbers = NUMBER.findall(text)
    return normalize(numbers[-1]) if numbers else None


def postprocess(example: Example, reply: str) -> str:
    return reply


def score(pairs: list[tuple[Example, str]], opts: Options) -> list[Verdict]:
    verdicts = []
    for ex, completion in pairs:
        got = extract_answer(completion)
        verdicts.append(Verdict(got is not None and got == ex.answer, got or ""))
    return verdicts


def summarize(pairs: list[tuple[Example, str]], verdicts: list[Verdict], opts: Options) -> dict:
    correct = sum(v.correct for v in verdicts)
    return {"accuracy": correct / len(verdicts) if verdicts else 0.0, "correct": correct}
