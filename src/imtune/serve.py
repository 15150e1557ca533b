"""An OpenAI-compatible chat-completions server for one model, on the standard library's HTTP server.

    POST /v1/chat/completions   {"messages": [...], "max_tokens", "temperature", "top_p", "seed", "stop"}
    GET  /v1/models             the one model served
    GET  /health                {"status": "ok", "model", "requests": {...}}   (request counters, for tests and ops)

(`/chat/completions` and `/models` without the `/v1` prefix answer too.) Requests are served one at a time under a
lock around the model: no batching, which is plenty for judging, demos and tests. Generation is imtune.generate
with the model's chat template, cut at end-of-turn. Binds to 127.0.0.1 unless told otherwise; port 0 picks a free
port. SIGINT/SIGTERM stop it cleanly."""
from __future__ import annotations

import json
import secrets
import select
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .generate import GenerationConfig, generate
from .types import Message

MAX_BODY = 16 * 1024 * 1024
ROLE_ALIASES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class RequestError(Exception):
    """A bad request: answered with HTTP 400 and an OpenAI-shaped error body."""


class ClientGone(Exception):
    """The client closed its connection while its request waited for the model: nobody wants the answer."""


class ChatModel:
    """A model, its tokenizer and renderer behind a lock; `complete(body)` answers one chat-completions request."""

    def __init__(self, model, tokenizer, renderer, name: str, default_max_tokens: int = 256,
                 max_tokens_limit: int = 4096):
        self.model, self.tokenizer, self.renderer, self.name = model, tokenizer, renderer, name
        self.default_max_tokens, self.max_tokens_limit = default_max_tokens, max_tokens_limit
        self.lock = threading.Lock()  # one generation at a time
        self._count_lock = threading.Lock()
        self.counts = {"chat_completions": 0, "errors": 0, "abandoned": 0, "prompt_tokens": 0, "completion_tokens": 0}
        self.created = int(time.time())

    def count(self, key: str, n: int = 1) -> None:
        with self._count_lock:
            self.counts[key] += n

    def complete(self, body: dict, client_gone=None) -> dict:
        """The chat-completions answer to `body`. `client_gone()` is asked once the model is free; when it says
        yes (a client that timed out while queued), ClientGone is raised instead of generating for nobody."""
        messages = parse_messages(body.get("messages"))
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        max_tokens = self.default_max_tokens if max_tokens is None else max_tokens
        temperature = 1.0 if body.get("temperature") is None else body["temperature"]  # OpenAI's default
        top_p = 1.0 if body.get("top_p") is None else body["top_p"]
        limits = (("max_tokens", max_tokens, 1, self.max_tokens_limit), ("temperature", temperature, 0, 2),
                  ("top_p", top_p, 0, 1))
        for name, v, lo, hi in limits:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
                raise RequestError(f"{name} must be a number in [{lo}, {hi}], got {v!r}")
        if (body.get("n") or 1) != 1:
            raise RequestError("n > 1 is not supported")
        if body.get("stream"):
            raise RequestError("stream is not supported")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        seed = body.get("seed")
        cfg = GenerationConfig(max_new_tokens=int(max_tokens), temperature=float(temperature), top_p=float(top_p),
                               batch_size=1, seed=int(seed) if isinstance(seed, int) else secrets.randbelow(2**31))
        prompt = self.renderer.prompt(messages)
        with self.lock:
            if client_gone is not None and client_gone():
                raise ClientGone
            text = generate(self.model, self.tokenizer, self.renderer, [messages], cfg)[0]
        stopped = False
        for s in stop:
            if s and s in text:
                text, stopped = text[:text.index(s)], True
        n_prompt = len(self.tokenizer(prompt, add_special_tokens=False).input_ids)
        # generate() returns text, not token ids: the completion is re-tokenized to count it (capped at the limit,
        # as re-tokenizing decoded text can give a few more tokens), and a count within one token of the limit (the
        # end-of-turn token takes one) is reported as stopped by length.
        n_out = min(len(self.tokenizer(text, add_special_tokens=False).input_ids), int(max_tokens)) if text else 0
        finish = "stop" if stopped or n_out < int(max_tokens) - 1 else "length"
        self.count("prompt_tokens", n_prompt)
        self.count("completion_tokens", n_out)
        return {"id": f"chatcmpl-{secrets.token_hex(12)}", "object": "chat.completion", "created": int(time.time()),
                "model": self.name, "system_fingerprint": "imtune",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": finish}],
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}}


