"""LLM-judge protocols and their plumbing: AlpacaEval 1.0 pairwise ranking, and the judge endpoint with its cache.

AlpacaEval 1.0 (the `alpaca_eval_gpt4` annotator, mirrored from the PyPI package alpaca-eval 0.6.6, files
`alpaca_eval/evaluators_configs/alpaca_eval_gpt4/{configs.yaml,alpaca_eval.txt}`, `utils.make_prompts`,
`utils.prompt_to_chatml`, `completion_parsers.ranking_parser` and `metrics/helpers.py`): the judge sees the
instruction and two outputs as Python dictionaries and returns a ranking `[{'model': 'model_1', 'rank': 1}, ...]`,
read with `ast.literal_eval`; temperature 0, at most 100 reply tokens. (The package itself is not imported: it
needs `pkg_resources`, which setuptools >= 81 no longer ships, and drags in its own OpenAI client code.)

AlpacaEval asks once per pair in a random order; here every pair is asked in both orders (the reference as
model_1, then the model's output as model_1), so a judge's taste for a position cancels out. Each parseable reply
is a preference in AlpacaEval's encoding (1: reference better, 2: model better); a pair's preference is the mean of
its parseable replies (1.5: the two orders disagree, a tie); a pair with no parseable reply is dropped, as
AlpacaEval drops NaN preferences, and counted. Win rate = mean(preference - 1) = (wins + ties / 2) / n, the
length-uncontrolled AlpacaEval 1.0 measure, with its standard error (ddof 1), both as fractions.

The judge is any OpenAI-compatible chat endpoint (`imtune serve`, vLLM, OpenAI, ...), called with urllib.
The API key goes only where it cannot be read on the way: an https URL or this machine (127.0.0.0/8, ::1,
localhost), unless the user opts in (`key_anywhere`, --judge-key-anywhere); redirects are never followed, so the key
never travels to a host the user did not name.
Replies are cached in SQLite under a hash of (judge model, prompt), so a re-run costs no requests; the cached reply
text is re-parsed every run, so a better parser needs no new requests either."""
from __future__ import annotations

import ast
import hashlib
import ipaddress
import json
import math
import os
import sqlite3
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from imtune import files
from imtune.data.records import read_records
from imtune.files import cache_dir
from imtune.report.render import md_code
from imtune.types import DataError, Problem, UsageError

# alpaca_eval/evaluators_configs/alpaca_eval_gpt4/alpaca_eval.txt (alpaca-eval 0.6.6, Apache-2.0), verbatim.
ALPACA_EVAL_GPT4 = '''<|im_start|>system
You are a helpful assistant, that ranks models by the quality of their answers.
<|im_end|>
<|im_start|>user
I want you to create a leaderboard of different of large-language models. To do so, I will give you the instructions (prompts) given to the models, and the responses of two models. Please rank the models based on which responses would be preferred by humans. All inputs and outputs should be python dictionaries.

Here is the prompt:
{
    "instruction": """{instruction}""",
}

Here are the outputs of the models:
[
    {
        "model": "model_1",
        "answer": """{output_1}"""
    },
    {
        "model": "model_2",
        "answer": """{output_2}"""
    }
]

Now please rank the models by the quality of their answers, so that the model with rank 1 has the best output. Then return a list of the model names and ranks, i.e., produce the following output:
[
    {'model': <model-name>, 'rank': <model-rank>},
    {'model': <model-name>, 'rank': <model-rank>}
]

Your response must be a valid Python dictionary and should contain nothing else because we will directly execute it in Python. Please provide the ranking that the majority of humans would give.
<|im_end|>'''  # noqa: E501 (verbatim upstream prompt)
ALPACA_EVAL_MAX_TOKENS = 100  # alpaca_eval_gpt4/configs.yaml: completions_kwargs max_tokens 100, temperature 0


def prompt_to_chatml(prompt: str) -> list[dict]:
    """alpaca_eval.utils.prompt_to_chatml: `<|im_start|>ROLE\n...<|im_end|>` blocks -> chat messages (stripped)."""
    messages = []
    for block in prompt.strip().split("<|im_start|>")[1:]:
        role, _, rest = block.partition("\n")
        messages.append({"role": role.strip(), "content": rest.split("<|im_end|>", 1)[0].strip()})
    return messages


def judge_messages(instruction: str, output_1: str, output_2: str) -> list[dict]:
    """The alpaca_eval_gpt4 request: each placeholder's first occurrence replaced in turn, as
    alpaca_eval.utils.make_prompts does (not str.format: the template holds literal braces)."""
    prompt = ALPACA_EVAL_GPT4
    for key, value in (("instruction", instruction), ("output_1", output_1), ("output_2", output_2)):
        prompt = prompt.replace("{" + key + "}", value, 1)
    return prompt_to_chatml(prompt)


