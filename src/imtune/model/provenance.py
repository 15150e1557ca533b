"""What a result was made with: package versions and a fingerprint of the starting model, recorded by
`imtune compare` in compare.json ("versions") and shown in the report, so a shared report says what to install and
which weights to start from to reproduce it.

The model fingerprint is cheap on purpose (a comparison must not re-read gigabytes): the sha256 of the model's
config.json plus the name and byte size of every weight file. It tells two models apart whenever their architecture
or any weight file's size differs, and a re-download of the same checkpoint gives the same fingerprint; it does not
prove the weights bit for bit (checkpoint manifests do that: imtune.rundir.checkpoint). A `random:<size>` model is its
size table (the weights come from each run's seed).
"""
from __future__ import annotations

import hashlib
import json
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from imtune import __version__
from imtune.model.models import RANDOM_SIZES, resolve
from imtune.types import UsageError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def versions(model: str | None) -> dict:
    """{"imtune", "torch", "transformers", "python", "model": model_fingerprint(model)}."""
    return {"imtune": __version__, "torch": _version("torch"), "transformers": _version("transformers"),
            "python": platform.python_version(), "model": model_fingerprint(model)}


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def model_fingerprint(spec: str | None) -> dict:
    """{"name", "kind", "fingerprint" (16 hex digits or None), "vocab_size", "weights_bytes", "how"}."""
    try:
        src = resolve(spec)
    except UsageError as e:
        return {"name": spec, "kind": "unknown", "fingerprint": None, "how": str(e)}
    if src.kind == "random":
        table = json.dumps(RANDOM_SIZES[src.size], sort_keys=True)
        return {"name": src.name, "kind": "random", "fingerprint": hashlib.sha256(table.encode()).hexdigest()[:16],
                "how": "sha256 of the size table (weights: random, from each run's seed)"}
    path = Path(src.path)
    config = path / "config.json"
    if not config.is_file():
        return {"name": src.name, "kind": src.kind, "fingerprint": None,
                "how": "no local config.json (a hub id is resolved by transformers when loaded)"}
    weights = sorted(f for f in path.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
    h = hashlib.sha256(config.read_bytes())
    for f in weights:
        h.update(f"\n{f.name} {f.stat().st_size}".encode())
    try:
        vocab = json.loads(config.read_text(encoding="utf-8")).get("vocab_size")
    except ValueError:
        vocab = None
    return {"name": src.name, "kind": src.kind, "fingerprint": h.hexdigest()[:16], "vocab_size": vocab,
            "weights_bytes": sum(f.stat().st_size for f in weights),
            "how": "sha256 of config.json + the name and size of each weight file"}


def versions_line(v: dict | None) -> str:
    """One line for a report: `imtune 0.1.0 · torch 2.5.1 · ... · model default (fingerprint 1a2b…)`."""
    if not v:
        return "not recorded (compare.json was written by an older imtune: re-run the compare command to record them)"
    m = v.get("model") or {}
    fp = f"fingerprint `{m['fingerprint']}`: {m.get('how')}" if m.get("fingerprint") else m.get("how", "")
    size = f", {m['weights_bytes'] / 1e6:,.1f} MB of weights" if m.get("weights_bytes") else ""
    return (f"imtune {v.get('imtune')} · torch {v.get('torch')} · transformers {v.get('transformers')} · "
            f"python {v.get('python')} · model `{m.get('name')}` ({fp}{size})")
