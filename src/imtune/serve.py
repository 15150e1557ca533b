"""An OpenAI-compatible chat-completions server for one model: FastAPI on uvicorn, generation by transformers.

    POST /v1/chat/completions   {"model", "messages", "max_tokens", "temperature", "top_p", "seed", "stop", "stream"}
    GET  /v1/models             the one model served
    GET  /health                {"status": "ok", "model", "requests": {...}}   (request counters, for tests and ops)

Why not `transformers serve`: it loads models by hub id through AutoProcessor (not imtune's `random:` models or a
run's training template), tokenizes prompts with apply_chat_template (so text that spells "<|im_end|>" becomes the
control token), answers errors as FastAPI's {"detail": ...} rather than OpenAI's {"error": {...}}, and logs and
ignores `n`, `logprobs` and `response_format`. The maintained pieces are used instead: uvicorn (HTTP/1.1 parsing by
h11, the listen backlog, graceful shutdown on SIGTERM/SIGINT), FastAPI and pydantic (request validation), and
transformers' `generate` with its TextIteratorStreamer (streaming).

Behaviour, request by request (the request's schema and its 400s: imtune.serve_request):
- the prompt is the model's (or run's) chat template rendered by imtune.templates; message contents are tokenized
  as plain text, so a user who writes "<|im_end|>" does not end the turn (`prompt_ids`);
- one generation at a time, in arrival order; other requests wait in an asyncio queue (no connection resets:
  uvicorn's backlog is 2048);
- a prompt plus `max_tokens` beyond the context is refused before anything is generated (400,
  code "context_length_exceeded"); `max_tokens` absent: what fits, at most the server's default;
- unknown model names: 404 "model_not_found"; bad or unsupported parameters (`n` > 1, `logprobs`, a
  `response_format` other than text, `stop` that is not strings): 400 with an OpenAI-shaped error body;
  temperature below 1e-5 is greedy decoding (dividing logits by 1e-45 overflows);
- a body that does not arrive within `body_timeout` seconds gets 408 and the connection is closed;
- SIGTERM/SIGINT: uvicorn stops accepting, every running or queued generation is stopped, clients get their
  stream's end (or 503), and the process exits 0.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from .generate import STOP_STRINGS, stop_token_ids
from .serve_request import ApiError, ChatRequest, messages_of, parse_request
from .types import Conversation, Message, UsageError, Where

MAX_BODY = 16 * 1024 * 1024
GREEDY_BELOW = 1e-5  # temperatures below this decode greedily


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
    body_timeout: float = 30.0
    created: int = field(default_factory=lambda: int(time.time()))
    counts: dict = field(default_factory=lambda: {"chat_completions": 0, "errors": 0, "cancelled": 0,
                                                  "prompt_tokens": 0, "completion_tokens": 0})
    stopping: threading.Event = field(default_factory=threading.Event)  # set at shutdown: stop every generation


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


def plan(served: Served, req: ChatRequest) -> Job:
    """The request checked against the model (name, context) and turned into a Job; ApiError when it cannot run."""
    if req.model is not None and req.model != served.name:
        raise ApiError(404, f"the model {req.model!r} does not exist; this server serves {served.name!r}",
                       kind="invalid_request_error", param="model", code="model_not_found")
    ids = prompt_ids(served.tokenizer, served.renderer, messages_of(req))
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
               req.seed if req.seed is not None else secrets.randbelow(2**31), [s for s in stops if s])


def run_generation(served: Served, job: Job, streamer) -> int:
    """model.generate for one job, feeding `streamer`; returns the number of new tokens. Runs in the worker thread."""
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
    try:
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
    return out.shape[1] - ids.shape[1]


def _cut(text: str, stops: list[str]) -> tuple[str, bool]:
    """`text` up to the first stop string, and whether one was found."""
    at = min((i for s in stops if (i := text.find(s)) != -1), default=-1)
    return (text, False) if at == -1 else (text[:at], True)


async def pieces(served: Served, job: Job, lock: asyncio.Lock, pool: ThreadPoolExecutor, client_gone=None):
    """Async generator of the completion's text deltas, then one final dict {"finish_reason", "completion_tokens"}.
    Waits its turn for the model; text after a stop string (the request's, or a template's next role tag) is never
    sent, and reaching one stops the generation. `client_gone()` (awaitable) is asked once the model is free and
    after every delta: a client that left is not generated for."""
    from transformers import TextIteratorStreamer

    stops = job.stops + [s for s in (*STOP_STRINGS, *served.renderer.eot_markers) if s]
    hold = max(len(s) for s in stops) - 1  # characters kept back: they may start a stop string
    async with lock:
        if served.stopping.is_set():
            raise ApiError(503, "the server is shutting down", kind="server_error")
        if client_gone is not None and await client_gone():
            raise ApiError(499, "the client closed the connection")
        loop = asyncio.get_running_loop()
        streamer = TextIteratorStreamer(served.tokenizer, skip_prompt=True, skip_special_tokens=False)
        done = loop.run_in_executor(pool, run_generation, served, job, streamer)
        text, sent, stopped = "", 0, False
        try:
            while True:
                delta = await loop.run_in_executor(None, next, streamer, None)
                if delta is None:
                    break
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
            job.cancel.set()  # the client went away (or we are stopping): free the model for the next request
            await asyncio.shield(done)
            raise
        if len(text) > sent:
            yield text[sent:]
        if served.stopping.is_set() and not stopped and n_tokens < job.max_new_tokens:
            finish = "cancelled"
        else:
            finish = "stop" if stopped or n_tokens < job.max_new_tokens else "length"
        yield {"finish_reason": finish, "completion_tokens": n_tokens}


# ---------------------------------------------------------------------------------------------------------------
# The app.
def make_app(served: Served) -> FastAPI:
    app = FastAPI(title="imtune serve", docs_url=None, redoc_url=None, openapi_url=None)
    lock, pool = asyncio.Lock(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="imtune-generate")

    def error(e: ApiError) -> JSONResponse:
        served.counts["errors"] += 1
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        return error(ApiError(400, str(exc)))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": served.name, "requests": dict(served.counts)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": served.created,
                                            "owned_by": "imtune"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        served.counts["chat_completions"] += 1  # every request to the route, answered or refused
        try:
            if int(request.headers.get("content-length") or 0) > MAX_BODY:
                raise ApiError(413, f"request body over {MAX_BODY} bytes")
            try:
                raw = await asyncio.wait_for(request.body(), served.body_timeout)
            except asyncio.TimeoutError:
                raise ApiError(408, f"the request body did not arrive within {served.body_timeout:g} s") from None
            req = parse_request(raw)
            job = plan(served, req)
        except ApiError as e:
            resp = error(e)
            if e.status in (408, 413):
                resp.headers["Connection"] = "close"
            return resp
        served.counts["prompt_tokens"] += len(job.ids)
        rid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        head = {"id": rid, "created": created, "model": served.name, "system_fingerprint": "imtune"}
        def usage(n: int) -> dict:
            return {"prompt_tokens": len(job.ids), "completion_tokens": n, "total_tokens": len(job.ids) + n}
        if req.stream:
            return StreamingResponse(_sse(served, job, lock, pool, head, usage, req), media_type="text/event-stream")
        parts, final = [], None
        try:
            async for p in pieces(served, job, lock, pool, request.is_disconnected):
                if isinstance(p, dict):
                    final = p
                else:
                    parts.append(p)
        except ApiError as e:
            served.counts["cancelled"] += e.status == 499
            return error(e)
        served.counts["completion_tokens"] += final["completion_tokens"]
        if final["finish_reason"] == "cancelled":
            served.counts["cancelled"] += 1
            return error(ApiError(503, "the server shut down during this generation", kind="server_error"))
        return {**head, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                             "logprobs": None, "finish_reason": final["finish_reason"]}],
                "usage": usage(final["completion_tokens"])}

    return app


async def _sse(served: Served, job: Job, lock, pool, head: dict, usage, req: ChatRequest):
    """Server-sent events in OpenAI's chunk shape, ending with `data: [DONE]`."""
    def chunk(delta: dict, finish=None, **extra) -> str:
        body = {**head, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    try:
        async for p in pieces(served, job, lock, pool):
            if isinstance(p, dict):
                served.counts["completion_tokens"] += p["completion_tokens"]
                finish = "stop" if p["finish_reason"] == "cancelled" else p["finish_reason"]
                if p["finish_reason"] == "cancelled":
                    served.counts["cancelled"] += 1
                yield chunk({}, finish)
                if (req.stream_options or {}).get("include_usage"):  # OpenAI: a last chunk with no choices
                    last = {**head, "object": "chat.completion.chunk", "choices": [],
                            "usage": usage(p["completion_tokens"])}
                    yield f"data: {json.dumps(last)}\n\n"
            else:
                yield chunk({"content": p})
    except ApiError as e:
        served.counts["errors"] += 1
        yield f"data: {json.dumps(e.body())}\n\n"
    yield "data: [DONE]\n\n"


def listen(host: str, port: int):
    """A bound, listening socket (port 0: a free one); UsageError when the address cannot be had."""
    import socket

    try:
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                    backlog=2048)
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"


