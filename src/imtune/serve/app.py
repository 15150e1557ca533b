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
import secrets
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from imtune.serve.engine import Served, admit, check, produce, stream_items
from imtune.serve.request import ApiError, ChatRequest, guard, key_matches, parse_request, read_body

log = logging.getLogger("uvicorn.error")
































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
            return await _answer(served, req, stream_items(out, cancel))
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
