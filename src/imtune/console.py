"""What a person sees on the terminal: notes and progress on stderr, from rank 0 only under `accelerate launch`."""
from __future__ import annotations

import os
import sys


def say(msg: str) -> None:
    """Progress and notes go to stderr (results to stdout); under `accelerate launch` only rank 0 speaks."""
    if is_main_process():
        print(msg, file=sys.stderr, flush=True)


def is_main_process() -> bool:
    """Under `accelerate launch` every process runs the same code; only rank 0 talks and writes reports."""
    return int(os.environ.get("RANK", "0")) == 0
