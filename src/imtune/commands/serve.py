"""`imtune serve MODEL|RUN`: an OpenAI-compatible chat-completions server on 127.0.0.1 (see imtune.serve.app).

The model is resolved as everywhere in imtune (`default`, `random:<size>`, a directory, a run directory with its
training chat template, a hub id). Prints `imtune serve: listening on http://HOST:PORT/v1` on stdout once ready
(with --port 0 the port is chosen free), then serves until Ctrl-C / SIGTERM and exits 0. Point any OpenAI client at
that URL, e.g. `imtune bench alpacaeval --judge-url`.

Another address than loopback (`--host 0.0.0.0`) is refused without an API key (--api-key, or IMTUNE_API_KEY, which
`ps` does not show); clients then send `Authorization: Bearer KEY`, and name the server by an address or name given
with --allowed-host. A public address also needs a TLS reverse proxy in front (see imtune.serve.app).

--engine vllm (or auto, when vLLM is installed and a GPU is present) hands a model directory to vLLM's OpenAI
server instead, with the same chat template and API key (but none of imtune.serve.app's other request checks); that path
is not covered by the tests.

The app (requests, queue, generation) is imtune.serve.app; the process around it is here: the socket, uvicorn's settings
(h11, keep-alive, connection limit, graceful shutdown), a header deadline uvicorn lacks, and an exit EXIT_AFTER seconds
after SIGTERM/SIGINT whatever still runs."""
from __future__ import annotations

import asyncio
import importlib.util
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from imtune.commands.common import add_template_args
from imtune.console import say
from imtune.types import UsageError

MAX_CONNECTIONS = 512  # uvicorn's limit_concurrency
SHUTDOWN_GRACE = 2  # seconds uvicorn waits for responses to end after SIGTERM before it cancels them
EXIT_AFTER = 6  # seconds after SIGTERM/SIGINT when the process exits, whatever still runs


def add_arguments(p) -> None:
    p.add_argument("model", nargs="?", default="default",
                   help="hub id, local directory, run directory, 'default' or 'random:<size>'")
    add_template_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (127.0.0.1: this machine only; any other needs an API key)")
    p.add_argument("--api-key", default=None,
                   help="clients must send 'Authorization: Bearer KEY' (default: $IMTUNE_API_KEY, which other users "
                        "cannot read from the process list; at least 16 characters)")
    p.add_argument("--allowed-host", action="append", default=None, metavar="HOST",
                   help="also answer requests whose Host header names HOST (repeatable; '*.example.com' patterns); "
                        "127.0.0.1, localhost, [::1] and --host are always answered, any other Host gets 400")
    p.add_argument("--port", type=int, default=8000, help="port (0: pick a free one and print it)")
    p.add_argument("--name", default=None, help="model id reported by /v1/models and in responses; requests naming "
                                                "another model get 404 (default: MODEL)")
    p.add_argument("--max-tokens", type=int, default=256, help="completion length when a request gives none")
    p.add_argument("--max-tokens-limit", type=int, default=1024,
                   help="the largest max_tokens a request may ask (400 beyond; never more than the context)")
    p.add_argument("--max-queue", type=int, default=16,
                   help="requests that may wait for the model besides the one generating (429 beyond)")
    p.add_argument("--max-context", type=int, default=None,
                   help="prompt + completion tokens allowed (default: the model's max_position_embeddings)")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a client has to send its request headers (then the connection is closed), and "
                        "then its body (then 408)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--engine", choices=["auto", "transformers", "vllm"], default="auto",
                   help="auto: vLLM when installed, a GPU is present and MODEL is a directory; else transformers")
    p.add_argument("--quiet", action="store_true", help="no per-request log lines on stderr")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_key(args) -> str | None:
    """--api-key or $IMTUNE_API_KEY, checked; UsageError for one that is unusable, or missing off loopback."""
    key = args.api_key or os.environ.get("IMTUNE_API_KEY") or None
    if key is not None and (len(key) < 16 or not key.isascii() or not key.isprintable() or " " in key):
        raise UsageError("the API key must be at least 16 printable ASCII characters without spaces, e.g. "
                         "python -c 'import secrets; print(secrets.token_urlsafe())'")
    if key is None and not is_loopback(args.host):
        raise UsageError(f"--host {args.host} can be reached from other machines: give an API key (--api-key KEY or "
                         "IMTUNE_API_KEY) and put a TLS reverse proxy in front, or keep --host 127.0.0.1")
    return key