# ---------------------------------------------------------------------------------------------------------------
# Parsing a reply and scoring pairs: pure functions.
def parse_ranking(reply: str | None) -> int | None:
    """alpaca_eval.completion_parsers.ranking_parser: the rank (1 or 2) the reply gives model_1, i.e. AlpacaEval's
    preference (1: output_1 better, 2: output_2 better); None when the reply is not such a ranking."""
    if not reply:
        return None
    try:
        ranking = ast.literal_eval(reply)
        rank = [c for c in ranking if c["model"] == "model_1"][0]["rank"]
    except Exception:  # anything literal_eval or the lookups raise: not a ranking
        return None
    return rank if rank in (1, 2) and not isinstance(rank, bool) else None


def pair_preference(reference_first: int | None, model_first: int | None) -> float | None:
    """The pair's preference for the model over the reference (1: reference better, 2: model better, 1.5: tie):
    the mean of the parseable replies, each mapped to model-vs-reference. `reference_first` is the parsed reply with
    the reference as model_1, `model_first` the one with the model's output as model_1."""
    prefs = [p for p in (reference_first, None if model_first is None else 3 - model_first) if p is not None]
    return sum(prefs) / len(prefs) if prefs else None


def head2head(preferences: list[float | None]) -> dict:
    """alpaca_eval.metrics.helpers.describe_head2head, as fractions: {"n", "wins", "losses", "ties", "win_rate",
    "standard_error", "unparseable_pairs"}; None preferences are dropped (and counted)."""
    kept = [p - 1 for p in preferences if p is not None]
    n = len(kept)
    out = {"n": n, "wins": sum(p > 0.5 for p in kept), "losses": sum(p < 0.5 for p in kept),
           "ties": sum(p == 0.5 for p in kept), "unparseable_pairs": len(preferences) - n}
    if n == 0:
        return {**out, "win_rate": None, "standard_error": None}
    rate = sum(kept) / n
    var = sum((p - rate) ** 2 for p in kept) / (n - 1) if n > 1 else 0.0
    return {**out, "win_rate": rate, "standard_error": math.sqrt(var / n)}


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


