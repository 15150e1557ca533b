"""The model behind a queue: `imtune serve`'s generation side. A request is admitted (bounded queue), checked
against the limits, planned (prompt ids, sampling, stop strings) and generated on one worker thread while the
event loop streams its pieces; imtune.serve.app is the HTTP side."""
from __future__ import annotations

import asyncio
import logging
import math
import queue
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from imtune.model.generate import STOP_STRINGS, stop_token_ids
from imtune.serve.request import ApiError, ChatRequest, messages_of
from imtune.types import Conversation, Message, UsageError, Where

GREEDY_BELOW = 1e-5  # temperatures below this decode greedily
READ_WAIT = 0.1  # seconds the stream's reader waits for text before it looks whether the generation has ended
log = logging.getLogger("uvicorn.error")

GREEDY_BELOW = 1e-5  # temperatures below this decode greedily


READ_WAIT = 0.1  # seconds the stream's reader waits for text before it looks whether the generation has ended


# ---------------------------------------------------------------------------------------------------------------
# The prompt: the template's text, contents tokenized as plain text.
def control_texts(tokenizer) -> list[str]:
    """Texts the tokenizer turns into special/added tokens ("<|im_end|>", ...)."""
    found = set(getattr(tokenizer, "all_special_tokens", []) or [])
    found |= {getattr(t, "content", str(t)) for t in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values()}
    return sorted(t for t in found if t)


def prompt_ids(tokenizer, renderer, messages: list[Message]) -> list[int]:
    """Token ids of the generation prompt. The template's own text may hold control tokens; message contents never
    do: a content that spells one is tokenized as plain text (split_special_tokens), so it cannot end a turn or
    open a new one. Contents without such text give exactly the ids of tokenizing the whole prompt once."""
    text = renderer.prompt(messages)
    controls = control_texts(tokenizer)
    if not any(c in m.content for m in messages for c in controls):
        return tokenizer(text, add_special_tokens=False).input_ids
    rendered = renderer.render(Conversation(tuple(messages), Where("request", 0)))
    if not text.startswith(rendered.text):
        raise ApiError(400, f"template {renderer.name!r} renders the prompt differently from the conversation; "
                            "cannot place message contents", param="messages")
    ids, pos = [], 0
    for span in sorted((s for s in rendered.spans if s.cls in ("system", "user", "assistant")), key=lambda s: s.start):
        ids += tokenizer(text[pos:span.start], add_special_tokens=False).input_ids
        ids += tokenizer(text[span.start:span.end], add_special_tokens=False, split_special_tokens=True).input_ids
        pos = span.end
    return ids + tokenizer(text[pos:], add_special_tokens=False).input_ids


# ---------------------------------------------------------------------------------------------------------------
# The model behind a queue.
@dataclass
class Served:
    """A loaded model and what the server needs to answer for it."""

    model: object
    tokenizer: object
    renderer: object
    name: str
    max_context: int  # prompt + completion tokens
    default_max_tokens: int = 256
    body_timeout: float = 30.0  # seconds a client has to send its request's headers, and then its body
    max_tokens_limit: int = 1024  # the largest max_tokens accepted (never more than max_context)
    max_queue: int = 16  # requests waiting for the model (besides the one generating); more get 429
    api_key: str | None = None  # when set: `Authorization: Bearer KEY` on every path but /health
    allowed_hosts: tuple[str, ...] = ("127.0.0.1", "localhost", "[::1]")  # Host headers answered (DNS rebinding)
    created: int = field(default_factory=lambda: int(time.time()))
    counts: dict = field(default_factory=lambda: {"chat_completions": 0, "errors": 0, "cancelled": 0,
                                                  "prompt_tokens": 0, "completion_tokens": 0})
    in_flight: int = 0  # admitted requests: reading, tokenizing, waiting for the model or generating
    seconds_per_request: float = 1.0  # a running average of the model's time per request (for Retry-After)
    stopping: threading.Event = field(default_factory=threading.Event)  # set at shutdown: stop every generation
    generating: threading.Event = field(default_factory=threading.Event)  # set while the model's thread is in use

    def __post_init__(self):
        self.max_tokens_limit = min(self.max_tokens_limit, self.max_context)
        self.default_max_tokens = min(self.default_max_tokens, self.max_tokens_limit)


@dataclass
class Job:
    """One request's generation: its prompt, settings and the flag that stops it."""

    ids: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    stops: list[str]
    cancel: threading.Event = field(default_factory=threading.Event)