def allowed_hosts(args) -> tuple[str, ...]:
    """Host header values answered: this machine's names, the bound address, --allowed-host."""
    extra = args.allowed_host or []
    for h in extra:
        if not h or "*" in h[1:] or (h.startswith("*") and h != "*" and not h.startswith("*.")):
            raise UsageError(f"--allowed-host {h!r}: give a host name or address, '*.example.com' or '*'")
    bound = f"[{args.host}]" if ":" in args.host else args.host
    return tuple(dict.fromkeys(h.lower() for h in ("127.0.0.1", "localhost", "[::1]", bound, *extra)))


def pick_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _stop_before_serving(signum, frame):
    say("imtune serve: stopped before serving")
    raise SystemExit(0)


def _after_serving(signum, frame):
    """uvicorn re-raises the signal that stopped it once it has shut down: it is already handled."""


def _use_vllm(args) -> bool:
    from imtune.model.models import resolve

    if args.engine == "transformers" or resolve(args.model).kind == "random":
        if args.engine == "vllm":
            raise UsageError("--engine vllm needs a model directory or hub id, not random:<size>")
        return False
    if args.engine == "vllm":
        return True
    import torch

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def run(args) -> int:
    from imtune.data.templates import Renderer
    from imtune.model.models import load_model, load_tokenizer

    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    if not 1 <= args.max_tokens <= args.max_tokens_limit:
        raise UsageError(f"--max-tokens must be in 1..--max-tokens-limit ({args.max_tokens_limit}), got "
                         f"{args.max_tokens}")
    if args.max_queue < 0 or args.body_timeout <= 0:
        raise UsageError("--max-queue must be 0 or more and --body-timeout more than 0")
    key, hosts = api_key(args), allowed_hosts(args)
    previous = {s: signal.signal(s, _stop_before_serving) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        tok = load_tokenizer(args.model)
        renderer = Renderer(args.template, tok)
        if _use_vllm(args):
            return _run_vllm(args, renderer, key)
        try:
            from imtune.serve.app import make_app
            from imtune.serve.engine import Served
        except ImportError as e:
            raise UsageError(f"imtune serve needs FastAPI and uvicorn ({e}): pip install -e '.[serve]'") from None

        model = load_model(args.model).to(pick_device(args.device))
        context = args.max_context or getattr(model.config, "max_position_embeddings", None) or 2048
        served = Served(model, tok, renderer, args.name or args.model, context, args.max_tokens, args.body_timeout,
                        args.max_tokens_limit, args.max_queue, key, hosts)
        sock = listen(args.host, args.port)
        say(f"imtune serve: model {served.name}, template {renderer.name}, context {context}, "
            f"device {next(model.parameters()).device}, max_tokens up to {served.max_tokens_limit}, "
            f"queue {served.max_queue}, API key {'required' if key else 'none (loopback only)'}")
        for s in previous:
            signal.signal(s, _after_serving)
        run_server(make_app(served), served, sock,
                   on_ready=lambda: print(f"imtune serve: listening on {url_of(sock)}", flush=True),
                   log_level="warning" if args.quiet else "info")
        say("imtune serve: stopped")
        return 0
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ---------------------------------------------------------------------------------------------------------------
# The process around the app: socket, uvicorn, header deadline, shutdown.
def listen(host: str, port: int):
    """A bound, listening socket (port 0: a free one); UsageError when the address cannot be had."""

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


def _awaits_headers(connection) -> bool:
    """Whether a uvicorn h11 connection waits for a request's headers: none sent yet, or part of the next one."""
    import h11

    conn = getattr(connection, "conn", None)
    if conn is None or conn.their_state is not h11.IDLE:
        return False
    return getattr(connection, "cycle", None) is None or bool(conn.trailing_data[0])


async def close_stalled(server, seconds: float) -> None:
    """Close connections that have waited `seconds` for the same request's headers. uvicorn offers no header-read
    timeout: its timeout_keep_alive runs only after a response and stops at the first byte of the next request,
    and h11_max_incomplete_event_size bounds the headers' size, not their time; so a client that sends a request
    line and then nothing (slowloris) would hold its connection forever."""
    since: dict = {}  # connection -> (the request cycle it is on, since when it waits)
    while not server.should_exit:
        now, live = time.monotonic(), set(server.server_state.connections)
        since = {c: mark for c, mark in since.items() if c in live}
        for c in live:
            if not _awaits_headers(c):
                since.pop(c, None)
                continue
            cycle, t0 = since.setdefault(c, (c.cycle, now))
            if cycle is not c.cycle:
                since[c] = (c.cycle, now)
            elif now - t0 > seconds:
                c.transport.close()
        await asyncio.sleep(min(0.5, seconds / 4))


def _exit_soon(seconds: float) -> threading.Timer:
    """The last resort after SIGTERM/SIGINT: a generation that does not stop (one forward pass that does not end)
    must not keep the process alive. Exits 1, saying so, unless the process has ended or the timer is cancelled."""
    def hard_exit():
        print(f"imtune serve: still busy {seconds:g} s after the signal to stop; exiting without waiting",
              file=sys.stderr, flush=True)
        os._exit(1)

    timer = threading.Timer(seconds, hard_exit)
    timer.daemon = True
    timer.start()
    return timer


def run_server(app, served, sock, on_ready=None, log_level: str = "warning") -> None:
    """Serve on `sock` until SIGTERM/SIGINT (uvicorn's graceful shutdown). A watcher stops running and queued
    generations as soon as uvicorn is asked to exit, so the shutdown does not wait for them, and ends the process
    EXIT_AFTER seconds later if the server has not stopped by then, or has stopped with the model's thread still
    busy (the interpreter would wait for that thread). `on_ready()` once uvicorn has started."""
    import uvicorn

    config = uvicorn.Config(
        app, log_level=log_level, access_log=log_level in ("info", "debug"),
        http="h11",  # close_stalled reads h11's state (httptools, if installed, would be picked by "auto")
        h11_max_incomplete_event_size=16 * 1024,  # request line + headers (h11's default, said here)
        timeout_keep_alive=5,  # an idle connection between requests
        limit_concurrency=MAX_CONNECTIONS,  # connections + tasks; beyond: 503 at once, not a pile of sockets
        timeout_graceful_shutdown=SHUTDOWN_GRACE)  # then uvicorn cancels what still runs
    server, deadline = uvicorn.Server(config), []

    async def watch():
        while not server.started and not server.should_exit:
            await asyncio.sleep(0.05)
        if server.started and on_ready:
            on_ready()
        while not server.should_exit:
            await asyncio.sleep(0.05)
        served.stopping.set()
        deadline.append(_exit_soon(EXIT_AFTER))

    async def main():
        helpers = [asyncio.create_task(watch()), asyncio.create_task(close_stalled(server, served.body_timeout))]
        try:
            await server.serve(sockets=[sock])
        finally:
            served.stopping.set()
            for t in helpers:
                t.cancel()

    asyncio.run(main())
    if deadline and not served.generating.is_set():  # stopped cleanly: the interpreter's own exit may take its time
        deadline[0].cancel()


def _run_vllm(args, renderer, key: str | None) -> int:
    """vLLM's OpenAI server on the resolved model directory with our chat template; SIGTERM is passed on. The API
    key goes to vLLM in its environment (VLLM_API_KEY, not on its command line); imtune's other request checks
    (Host, media type, body size, queue) are not on this path."""

    from imtune import files
    from imtune.model.models import resolve
    from imtune.serve.app import vllm_command

    src = resolve(args.model)
    template = files.temp_file(renderer.jinja, ".jinja")
    port = args.port or 8000
    cmd = vllm_command(src.path, args.name or args.model, str(template), args.host, port)
    say(f"imtune serve: vLLM on {src.path}: {' '.join(cmd)}")
    proc = subprocess.Popen(cmd, env={**os.environ, "VLLM_API_KEY": key} if key else None)
    print(f"imtune serve: listening on http://{args.host}:{port}/v1 (vLLM; ready once it says so)", flush=True)
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda sig, frame: proc.send_signal(sig))
    rc = proc.wait()
    say("imtune serve: stopped")
    return 0 if rc in (0, -signal.SIGTERM, -signal.SIGINT) else rc
