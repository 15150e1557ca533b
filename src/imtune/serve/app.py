"""An OpenAI-compatible chat-completions server for one model: FastAPI on uvicorn, generation by transformers.

    POST /v1/chat/completions   {"model", "messages", "max_tokens", "temperature", "top_p", "seed", "stop", "stream"}
    GET  /v1/models             the one model served
    GET  /health                {"status": "ok", "model", "requests": {...}, "in_flight"}   (for tests and ops;
                                without the API key, when one is set: {"status": "ok"} only)

Why not `transformers serve`: it loads models by hub id through AutoProcessor (not imtune's `random:` models or a
run's training template), tokenizes prompts with apply_chat_template (so text that spells "<|im_end|>" becomes the
control token), answers errors as FastAPI's {"detail": ...} rather than OpenAI's {"error": {...}}, and logs and
ignores `n`, `logprobs` and `response_format`. The maintained pieces are used instead: uvicorn (HTTP/1.1 parsing by
h11, the listen backlog, graceful shutdown on SIGTERM/SIGINT), FastAPI and pydantic (request validation), Starlette's
TrustedHostMiddleware, and transformers' `generate` with its TextIteratorStreamer (streaming).

Behaviour, request by request (the request's schema, its 400s and the HTTP checks: imtune.serve.request):
- the Host header must name this server (127.0.0.1, localhost, [::1], the bound address, --allowed-host), else 400;
  with an API key, every path but /health needs `Authorization: Bearer KEY` (401); a POST must be
  application/json (415); a body over MAX_BODY bytes gets 413, a body not there within `body_timeout` seconds 408,
  and headers not there within `body_timeout` seconds a closed connection;
- at most `max_queue` requests wait for the model besides the one generating; more get 429 with Retry-After;
- the prompt is the model's (or run's) chat template rendered by imtune.data.templates, in a thread of its own (a long
  prompt does not hold up other clients); message contents are tokenized as plain text, so a user who writes
  "<|im_end|>" does not end the turn (`prompt_ids`);
- one generation at a time, in arrival order; a generation that raises frees the model and answers 500 (or ends
  its stream with an error event);
- `max_tokens` over `max_tokens_limit` (400), or a prompt plus `max_tokens` beyond the context (400,
  code "context_length_exceeded"), is refused before anything is generated; `max_tokens` absent: what fits, at
  most the server's default;
- unknown model names: 404 "model_not_found"; bad or unsupported parameters (`n` > 1, `logprobs`, a
  `response_format` other than text, `stop` that is not strings): 400 with an OpenAI-shaped error body;
  temperature below 1e-5 is greedy decoding (dividing logits by 1e-45 overflows);
- SIGTERM/SIGINT: uvicorn stops accepting, every running or queued generation is stopped, clients get their
  stream's end (or 503), and the process exits 0; if anything still runs a few seconds later, it exits 1 all the
  same (the process around the app, with uvicorn's settings: imtune.commands.serve).

What this protects against, and what not. It holds against hostile requests from anyone who can reach it: no
field outside its bounds, no body or header that ties up memory or a connection without end, no request that
leaves the model locked, no web page that talks to it through the user's browser (Host check against DNS
rebinding, JSON-only POSTs against simple cross-origin forms; no CORS headers are sent), no access without the key
when one is set (and none on a non-loopback address without one). It does not: encrypt (serving on a public
address needs a TLS reverse proxy in front, which also should limit rates), limit any one client beyond the shared
queue (one client can fill it, and others then get 429), or make an untrusted model or chat template safe.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import queue
import secrets
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from imtune.model.generate import STOP_STRINGS, stop_token_ids
from imtune.serve.request import ApiError, ChatRequest, guard, key_matches, messages_of, parse_request, read_body
from imtune.types import Conversation, Message, UsageError, Where

GREEDY_BELOW = 1e-5  # temperatures below this decode greedily
READ_WAIT = 0.1  # seconds the stream's reader waits for text before it looks whether the generation has ended
log = logging.getLogger("uvicorn.error")


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


async def _items(out: asyncio.Queue, cancel: threading.Event):
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


# ---------------------------------------------------------------------------------------------------------------
# The app.
def error_response(served: Served, e: ApiError) -> JSONResponse:
    served.counts["errors"] += 1
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def make_app(served: Served) -> FastAPI:
    """The ASGI app: Host check (Starlette's TrustedHostMiddleware), then key, media type and size (`guard`), then
    the routes."""
    app = FastAPI(title="imtune serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(guard, api_key=served.api_key, on_refusal=lambda e: error_response(served, e))
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(served.allowed_hosts), www_redirect=False)
    lock, tasks = asyncio.Lock(), set()
    pools = {"generate": ThreadPoolExecutor(max_workers=1, thread_name_prefix="imtune-generate"),
             "tokenize": ThreadPoolExecutor(max_workers=1, thread_name_prefix="imtune-tokenize")}

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(served, ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                               kind))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        return error_response(served, ApiError(400, str(exc)))

    @app.get("/health")
    async def health(request: Request):
        if served.api_key and not key_matches(served.api_key, request.headers.get("authorization")):
            return {"status": "ok"}
        return {"status": "ok", "model": served.name, "requests": dict(served.counts), "in_flight": served.in_flight}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": served.created,
                                            "owned_by": "imtune"}]}

    def start(req: ChatRequest, client_gone) -> tuple[asyncio.Queue, threading.Event]:
        """The producer task of an admitted request (it gives the request's place back when it ends)."""
        out, cancel = asyncio.Queue(), threading.Event()
        task = asyncio.create_task(produce(served, req, cancel, lock, pools, out, client_gone))
        tasks.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(tasks.discard)
        return out, cancel

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        served.counts["chat_completions"] += 1  # every request to the route, answered or refused
        admitted = False
        try:
            admit(served)
            admitted = True
            req = parse_request(await read_body(request, served.body_timeout))
            check(served, req)
            out, cancel = start(req, None if req.stream else request.is_disconnected)
            admitted = False  # the producer has the request's place now
            return await _answer(served, req, _items(out, cancel))
        except ApiError as e:
            return error_response(served, e)
        finally:
            if admitted:
                served.in_flight -= 1

    return app


async def _answer(served: Served, req: ChatRequest, items):
    """The response: the whole completion, or (stream) server-sent events; ApiError before the first token."""
    job = await anext(items)  # tokenized and checked, or an ApiError
    served.counts["prompt_tokens"] += len(job.ids)
    rid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
    head = {"id": rid, "created": created, "model": served.name, "system_fingerprint": "imtune"}

    def usage(n: int) -> dict:
        return {"prompt_tokens": len(job.ids), "completion_tokens": n, "total_tokens": len(job.ids) + n}

    if req.stream:  # `items` has started, so it is closed (and its generation stopped) even if never read again
        return StreamingResponse(_sse(served, items, head, usage, req), media_type="text/event-stream")
    parts, final = [], None
    try:
        async for p in items:
            if isinstance(p, dict):
                final = p
            else:
                parts.append(p)
    except ApiError as e:
        served.counts["cancelled"] += e.status == 499
        raise
    served.counts["completion_tokens"] += final["completion_tokens"]
    if final["finish_reason"] == "cancelled":
        served.counts["cancelled"] += 1
        raise ApiError(503, "the server shut down during this generation", kind="server_error")
    return {**head, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                         "logprobs": None, "finish_reason": final["finish_reason"]}],
            "usage": usage(final["completion_tokens"])}


