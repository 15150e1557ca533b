"""AlpacaEval-style pairwise judging: how often a judge model prefers our outputs to reference outputs.

Each (instruction, model output, reference output) is judged twice, once with the model output as "Output (a)"
and once as "Output (b)", so a judge's taste for a position cancels out. A pair is a win if the model output is
preferred in both orders, a loss if the reference is, and a tie otherwise (the judge disagreed with itself, or a
reply could not be parsed — those are counted and reported). Win rate = (wins + ties / 2) / n, the
length-uncontrolled AlpacaEval measure, with its standard error.

The judge is any OpenAI-compatible chat endpoint (`imtune serve`, vLLM, OpenAI, ...), called with urllib.
Replies are cached in SQLite under a hash of (judge model, prompt), so a re-run costs no requests; the cached reply
text is re-parsed every run, so a better parser needs no new requests either."""
from __future__ import annotations

import hashlib
import json
import math
import re
import sqlite3
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from ..types import DataError, Problem, UsageError

# After AlpacaEval's `alpaca_eval_gpt4` annotator prompt (reworded): answer with "Output (a)" or "Output (b)".
JUDGE_SYSTEM = "You are a helpful instruction-following assistant that compares answers fairly."
JUDGE_PROMPT = """Select the output (a) or (b) that best matches the given instruction. Choose your preferred \
output, which can be subjective. Your answer should ONLY contain: Output (a) or Output (b). Here's an example:

# Example:
## Instruction:
Give a description of the following job: "ophthalmologist"

## Output (a):
An ophthalmologist is a medical doctor who specializes in the diagnosis and treatment of eye diseases and conditions.

## Output (b):
An ophthalmologist is a medical doctor who pokes and prods at your eyes while asking you to read letters from a chart.

## Which is best, Output (a) or Output (b)?
Output (a)

# Task:
Now is the best time to select the best output for the given instruction.

## Instruction:
{instruction}

## Output (a):
{output_a}

## Output (b):
{output_b}

## Which is best, Output (a) or Output (b)?"""


def judge_messages(instruction: str, output_a: str, output_b: str) -> list[dict]:
    user = JUDGE_PROMPT.format(instruction=instruction, output_a=output_a, output_b=output_b)
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


# ---------------------------------------------------------------------------------------------------------------
# Parsing a reply and scoring pairs: pure functions.
_LABEL = r"(?:output|answer|response)\s*[\(\[]?\s*([ab])\s*[\)\]]?(?![a-z0-9])"
_BARE = re.compile(r"(?:(?:the\s+)?(?:best|better|preferred|winner|answer)(?:\s+(?:one|output))?\s*(?:is|:)\s*)?"
                   r"(?:output|answer|response)?\s*[\(\[]?\s*([ab])\s*[\)\]]?\s*[.!]?")
_AFTER = re.compile(_LABEL + r"\s+(?:is|was|seems|appears)\s+(?:clearly\s+|much\s+|slightly\s+)?"
                    r"(?:the\s+)?(?:better|best|preferred|superior|more\s+\w+|winner)")
_BEFORE = re.compile(r"(?:prefer(?:red)?|choose|chose|choice|select(?:ed)?|pick|best|better|winner|answer)"
                     r"(?:\s+(?:is|would\s+be|one\s+is|output\s+is))?\s*[:\-]?\s*" + _LABEL)


def parse_preference(reply: str | None) -> str | None:
    """'a' or 'b' for the output the judge prefers; None when the reply does not say (or says both ways)."""
    if not reply:
        return None
    text = re.sub(r"[*_`#\"'>]", " ", reply.lower())
    text = re.sub(r"\s+", " ", text).strip()
    m = _BARE.fullmatch(text)
    if m:
        return m.group(1)
    first = next((ln for ln in re.sub(r"[*_`#\"'>]", " ", reply.lower()).splitlines() if ln.strip()), "")
    for scope in (first, text):
        labels = set(re.findall(_LABEL, scope))
        if len(labels) == 1:
            return labels.pop()
    for pattern in (_AFTER, _BEFORE):
        found = {m.group(1) for m in pattern.finditer(text)}
        if len(found) == 1:
            return found.pop()
    return None


def pair_outcome(model_first: str | None, reference_first: str | None) -> str:
    """'win' | 'loss' | 'tie' from the two preferences: `model_first` with the model output as (a),
    `reference_first` with the reference as (a)."""
    if model_first == "a" and reference_first == "b":
        return "win"
    if model_first == "b" and reference_first == "a":
        return "loss"
    return "tie"


