"""A disk cache for the expensive half of data preparation: rendered texts -> token ids and classes.

What is stored is tokenize.Encoded (ids, classes, history flags, lengths) — everything tokenisation produces, before
the loss mode's table, truncation and dropping are applied (weights.weigh, milliseconds). So a second run on unchanged
data never calls the tokenizer, and neither does a second loss mode on the same data (`imtune compare --arms it,im`).

The key is a hash of exactly what the stored arrays depend on:
  - every rendered text and every span (start, end, class, turn): this covers the data file's contents, format,
    fields, limit, skipped records and the template — anything that changes what is tokenized changes the key;
  - the tokenizer: its full backend serialization (vocabulary, merges, normalizer, pre-tokenizer, added tokens) plus
    its class and special-token settings;
  - the --special-tokens-in-content policy (split / keep: whether content that spells a control token is tokenized
    as plain text);
  - FORMAT, the layout version of this file.

One entry holds one chunk of at most tokenize.ENCODE_CHUNK examples (prepare_examples renders and tokenizes that many
at a time, so a million records' texts are never all alive at once), keyed on that chunk alone: a repeated run hits
every chunk, and a change re-tokenizes only the chunks it touches. Entries live in `$IMTUNE_CACHE/prep/<key>.npz`
(uncompressed numpy arrays, no pickle). Writers write a temporary file and os.replace it, so concurrent runs never
see half an entry; an entry that fails to load or whose checksum does not match is ignored (and rewritten). Small
inputs (one chunk under MIN_CHARS characters) are not cached (tokenizing them is faster than the disk).
IMTUNE_NO_CACHE=1 turns the cache off.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

from .tokenize import Encoded, encode
from .types import CLASS_ID, Rendered

FORMAT = 1
MIN_CHARS = 100_000  # below this many characters of rendered text, tokenizing is faster than a cache round trip
MAX_ENTRIES = 1024  # chunks (of <= 16384 examples); the oldest beyond this are removed after each write
KEY_CHUNK = 16384  # examples hashed at a time

_FINGERPRINTS: dict[int, tuple[object, tuple, str]] = {}  # id(tokenizer) -> (tokenizer, cheap state, fingerprint)


def enabled() -> bool:
    return os.environ.get("IMTUNE_NO_CACHE", "") in ("", "0")


def prep_dir() -> Path:
    from .models import cache_dir

    return cache_dir() / "prep"


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides how the tokenizer encodes text. Memoised per tokenizer object (the
    serialization takes ~0.1 s for a 49k vocabulary); recomputed if its size or special tokens change."""
    bk = getattr(tokenizer, "backend_tokenizer", None)
    cheap = (len(tokenizer), repr(getattr(tokenizer, "special_tokens_map", None)),
             bool(getattr(tokenizer, "split_special_tokens", False)))
    hit = _FINGERPRINTS.get(id(tokenizer))
    if hit is not None and hit[0] is tokenizer and hit[1] == cheap:
        return hit[2]
    h = hashlib.sha256()
    h.update(f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}|{cheap}".encode())
    h.update(bk.to_str().encode() if bk is not None else repr(sorted(tokenizer.get_vocab().items())).encode())
    fp = h.hexdigest()
    _FINGERPRINTS[id(tokenizer)] = (tokenizer, cheap, fp)
    return fp


def key(rendered: list[Rendered], tokenizer, policy: str = "split") -> str:
    h = hashlib.sha256(f"imtune-prep-v{FORMAT}|{tokenizer_fingerprint(tokenizer)}|{policy}|{len(rendered)}|".encode())
    # Texts with their lengths (so no separator can be forged by content), then all spans as one int64 array.
    h.update(np.fromiter((len(r.text) for r in rendered), dtype=np.int64, count=len(rendered)).tobytes())
    # The same bytes as hashing all texts joined, then all spans as one array, fed KEY_CHUNK examples at a time (a
    # million records' span tuples at once cost ~0.5 GB).
    for a in range(0, len(rendered), KEY_CHUNK):
        h.update("".join(r.text for r in rendered[a:a + KEY_CHUNK]).encode("utf-8", "surrogatepass"))
    for a in range(0, len(rendered), KEY_CHUNK):
        spans = [(k, s.start, s.end, CLASS_ID[s.cls], s.turn)
                 for k, r in enumerate(rendered[a:a + KEY_CHUNK], start=a) for s in r.spans]
        h.update(np.asarray(spans, dtype=np.int64).reshape(-1, 5).tobytes())
    return h.hexdigest()


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _arrays(e: Encoded) -> dict[str, np.ndarray]:
    return {"input_ids": e.input_ids, "classes": e.classes, "history": e.history, "lengths": e.lengths}


def read(path: Path, n_examples: int) -> Encoded | None:
    """The entry at path, or None when it is absent, unreadable, truncated or does not check out."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("input_ids", "classes", "history", "lengths")}
            stored = str(z["checksum"])
    except Exception:  # a missing, half-written (by a crashed older writer) or corrupt file: rebuild
        return None
    e = Encoded(**arrays)
    n = int(e.lengths.sum()) if e.lengths.size else 0
    if (len(e.lengths) != n_examples or not (len(e.input_ids) == len(e.classes) == len(e.history) == n)
            or stored != _checksum(arrays)):
        return None
    return e


def write(path: Path, e: Encoded) -> None:
    """Write atomically: a temporary file in the same directory, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = _arrays(e)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, checksum=np.array(_checksum(arrays)), **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _prune(path.parent)


def _prune(d: Path) -> None:
    try:
        entries = sorted(d.glob("*.npz"), key=lambda p: p.stat().st_mtime, reverse=True)
        for p in entries[MAX_ENTRIES:]:
            p.unlink(missing_ok=True)
    except OSError:  # another process pruning at the same time
        pass


def encode_cached(rendered: list[Rendered], tokenizer, use_cache: bool = True,
                  split: dict[int, list[tuple[int, int]]] | None = None, policy: str = "split",
                  part: bool = False) -> tuple[Encoded, str]:
    """tokenize.encode(rendered, tokenizer, split), through the disk cache. Returns (encoded, "hit" | "miss" | "off").
    `split` follows from the texts, the tokenizer and `policy` (tokenize.content_policy), so the key holds the
    policy. part: `rendered` is one chunk of a larger input, cached however small (so a hit tokenizes nothing)."""
    if not (use_cache and enabled()) or (not part and sum(len(r.text) for r in rendered) < MIN_CHARS):
        return encode(rendered, tokenizer, split), "off"
    path = prep_dir() / f"{key(rendered, tokenizer, policy)}.npz"
    e = read(path, len(rendered))
    if e is not None:
        try:
            os.utime(path)  # recently used entries survive pruning
        except OSError:
            pass
        return e, "hit"
    e = encode(rendered, tokenizer, split)
    try:
        write(path, e)
    except OSError:  # a read-only or full cache directory never stops a run
        pass
    return e, "miss"