async def _sse(served: Served, items, head: dict, usage, req: ChatRequest):
    """Server-sent events in OpenAI's chunk shape, ending with `data: [DONE]` (after an error event, if any)."""
    def chunk(delta: dict, finish=None, **extra) -> str:
        body = {**head, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    try:
        async for p in items:
            if isinstance(p, dict):
                served.counts["completion_tokens"] += p["completion_tokens"]
                finish = "stop" if p["finish_reason"] == "cancelled" else p["finish_reason"]
                if p["finish_reason"] == "cancelled":
                    served.counts["cancelled"] += 1
                yield chunk({}, finish)
                if req.stream_options and req.stream_options.include_usage:  # OpenAI: a last chunk, no choices
                    last = {**head, "object": "chat.completion.chunk", "choices": [],
                            "usage": usage(p["completion_tokens"])}
                    yield f"data: {json.dumps(last)}\n\n"
            else:
                yield chunk({"content": p})
    except ApiError as e:
        served.counts["errors"] += 1
        yield f"data: {json.dumps(e.body())}\n\n"
    yield "data: [DONE]\n\n"


# ---------------------------------------------------------------------------------------------------------------
def vllm_command(model_path: str, name: str, template_file: str, host: str, port: int) -> list[str]:
    """The vLLM OpenAI server for a model directory (used when vLLM is installed and a GPU is present).
    Not exercised by the tests (no vLLM, no GPU there). vLLM applies the chat template itself, so the content policy
    of `prompt_ids` does not hold on this path."""

    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path,
            "--served-model-name", name, "--chat-template", template_file, "--host", host, "--port", str(port)]