def win_rate(outcomes: list[str]) -> dict:
    """{"n", "wins", "losses", "ties", "win_rate" (0-1), "standard_error"} with a tie counted as half a win."""
    n = len(outcomes)
    wins, losses = outcomes.count("win"), outcomes.count("loss")
    ties = n - wins - losses
    if n == 0:
        return {"n": 0, "wins": 0, "losses": 0, "ties": 0, "win_rate": None, "standard_error": None}
    scores = [1.0 if o == "win" else 0.0 if o == "loss" else 0.5 for o in outcomes]
    rate = sum(scores) / n
    var = sum((s - rate) ** 2 for s in scores) / (n - 1) if n > 1 else 0.0
    return {"n": n, "wins": wins, "losses": losses, "ties": ties, "win_rate": rate,
            "standard_error": math.sqrt(var / n)}


# ---------------------------------------------------------------------------------------------------------------
# The endpoint, the cache.
def chat_url(base: str) -> str:
    """`http://h:p`, `http://h:p/v1` or a full `.../chat/completions` URL -> the chat-completions URL."""
    url = base.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"--judge-url {base!r}: give an http(s) URL such as http://127.0.0.1:8000/v1")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


class JudgeError(UsageError):
    """The judge endpoint failed in a way retrying does not fix."""


@dataclass
class JudgeClient:
    url: str  # the chat-completions URL (see chat_url)
    model: str
    api_key: str | None = None
    max_tokens: int = 32
    timeout: float = 600.0
    retries: int = 3

    def ask(self, messages: list[dict]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0,
                           "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in range(self.retries + 1):
            try:
                req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    reply = json.loads(resp.read())
                return reply["choices"][0]["message"].get("content") or ""
            except urllib.error.HTTPError as e:
                detail = e.read().decode("utf-8", "replace")[:500]
                if e.code not in (408, 409, 429) and e.code < 500 or attempt == self.retries:
                    raise JudgeError(f"judge {self.url} answered HTTP {e.code}: {detail}") from None
            except TimeoutError:
                # Not retried: the endpoint is slow, not down, and a retry would queue the same work again.
                raise JudgeError(f"the judge at {self.url} did not answer within {self.timeout:g} s; raise --timeout "
                                 "or lower --workers (answers so far are cached)") from None
            except (urllib.error.URLError, ConnectionError) as e:
                if isinstance(getattr(e, "reason", None), TimeoutError):
                    raise JudgeError(f"the judge at {self.url} did not answer within {self.timeout:g} s; raise "
                                     "--timeout or lower --workers (answers so far are cached)") from None
                if attempt == self.retries:
                    raise JudgeError(f"cannot reach the judge at {self.url}: {getattr(e, 'reason', e)}") from None
            except (KeyError, IndexError, TypeError, json.JSONDecodeError) as e:
                raise JudgeError(f"judge {self.url} did not answer in the chat-completions shape: {e!r}") from None
            time.sleep(min(2 ** attempt, 30))
        raise AssertionError("unreachable")


def cache_key(judge_model: str, messages: list[dict]) -> str:
    return hashlib.sha256(json.dumps([judge_model, messages], ensure_ascii=False).encode()).hexdigest()


class JudgeCache:
    """Replies keyed by cache_key, in one SQLite file (None: in memory only). Used from one thread."""

    def __init__(self, path: str | Path | None):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path) if path else ":memory:")
        self.db.execute("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, model TEXT, reply TEXT, "
                        "created REAL)")

    def get(self, key: str) -> str | None:
        row = self.db.execute("SELECT reply FROM replies WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def put(self, key: str, model: str, reply: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?)", (key, model, reply, time.time()))
        self.db.commit()

    def close(self) -> None:
        self.db.close()


# ---------------------------------------------------------------------------------------------------------------
# Inputs: model outputs (JSONL or JSON array of {instruction|prompt, output}) and references (same shape).
def _instruction(row: dict) -> str | None:
    if isinstance(row.get("instruction"), str):
        return row["instruction"]
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):  # messages: the last user message
        users = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return users[-1] if users and isinstance(users[-1], str) else None
    return None


def read_outputs(path: str | Path) -> list[dict]:
    """Rows of {instruction, output, generator} from a JSON array or JSONL file; problems say path:line."""
    from ..load import read_records  # the one JSON/JSONL reader: path:line per record, U+2028 kept inside strings

    _, items = read_records(str(path))
    rows, problems = [], []
    for where, r in items:
        if isinstance(r, Problem):
            problems.append(r)
            continue
        if not isinstance(r, dict):
            problems.append(Problem(where, "", "each record must be an object with instruction (or prompt), output"))
            continue
        instruction = _instruction(r)
        output = next((r[k] for k in ("output", "response", "completion") if isinstance(r.get(k), str)), None)
        if instruction is None:
            problems.append(Problem(where, "instruction", "missing: give `instruction` or `prompt`"))
        elif output is None:
            problems.append(Problem(where, "output", "missing or not a string"))
        else:
            rows.append({"instruction": instruction, "output": output, "generator": r.get("generator")})
    if problems:
        raise DataError(problems)
    return rows


