"""`imtune serve MODEL`: an OpenAI-compatible chat-completions server on 127.0.0.1 (see imtune.serve).

Prints `imtune serve: listening on http://HOST:PORT/v1` on stdout once ready (with --port 0 the port is chosen
free), then serves until Ctrl-C / SIGTERM. Point any OpenAI client at that URL, e.g. `imtune judge --judge-url`."""
from __future__ import annotations

from .common import add_template_args, say


def add_arguments(p) -> None:
    p.add_argument("model", nargs="?", default="default",
                   help="hub id, local directory, run directory, 'default' or 'random:<size>'")
    add_template_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: pick a free one and print it)")
    p.add_argument("--name", default=None, help="model id reported by /v1/models and in responses (default: MODEL)")
    p.add_argument("--max-tokens", type=int, default=256, help="completion length when a request gives none")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--quiet", action="store_true", help="no per-request log lines on stderr")


def pick_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def run(args) -> int:
    from ..models import load_model, load_tokenizer
    from ..serve import ChatModel, make_server, serve_forever, url_of
    from ..templates import Renderer
    from ..types import UsageError

    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    tok = load_tokenizer(args.model)
    renderer = Renderer(args.template, tok)
    model = load_model(args.model).to(pick_device(args.device))
    chat = ChatModel(model, tok, renderer, args.name or args.model, default_max_tokens=args.max_tokens)
    try:
        server = make_server(chat, args.host, args.port, quiet=args.quiet)
    except OSError as e:
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    say(f"imtune serve: model {chat.name}, template {renderer.name}, device {next(model.parameters()).device}")
    serve_forever(server, on_ready=lambda: print(f"imtune serve: listening on {url_of(server)}", flush=True))
    say("imtune serve: stopped")
    return 0