def run_server(app, served: Served, sock, on_ready=None, log_level: str = "warning") -> None:
    """Serve on `sock` until SIGTERM/SIGINT (uvicorn's graceful shutdown). A watcher stops running and queued
    generations as soon as uvicorn is asked to exit, so the shutdown does not wait for them. `on_ready()` once
    uvicorn has started."""
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=10,
                            access_log=log_level in ("info", "debug"))
    server = uvicorn.Server(config)

    async def watch():
        while not server.started and not server.should_exit:
            await asyncio.sleep(0.05)
        if server.started and on_ready:
            on_ready()
        while not server.should_exit:
            await asyncio.sleep(0.05)
        served.stopping.set()

    async def main():
        watcher = asyncio.create_task(watch())
        try:
            await server.serve(sockets=[sock])
        finally:
            served.stopping.set()
            watcher.cancel()

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------------------------
def vllm_command(model_path: str, name: str, template_file: str, host: str, port: int) -> list[str]:
    """The vLLM OpenAI server for a model directory (used when vLLM is installed and a GPU is present).
    Not exercised by the tests (no vLLM, no GPU there). vLLM applies the chat template itself, so the content policy
    of `prompt_ids` does not hold on this path."""
    import sys

    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path,
            "--served-model-name", name, "--chat-template", template_file, "--host", host, "--port", str(port)]