def pair_up(outputs: list[dict], references: list[dict], limit: int | None = None) -> tuple[list[dict], int]:
    """Pairs {instruction, output, reference} in the references' order, matched on the instruction text (stripped);
    also the number of model outputs with no reference."""
    by_text = {}
    for r in outputs:
        by_text.setdefault(r["instruction"].strip(), r)
    pairs, used = [], set()
    for ref in references:
        key = ref["instruction"].strip()
        if key in by_text and key not in used:
            used.add(key)
            pairs.append({"instruction": ref["instruction"], "output": by_text[key]["output"],
                          "reference": ref["output"]})
    if limit:
        pairs = pairs[:limit]
    return pairs, len(by_text) - len(used)


# ---------------------------------------------------------------------------------------------------------------
def judge_pairs(pairs: list[dict], client: JudgeClient, cache: JudgeCache, workers: int = 4,
                progress: bool = False) -> dict:
    """Judge every pair in both orders (cached), score it, and summarise.

    Returns {"summary": win_rate(...) + unparseable counts, requests, cache hits, "pairs": per-pair records}."""
    prompts: dict[str, list[dict]] = {}
    plan = []  # per pair: (key with model output first, key with reference first)
    for p in pairs:
        keys = []
        for first, second in ((p["output"], p["reference"]), (p["reference"], p["output"])):
            msgs = judge_messages(p["instruction"], first, second)
            k = cache_key(client.model, msgs)
            prompts[k] = msgs
            keys.append(k)
        plan.append(tuple(keys))
    replies = {k: r for k in prompts if (r := cache.get(k)) is not None}
    missing = [k for k in prompts if k not in replies]
    if missing:
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(missing), desc="judge", unit="request")
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            futures = {pool.submit(client.ask, prompts[k]): k for k in missing}
            try:
                for f in as_completed(futures):
                    k = futures[f]
                    replies[k] = f.result()
                    cache.put(k, client.model, replies[k])  # saved as it arrives: an interrupted run keeps its work
                    if bar:
                        bar.update()
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
            finally:
                if bar:
                    bar.close()
    records, outcomes, unparsed = [], [], 0
    for p, (k1, k2) in zip(pairs, plan):
        a, b = parse_preference(replies[k1]), parse_preference(replies[k2])
        unparsed += (a is None) + (b is None)
        outcome = pair_outcome(a, b)
        outcomes.append(outcome)
        records.append({**p, "reply_model_first": replies[k1], "reply_reference_first": replies[k2],
                        "preference_model_first": a, "preference_reference_first": b, "outcome": outcome})
    summary = win_rate(outcomes)
    parsed = [o for o, r in zip(outcomes, records)
              if r["preference_model_first"] is not None and r["preference_reference_first"] is not None]
    summary.update({
        "win_rate_parsed_pairs": win_rate(parsed)["win_rate"],
        "judgements": 2 * len(pairs), "unparseable_judgements": unparsed,
        "pairs_with_unparseable": len(pairs) - len(parsed),
        "inconsistent_pairs": sum(1 for o, r in zip(outcomes, records) if o == "tie"
                                  and r["preference_model_first"] is not None
                                  and r["preference_reference_first"] is not None),
        "requests": len(missing), "cache_hits": len(prompts) - len(missing), "unique_prompts": len(prompts),
        "judge_model": client.model, "judge_url": client.url})
    return {"summary": summary, "pairs": records}


def markdown(summary: dict, outputs_name: str, references_name: str) -> str:
    s = summary
    rate = "n/a" if s["win_rate"] is None else f"{100 * s['win_rate']:.1f} ± {100 * s['standard_error']:.1f}"
    return "\n".join([
        f"# Pairwise judgement: {outputs_name} vs {references_name}", "",
        f"Judge: `{s['judge_model']}` at {s['judge_url']}; each pair judged in both orders.", "",
        "| n | wins | losses | ties | win rate % (± s.e.) | inconsistent | unparseable replies |",
        "|---|---|---|---|---|---|---|",
        f"| {s['n']} | {s['wins']} | {s['losses']} | {s['ties']} | {rate} | {s['inconsistent_pairs']} "
        f"| {s['unparseable_judgements']} of {s['judgements']} |", ""])
