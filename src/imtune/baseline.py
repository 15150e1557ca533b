"""Step 0's evaluation, computed once: the untouched model scored on the same evaluation sets gives the same numbers
in every run that starts from it, so `imtune compare`, `sweep` and `study` (every arm, every seed) pay for it once.

Measured on the 2-core build machine: the demo's step-0 evaluation (16 examples, SmolLM2-135M, fp32) takes ~9 s of
each run's ~100 s; the key below costs ~0.4 s (sha256 over 540 MB of weights).

The key is a sha256 of everything the numbers depend on:
  - the model's weights and buffers, by content (so a fine-tuned model in the same directory, another seed of a
    `random:` model or a LoRA initialisation never collides), and the dtype they are in;
  - how the forward runs: precision (autocast), attention kernel, compile, loss chunk size, torch threads, torch and
    transformers versions;
  - every evaluation set: its name, its examples' ids and weights, and its micro-batches.
Only single-process CPU runs use it (weights on an accelerator would be copied to the host to hash them, and there
the evaluation is cheap). Entries are small JSON files in `$IMTUNE_CACHE/eval0/`, written atomically; one that fails
to read is recomputed. IMTUNE_NO_CACHE=1 turns it off (imtune.cache.enabled)."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

VERSION = 1


def usable(run) -> bool:
    """Whether `run`'s step-0 evaluation may come from (and go to) the cache."""
    from .cache import enabled

    return enabled() and run.start_step == 0 and run.acc.num_processes == 1 and run.acc.device.type == "cpu"


def key(run) -> str:
    """The hash of the model's weights, the forward's settings and the evaluation sets (see the module docstring)."""
    import torch

    from .train import fingerprint

    h = hashlib.sha256(json.dumps(forward_settings(run)).encode())
    for name, tensor in run.model.state_dict().items():
        t = tensor.detach().contiguous()
        h.update(f"|{name}:{t.dtype}:{tuple(t.shape)}|".encode())
        h.update(memoryview(t.view(torch.uint8).numpy()) if t.numel() else b"")
    for name, (examples, batches) in sorted(run.eval_sets.items()):
        h.update(f"|{name}:{fingerprint(examples)}:{batches}".encode())
    return h.hexdigest()


def forward_settings(run) -> list:
    """What decides the forward's numbers besides weights and data. The precision actually used, not how it was
    chosen: `--precision auto`'s probe measures GFLOP/s anew in every run."""
    import torch
    import transformers

    cfg = run.cfg
    return [VERSION, run.precision.used, cfg.attn_implementation, cfg.compile, cfg.chunk_size,
            torch.get_num_threads(), torch.__version__, transformers.__version__]


def path_of(k: str) -> Path:
    from .models import cache_dir

    return cache_dir() / "eval0" / f"{k}.json"


def read(k: str) -> tuple[dict, dict] | None:
    """What track.eval_losses returned for key `k` (losses, per-example sums), or None."""
    try:
        entry = json.loads(path_of(k).read_text(encoding="utf-8"))
        return (entry["losses"], entry["per_example"]) if entry["key"] == k else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write(k: str, result: tuple[dict, dict], run_dir: Path) -> None:
    path = path_of(k)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"key": k, "losses": result[0], "per_example": result[1], "first_run": str(run_dir)}, f)
        os.replace(tmp, path)
    except OSError:  # a read-only or full cache directory costs only the saving
        pass