def admit(served: Served) -> None:
    """One more request in flight, or ApiError(429) with Retry-After when max_queue requests wait already."""
    if served.in_flight > served.max_queue:
        wait = min(60, max(1, math.ceil(served.seconds_per_request * served.in_flight)))
        raise ApiError(429, f"the server is busy: {served.in_flight - 1} requests wait for the model "
                            f"(--max-queue {served.max_queue}); retry in {wait} s", kind="rate_limit_error",
                       code="queue_full", headers={"Retry-After": str(wait)})
    served.in_flight += 1


def check(served: Served, req: ChatRequest) -> None:
    """What can be refused before tokenizing: another model's name (404), max_tokens over the limit (400)."""
    if req.model is not None and req.model != served.name:
        raise ApiError(404, f"the model {req.model!r} does not exist; this server serves {served.name!r}",
                       kind="invalid_request_error", param="model", code="model_not_found")
    asked = req.max_completion_tokens or req.max_tokens
    if asked is not None and asked > served.max_tokens_limit:
        raise ApiError(400, f"max_tokens is {asked}; this server allows at most {served.max_tokens_limit} "
                            "(--max-tokens-limit)", param="max_tokens")


def plan(served: Served, req: ChatRequest, cancel: threading.Event) -> Job:
    """The request tokenized and checked against the context, as a Job; ApiError when it cannot run. Runs in the
    tokenizer's thread: a long prompt takes seconds to render and encode, and the event loop serves others."""
    import jinja2

    try:
        ids = prompt_ids(served.tokenizer, served.renderer, messages_of(req))
    except (UsageError, jinja2.TemplateError) as e:  # the template refuses these messages (raise_exception, ...)
        raise ApiError(400, f"the chat template cannot render these messages: {e}", param="messages") from None
    room = served.max_context - len(ids)
    asked = req.max_completion_tokens or req.max_tokens
    if room < 1 or (asked is not None and asked > room):
        raise ApiError(400, f"this model's maximum context length is {served.max_context} tokens; the messages "
                            f"have {len(ids)}" + (f" and max_tokens asks {asked} more" if asked else ""),
                       param="messages", code="context_length_exceeded")
    temperature = 1.0 if req.temperature is None else req.temperature  # OpenAI's default
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return Job(ids, asked or min(served.default_max_tokens, room), temperature if temperature >= GREEDY_BELOW else 0.0,
               1.0 if req.top_p is None else req.top_p,
               req.seed if req.seed is not None else secrets.randbelow(2**31), [s for s in stops if s], cancel)


def run_generation(served: Served, job: Job, streamer) -> int:
    """model.generate for one job, feeding `streamer`; returns the number of new tokens. Runs in the worker thread.
    Whatever happens, the stream is ended (the reader also stops on its own once this has returned or raised)."""
    served.generating.set()
    try:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        class Cancelled(StoppingCriteria):  # transformers' hook for stopping a generation from outside
            def __call__(self, input_ids, scores, **kwargs):
                flag = job.cancel.is_set() or served.stopping.is_set()
                return torch.full((input_ids.shape[0],), flag, dtype=torch.bool, device=input_ids.device)

        device = next(served.model.parameters()).device
        ids = torch.tensor([job.ids], device=device)
        sample = job.temperature > 0
        torch.manual_seed(job.seed)
        with torch.no_grad():
            out = served.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=job.max_new_tokens,
                do_sample=sample, temperature=job.temperature if sample else None,
                top_p=job.top_p if sample else None, top_k=None,
                eos_token_id=stop_token_ids(served.tokenizer, served.renderer),
                pad_token_id=served.tokenizer.pad_token_id, streamer=streamer,
                stopping_criteria=StoppingCriteriaList([Cancelled()]))
    except BaseException:
        streamer.end()  # the reader waits for the end of the stream: give it one
        raise
    finally:
        served.generating.clear()
    return out.shape[1] - ids.shape[1]


def _cut(text: str, stops: list[str]) -> tuple[str, bool]:
    """`text` up to the first stop string, and whether one was found."""
    at = min((i for s in stops if (i := text.find(s)) != -1), default=-1)
    return (text, False) if at == -1 else (text[:at], True)


NOTHING_YET = object()


def _next_text(streamer):
    """The streamer's next text; None at its end; NOTHING_YET when none came within the streamer's timeout."""
    try:
        return next(streamer)
    except StopIteration:
        return None
    except queue.Empty:
        return NOTHING_YET