def parse_messages(raw) -> list[Message]:
    if not isinstance(raw, list) or not raw:
        raise RequestError("messages must be a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or m.get("role") not in ROLE_ALIASES:
            raise RequestError(f"messages[{i}]: role must be one of {', '.join(ROLE_ALIASES)}")
        content = m.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}]: content must be a string or a list of text parts")
        out.append(Message(ROLE_ALIASES[m["role"]], content))
    return out


def _handler(chat: ChatModel, quiet: bool):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # one line per request on stderr
            if not quiet:
                sys.stderr.write(f"imtune serve: {self.address_string()} {fmt % args}\n")

        def _send(self, status: int, obj: dict) -> None:
            data = json.dumps(obj).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                self._gone()

        def _gone(self) -> None:
            chat.count("abandoned")
            self.close_connection = True
            self.log_message("client closed the connection before its answer: %s", self.path)

        def _client_gone(self) -> bool:
            try:  # readable with nothing to read = the peer closed its end
                readable, _, _ = select.select([self.connection], [], [], 0)
                return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
            except OSError:
                return True

        def _error(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
            chat.count("errors")
            self._send(status, {"error": {"message": message, "type": kind, "param": None, "code": None}})

        def do_GET(self):
            path = self.path.split("?")[0].rstrip("/")
            if path == "/health":
                self._send(200, {"status": "ok", "model": chat.name, "requests": dict(chat.counts)})
            elif path in ("/v1/models", "/models"):
                self._send(200, {"object": "list", "data": [{"id": chat.name, "object": "model",
                                                             "created": chat.created, "owned_by": "imtune"}]})
            else:
                self._error(404, f"no route GET {path}", "not_found_error")

        def do_POST(self):
            path = self.path.split("?")[0].rstrip("/")
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                self.close_connection = True
                return self._error(413, f"request body over {MAX_BODY} bytes")
            raw = self.rfile.read(length) if length else b""
            if path not in ("/v1/chat/completions", "/chat/completions"):
                return self._error(404, f"no route POST {path}", "not_found_error")
            chat.count("chat_completions")  # every request to the route, answered or refused
            try:
                body = json.loads(raw or b"null")
                if not isinstance(body, dict):
                    raise RequestError("the body must be a JSON object")
                self._send(200, chat.complete(body, self._client_gone))
            except ClientGone:
                self._gone()
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                self._error(400, f"the body is not valid JSON: {e}")
            except RequestError as e:
                self._error(400, str(e))
            except Exception as e:  # a bug or the model failing: answer, log, keep serving
                self._error(500, f"{type(e).__name__}: {e}", "server_error")
                raise

    return Handler


def make_server(chat: ChatModel, host: str = "127.0.0.1", port: int = 8000, quiet: bool = False) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, port), _handler(chat, quiet))
    server.daemon_threads = True
    return server


def url_of(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}/v1"


def serve_forever(server: ThreadingHTTPServer, on_ready=None) -> None:
    """Serve until SIGINT or SIGTERM, then close the socket and return (main thread only)."""
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    worker = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    worker.start()
    try:
        if on_ready:
            on_ready()
        while not stop.wait(0.5):
            pass
    finally:
        server.shutdown()
        server.server_close()
        worker.join(timeout=5)
        for s, h in previous.items():
            signal.signal(s, h)