def key_is_private(url: str) -> bool:
    """Whether a key sent to `url` stays between us and that host: https, or plain http to this machine."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https":
        return True
    host = (parts.hostname or "").rstrip(".").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name other than localhost: it may resolve anywhere
        return False


def _opener() -> urllib.request.OpenerDirector:
    """urllib without its redirect handler: a 3xx answer comes back as an HTTPError instead of being followed (urllib
    would resend the Authorization header to wherever the Location points)."""
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler(), urllib.request.UnknownHandler(), urllib.request.HTTPHandler(),
                    urllib.request.HTTPSHandler(), urllib.request.HTTPDefaultErrorHandler(),
                    urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


class JudgeError(UsageError):
    """The judge endpoint failed in a way retrying does not fix."""


@dataclass
class JudgeClient:
    url: str  # the chat-completions URL (see chat_url)
    model: str
    api_key: str | None = None
    max_tokens: int = ALPACA_EVAL_MAX_TOKENS
    timeout: float = 600.0
    retries: int = 3
    key_anywhere: bool = False  # send the key over plain http to other machines too (the user opted in)

    def __post_init__(self):
        if self.api_key and not self.key_anywhere and not key_is_private(self.url):
            raise UsageError(f"the judge URL {self.url} is plain http to another machine, where the API key could be "
                             "read on the way: use https, or run without the key's variable set, or pass "
                             "--judge-key-anywhere to send it anyway")

    def ask(self, messages: list[dict]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0,
                           "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        opener = _opener()
        for attempt in range(self.retries + 1):
            try:
                req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with opener.open(req, timeout=self.timeout) as resp:
                    reply = json.loads(resp.read())
                return reply["choices"][0]["message"].get("content") or ""
            except urllib.error.HTTPError as e:
                if 300 <= e.code < 400:
                    where = (e.headers.get("Location") or "")[:200]
                    raise JudgeError(f"the judge at {self.url} redirects (HTTP {e.code}) to {where!r}; redirects are "
                                     "not followed (the API key would go along): give the final URL as --judge-url if "
                                     "you trust it") from None
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
            files.make_dirs(Path(path).parent)
            files.check_target(path)  # SQLite opens (and writes) the file itself: a link or an input is refused first
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


def open_judge(url: str, model: str, api_key_env: str = "OPENAI_API_KEY", cache: str | None = None,
               max_tokens: int = ALPACA_EVAL_MAX_TOKENS, timeout: float = 600.0,
               key_anywhere: bool = False) -> tuple[JudgeClient, JudgeCache]:
    """The client and reply cache a judged benchmark uses. `cache`: a SQLite file, None for
    $IMTUNE_CACHE/judge-cache.sqlite, "none" for memory only. The API key is read from `api_key_env` (and sent over
    plain http to another machine only with `key_anywhere`)."""

    if not url or not model:
        raise UsageError("a judged benchmark needs --judge-url URL and --judge-model NAME (an OpenAI-compatible "
                         "endpoint, e.g. what `imtune serve` prints, and the model name it serves)")
    path = None if (cache or "").lower() == "none" else (cache or cache_dir() / "judge-cache.sqlite")
    client = JudgeClient(chat_url(url), model, os.environ.get(api_key_env) or None, max_tokens, timeout,
                         key_anywhere=key_anywhere)
    return client, JudgeCache(path)


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
def ask_all(prompts: dict[str, list[dict]], client: JudgeClient, cache: JudgeCache, workers: int = 4,
            progress: bool = False) -> tuple[dict[str, str], int]:
    """Replies to every prompt (keyed by cache_key): cached ones from the cache, the rest asked `workers` at a time
    and cached as they arrive (an interrupted run keeps its work). Also the number of requests sent."""
    replies = {k: r for k in prompts if (r := cache.get(k)) is not None}
    missing = [k for k in prompts if k not in replies]
    if not missing:
        return replies, 0
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
                cache.put(k, client.model, replies[k])
                if bar:
                    bar.update()
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        finally:
            if bar:
                bar.close()
    return replies, len(missing)


def judge_pairs(pairs: list[dict], client: JudgeClient, cache: JudgeCache, workers: int = 4,
                progress: bool = False) -> dict:
    """Judge every pair {instruction, output, reference} in both orders (cached) with the AlpacaEval 1.0 protocol.

    Returns {"summary": head2head(...) + counts, requests, cache hits, "pairs": per-pair records}."""
    prompts: dict[str, list[dict]] = {}
    plan = []  # per pair: (key with the reference as model_1, key with the model's output as model_1)
    for p in pairs:
        keys = []
        for first, second in ((p["reference"], p["output"]), (p["output"], p["reference"])):
            msgs = judge_messages(p["instruction"], first, second)
            k = cache_key(client.model, msgs)
            prompts[k] = msgs
            keys.append(k)
        plan.append(tuple(keys))
    replies, sent = ask_all(prompts, client, cache, workers, progress)
    records, preferences = [], []
    for p, (k1, k2) in zip(pairs, plan):
        ref_first, model_first = parse_ranking(replies[k1]), parse_ranking(replies[k2])
        pref = pair_preference(ref_first, model_first)
        preferences.append(pref)
        records.append({**p, "reply_reference_first": replies[k1], "reply_model_first": replies[k2],
                        "preference_reference_first": ref_first, "preference_model_first": model_first,
                        "preference": pref})
    summary = head2head(preferences)
    summary.update({
        "judgements": 2 * len(pairs),
        "unparseable_judgements": sum((r["preference_reference_first"] is None) + (r["preference_model_first"] is None)
                                      for r in records),
        "inconsistent_pairs": sum(1 for r in records if r["preference_reference_first"] is not None
                                  and r["preference_model_first"] is not None and r["preference"] == 1.5),
        "requests": sent, "cache_hits": len(prompts) - sent, "unique_prompts": len(prompts),
        "protocol": "alpaca_eval_gpt4 (AlpacaEval 1.0), both orders", "judge_model": client.model,
        "judge_url": client.url})
    return {"summary": summary, "pairs": records}


def markdown(summary: dict, outputs_name: str, references_name: str) -> str:
    s = summary
    rate = "n/a" if s["win_rate"] is None else f"{100 * s['win_rate']:.1f} ± {100 * s['standard_error']:.1f}"
    return "\n".join([
        f"# Pairwise judgement: {md_code(outputs_name)} vs {md_code(references_name)}", "",
        f"Judge: {md_code(s['judge_model'])} at {md_code(s['judge_url'])}; {s['protocol']}.", "",
        "| n | wins | losses | ties | win rate % (± s.e.) | inconsistent | unparseable replies | pairs dropped |",
        "|---|---|---|---|---|---|---|---|",
        f"| {s['n']} | {s['wins']} | {s['losses']} | {s['ties']} | {rate} | {s['inconsistent_pairs']} "
        f"| {s['unparseable_judgements']} of {s['judgements']} | {s['unparseable_pairs']} |", ""])
