"""HumanEval: 164 Python functions to complete, scored by running their unit tests (pass@k).

Data: the standard JSONL (gzip OK) of {task_id, prompt, canonical_solution, test, entry_point}
(../shared/data/eval/HumanEval.jsonl.gz, or hf:openai/openai_humaneval:test). Samples: the standard
{"task_id", "completion"} rows, where the program run is `prompt + completion + test + check(entry_point)`, exactly as
in OpenAI's human-eval; several rows per task give pass@k for every k up to the number of samples.

Prompt: one user message, "Complete the following Python function:\\n```python\\n{prompt}```".
From the reply to a completion (`postprocess`, the rule in one place):
  1. the code is the first ```python (or bare ```) block that defines the entry point, else the first block, else the
     whole reply; an unclosed block runs to the end of the reply;
  2. if the code defines `def <entry_point>(` at the top level, it is a whole program: the completion is "\\n" + code,
     appended after the prompt, whose stub (signature + docstring, a valid function) it redefines. The prompt's
     imports and helper functions stay in scope;
  3. otherwise the code is the function's body: lines that are not indented get four spaces, so the prompt's
     signature is kept and the body continues it.
Execution: imtune.tasks.sandbox runs each program as a checked run in two bubblewrap sandboxes (no network, no host
files, own PID namespace, process/memory/CPU/file limits): one runs prompt + completion and answers calls to the entry
point; the other runs the prompt (completed with `pass`), the test and `check(entry_point)`, with the entry point a
proxy whose calls and results cross between them as plain Python literals (only exact bool, int, float, str, None and
list/tuple/dict/set of them). A pass is counted only when the checker reports, with a token the completion's process
never holds, that `check(entry_point)` returned: an exit status is never a pass, and the completion cannot patch the
check or the harness, forge the token or hand the check an object that equals anything. Scored this way, each
HumanEval canonical solution still passes; an argument the function changes in place is changed only in its own
copy (no HumanEval test looks). Without bubblewrap, scoring refuses unless --unsafe-no-sandbox.
pass@k: the unbiased estimator of Chen et al. (2021), 1 - C(n-c, k) / C(n, k), in its numerically stable product form.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from math import prod

from imtune.tasks import Verdict, read_rows, text_field
from imtune.tasks.sandbox import Checked, find_sandbox, run_programs
from imtune.types import Message, UsageError

HEADLINE = "pass@1"  # the one number this benchmark is reported by (imtune.tasks.headline)
KEY_FIELDS = ("task_id",)
INSTRUCTION = "Complete the following Python function:\n```python\n{prompt}```"


@dataclass(frozen=True)
class Options:
    n_samples: int = 1
    """completions generated per problem (pass@k needs at least k; sample with --temperature > 0)"""
    k: tuple[int, ...] = (1, 10, 100)
    """report pass@k for each of these k that is at most the samples per problem"""
    timeout: float = 10.0
    """seconds each program may run"""
    memory_mb: int = 1024
    """address-space limit of each program"""
    workers: int = 2
    """programs run at once"""
    unsafe_no_sandbox: bool = False
    """run model code even where bubblewrap cannot isolate it (it can then reach your files and the network)"""


@dataclass(frozen=True)
class Problem:
    key: tuple[str]  # (task_id,)
    messages: tuple[Message, ...]
    reference: str  # the canonical solution (a completion of the prompt)
    prompt: str
    test: str
    entry_point: str


def label(opts: Options) -> str:
    return "humaneval"


def max_new_tokens(opts: Options) -> int:
    return 512


def load(data: str, limit: int | None, opts: Options) -> list[Problem]:
    if opts.n_samples < 1 or opts.workers < 1 or opts.timeout <= 0 or opts.memory_mb < 64:
        raise UsageError("humaneval: --n-samples and --workers must be >= 1, --timeout > 0, --memory-mb >= 64")
    problems = []
    for where, r in read_rows(data)[:limit]:
        prompt = text_field(where, r, "prompt")
        problems.append(Problem((text_field(where, r, "task_id"),),
                                (Message("user", INSTRUCTION.format(prompt=prompt)),),
                                text_field(where, r, "canonical_solution"), prompt, text_field(where, r, "test"),
                                text_field(where, r, "entry_point")))
    find_sandbox(opts.unsafe_no_sandbox)  # refuse before generating, not after
    return problems


FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def extract_code(reply: str, entry_point: str) -> str:
    blocks = FENCE.findall(reply)
    for block in blocks:
        if re.search(rf"^def {re.escape(entry_point)}\s*\(", block, re.MULTILINE):
            return block
    return blocks[0] if blocks else reply


def postprocess(problem: Problem, reply: str) -> str:
    code = extract_code(reply, problem.entry_point).rstrip()
    if re.search(rf"^def {re.escape(problem.entry_point)}\s*\(", code, re.MULTILINE):
        return "\n" + code + "\n"
    lines = code.split("\n")
    while lines and not lines[0].strip():
        lines.pop(0)
    if lines and not lines[0].startswith((" ", "\t")):
        lines = ["    " + line if line.strip() else line for line in lines]
    return "\n".join(lines) + "\n"


def program(problem: Problem, completion: str) -> Checked:
    """The official program `prompt + completion + test + check(entry_point)`, split where trust changes: the prompt
    and completion run in one sandbox, where the completion's function answers calls; the test and the check call in
    another, after the prompt completed with `pass` (its imports and helpers are in scope, as in the official program;
    its stub is then replaced by a proxy of the completion's function)."""
    return Checked(function=(f"{problem.prompt}{completion}\n",), name=problem.entry_point,
                   setup=(f"{problem.prompt}\n    pass\n", f"{problem.test}\n"),
                   check=f"check({problem.entry_point})\n")


def score(pairs: list[tuple[Problem, str]], opts: Options, progress: bool = False) -> list[Verdict]:
    outcomes = run_programs([program(p, c) for p, c in pairs], opts.timeout, opts.memory_mb, opts.workers,
                            progress=progress, unsafe_no_sandbox=opts.unsafe_no_sandbox)
    return [Verdict(o.passed, str(o)) for o in outcomes]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn from n (c of them correct) is correct."""
    if n - c < k:
        return 1.0
    return 1.0 - prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def summarize(pairs: list[tuple[Problem, str]], verdicts: list[Verdict], opts: Options) -> dict:
    counts: dict[tuple, list[int]] = {}
    for (p, _), v in zip(pairs, verdicts):
        nc = counts.setdefault(p.key, [0, 0])
        nc[0] += 1
        nc[1] += v.correct
    fewest = min(n for n, _ in counts.values())
    ks = sorted({k for k in opts.k if k <= fewest} | {1})
    result = {f"pass@{k}": sum(pass_at_k(n, c, k) for n, c in counts.values()) / len(counts) for k in ks}
    result["solved"] = sum(c > 0 for _, c in counts.values())
    return result