async def _texts(streamer, done):
    """The generation's texts as they come, until the stream ends, or until `done` (the generation's future) has
    finished and nothing more came: a generation that dies without ending its stream cannot leave this waiting."""
    loop, finished = asyncio.get_running_loop(), False
    while True:
        text = await loop.run_in_executor(None, _next_text, streamer)
        if text is None or (text is NOTHING_YET and finished):
            return
        if text is NOTHING_YET:
            finished = done.done()  # all it put is in the queue now: one more look, then stop
            continue
        yield text


async def pieces(served: Served, job: Job, lock: asyncio.Lock, pool: ThreadPoolExecutor, client_gone=None):
    """Async generator of the completion's text deltas, then one final dict {"finish_reason", "completion_tokens"}.
    Waits its turn for the model; text after a stop string (the request's, or a template's next role tag) is never
    sent, and reaching one stops the generation. `client_gone()` (awaitable) is asked once the model is free and
    after every delta: a client that left is not generated for. A generation that raises frees the model and
    raises here."""
    from transformers import TextIteratorStreamer

    stops = job.stops + [s for s in (*STOP_STRINGS, *served.renderer.eot_markers) if s]
    hold = max(len(s) for s in stops) - 1  # characters kept back: they may start a stop string
    async with lock:
        if served.stopping.is_set():
            raise ApiError(503, "the server is shutting down", kind="server_error")
        if job.cancel.is_set() or (client_gone is not None and await client_gone()):
            raise ApiError(499, "the client closed the connection")
        loop, started = asyncio.get_running_loop(), time.monotonic()
        streamer = TextIteratorStreamer(served.tokenizer, skip_prompt=True, skip_special_tokens=False,
                                        timeout=READ_WAIT)
        done = loop.run_in_executor(pool, run_generation, served, job, streamer)
        text, sent, stopped = "", 0, False
        try:
            async for delta in _texts(streamer, done):
                if stopped:  # the last tokens before the generation noticed the stop
                    continue
                text += delta
                text, stopped = _cut(text, stops)
                if stopped or (client_gone is not None and await client_gone()):
                    job.cancel.set()
                safe = len(text) if stopped else max(sent, len(text) - hold)
                if safe > sent:
                    yield text[sent:safe]
                    sent = safe
            n_tokens = await done
        except BaseException:
            job.cancel.set()  # the client went away, we are stopping, or the generation raised: free the model
            await asyncio.shield(done)  # not before the generation has returned: one at a time on the model
            raise
        served.seconds_per_request = 0.8 * served.seconds_per_request + 0.2 * (time.monotonic() - started)
    if len(text) > sent:
        yield text[sent:]
    if served.stopping.is_set() and not stopped and n_tokens < job.max_new_tokens:
        finish = "cancelled"
    else:
        finish = "stop" if stopped or n_tokens < job.max_new_tokens else "length"
    yield {"finish_reason": finish, "completion_tokens": n_tokens}


async def produce(served: Served, req: ChatRequest, cancel: threading.Event, lock, pools, out: asyncio.Queue,
                  client_gone=None) -> None:
    """One admitted request, as a task of its own: tokenize (in the tokenizer's thread), wait for the model,
    generate. Puts the Job, the text deltas and the final dict on `out`, or an ApiError where it stops (500 for an
    exception of ours, the model's or torch's). It, not the response, holds the model and the request's place in
    the queue, so both are given back even when the response is never read."""
    try:
        job = await asyncio.get_running_loop().run_in_executor(pools["tokenize"], plan, served, req, cancel)
        out.put_nowait(job)
        async for p in pieces(served, job, lock, pools["generate"], client_gone):
            out.put_nowait(p)
    except ApiError as e:
        out.put_nowait(e)
    except asyncio.CancelledError:
        out.put_nowait(ApiError(503, "the server is shutting down", kind="server_error"))
        raise
    except Exception as e:
        log.exception("imtune serve: a request failed in tokenizing or generating")
        out.put_nowait(ApiError(500, f"the server failed on this request ({type(e).__name__}); its log has the "
                                     "traceback", kind="server_error"))
    finally:
        served.in_flight -= 1


async def stream_items(out: asyncio.Queue, cancel: threading.Event):
    """What a producer puts on `out`, up to its final dict; its ApiError is raised here. A consumer that stops
    early (the client left) stops the generation."""
    try:
        while True:
            item = await out.get()
            if isinstance(item, ApiError):
                raise item
            yield item
            if isinstance(item, dict):
                return
    finally:
        cancel.set()
