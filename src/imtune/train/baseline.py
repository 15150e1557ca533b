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
the evaluation is cheap). Entries are small JSON files in `$IMTUNE_CACHE/eval0/`, written atomically. The cache
directory is not trusted: an entry that fails to read, or whose numbers are not what eval_losses returns (the same
sets in losses and per_example, lists of one length, finite non-negative sums, whole token counts), is recomputed
with a one-line note. IMTUNE_NO_CACHE=1 turns it off (imtune.data.cache.enabled)."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from imtune import files
from imtune.console import say
from imtune.data.cache import enabled
from imtune.data.prepare import fingerprint
from imtune.files import cache_dir
from imtune.model.models import hash_weights

VERSION = 1


def usable(run) -> bool:
    """Whether `run`'s step-0 evaluation may come from (and go to) the cache."""
    return enabled() and run.start_step == 0 and run.acc.num_processes == 1 and run.acc.device.type == "cpu"


def key(run) -> str:
    """The hash of the model's weights, the forward's settings and the evaluation sets (see the module docstring)."""
    h = hashlib.sha256(json.dumps(forward_settings(run)).encode())
    hash_weights(h, run.model)
    for name, (examples, batches) in sorted(run.eval_sets.items()):
        h.update(f"|{name}:{fingerprint(examples)}:{batches}".encode())
    return h.hexdigest()


def forward_settings(run) -> list:
    """What decides the forward's numbers besides weights and data. The precision actually used, not how it was
    chosen: `--precision auto`'s probe measures speeds anew in every process."""
    import torch
    import transformers

    cfg = run.cfg
    return [VERSION, run.precision.used, cfg.attn_implementation, cfg.compile, cfg.chunk_size,
            torch.get_num_threads(), torch.__version__, transformers.__version__]


def path_of(k: str) -> Path:
    return cache_dir() / "eval0" / f"{k}.json"


def read(k: str) -> tuple[dict, dict] | None:
    """What track.eval_losses returned for key `k` (losses, per-example sums), or None (absent, or damaged: then a
    one-line note says why, and the caller recomputes it)."""
    path = path_of(k)
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as e:
        return _ignored(path, f"unreadable ({type(e).__name__})")
    problem = _problem(entry, k)
    return _ignored(path, problem) if problem else (entry["losses"], entry["per_example"])


def _problem(entry, k: str) -> str | None:
    """What is wrong with an entry, or None when it has exactly the shape eval_losses gives."""
    if not isinstance(entry, dict) or entry.get("key") != k:
        return "not an entry for this key"
    losses, per_example = entry.get("losses"), entry.get("per_example")
    if not isinstance(losses, dict) or not isinstance(per_example, dict):
        return "no losses or per-example sums"
    if set(losses) != {f"{name}_output_{what}" for name in per_example for what in ("loss", "tokens")}:
        return "losses and per-example sums name different sets"
    for name, sums in per_example.items():
        loss, total = losses[f"{name}_output_loss"], losses[f"{name}_output_tokens"]
        if not (_count(total) and (loss is None or _amount(loss))):
            return f"set {name}: a loss or token count that is not a finite non-negative number"
        if not isinstance(sums, dict) or set(sums) != {"source", "output_nll", "output_tokens"}:
            return f"set {name}: per-example sums without exactly source, output_nll, output_tokens"
        src, nll, tokens = sums["source"], sums["output_nll"], sums["output_tokens"]
        if not (isinstance(src, list) and isinstance(nll, list) and isinstance(tokens, list)
                and len(src) == len(nll) == len(tokens)):
            return f"set {name}: per-example lists of different lengths"
        if not (all(isinstance(x, str) for x in src) and all(map(_amount, nll)) and all(map(_count, tokens))):
            return f"set {name}: a per-example value of the wrong type or out of range"
    return None


def _amount(x) -> bool:
    return _count(x) or isinstance(x, float) and math.isfinite(x) and x >= 0


def _count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _ignored(path: Path, why: str) -> None:
    say(f"imtune cache: ignored {path} ({why}); evaluating step 0 again")
    return None


def write(k: str, result: tuple[dict, dict], run_dir: Path) -> None:
    path = path_of(k)
    try:  # the user's cache directory: only the file itself is checked
        files.write_json(path, {"key": k, "losses": result[0], "per_example": result[1], "first_run": str(run_dir)},
                         indent=None)
    except OSError:  # a read-only or full cache directory costs only the saving
        pass
