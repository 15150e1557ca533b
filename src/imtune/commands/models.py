"""`imtune models prepare [MODEL]`: make a model available locally (the default: convert its GGUF once)."""
from __future__ import annotations

from imtune.model import models


def add_arguments(p) -> None:
    p.add_argument("model", nargs="?", default="default", help="'default' (the embedded SmolLM2-135M-Instruct)")


def run(args) -> int:
    if args.model == "default":
        print(models.prepare_default())
        return 0
    src = models.resolve(args.model)
    models.load_tokenizer(args.model)
    print(src.path or src.name)
    return 0
