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
see half an entry. The cache directory is not trusted: an entry that fails to load, holds compressed members, arrays
of another dtype or shape, ids outside the vocabulary, classes outside CLASSES, lengths that do not add up, or whose
checksum does not match is ignored with a one-line note, and rewritten. Small
inputs (one chunk under MIN_CHARS characters) are not cached (tokenizing them is faster than the disk).
IMTUNE_NO_CACHE=1 turns the cache off.
"""
from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import numpy as np

from imtune import files
from imtune.console import say
from imtune.data.tokenize import Encoded, encode
from imtune.files import cache_dir
from imtune.types import CLASS_ID, CLASSES, Rendered, UsageError

FORMAT = 1
MIN_CHARS = 100_000  # below this many characters of rendered text, tokenizing is faster than a cache round trip
MAX_ENTRIES = 1024  # chunks (of <= 16384 examples); the oldest beyond this are removed after each write
KEY_CHUNK = 16384  # examples hashed at a time
DTYPES = {"input_ids": np.int32, "classes": np.int8, "history": np.int8, "lengths": np.int64}  # as encode() makes them

_FINGERPRINTS: dict[int, tuple[object, tuple, str]] = {}  # id(tokenizer) -> (tokenizer, cheap state, fingerprint)
_BOUNDS: dict[int, tuple[object, int, int]] = {}  # id(tokenizer) -> (tokenizer, len(tokenizer), vocab_bound)


def enabled() -> bool:
    return os.environ.get("IMTUNE_NO_CACHE", "") in ("", "0")


def prep_dir() -> Path:
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


def vocab_bound(tokenizer) -> int:
    """One more than the largest id the tokenizer can produce: len(tokenizer), or beyond where added tokens sit past
    the end. Memoised per tokenizer object (get_vocab builds a dict of the whole vocabulary)."""
    hit = _BOUNDS.get(id(tokenizer))
    if hit is not None and hit[0] is tokenizer and hit[1] == len(tokenizer):
        return hit[2]
    bound = max(len(tokenizer), 1 + max(tokenizer.get_vocab().values(), default=-1))
    _BOUNDS[id(tokenizer)] = (tokenizer, len(tokenizer), bound)
    return bound


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


def read(path: Path, n_examples: int, vocab_size: int | None = None) -> Encoded | None:
    """The entry at path, or None when it is absent or does not check out (then a one-line note says why: the
    caller recomputes it). vocab_size: every id must be below it."""
    try:
        arrays, stored = _load(path)
    except FileNotFoundError:
        return None
    except Exception as e:  # a half-written (by a crashed older writer), corrupt or forged file: rebuild
        return _ignored(path, f"unreadable ({type(e).__name__})")
    problem = _problem(arrays, n_examples, vocab_size)
    if problem is None and stored != _checksum(arrays):
        problem = "its checksum does not match"
    return _ignored(path, problem) if problem else Encoded(**arrays)


def _load(path: Path) -> tuple[dict[str, np.ndarray], str]:
    with np.load(path, allow_pickle=False) as z:
        if any(m.compress_type != zipfile.ZIP_STORED for m in z.zip.infolist()):
            raise ValueError("compressed members")  # never written here; and a small file could inflate to any size
        return {k: z[k] for k in DTYPES}, str(z["checksum"])


def _problem(arrays: dict[str, np.ndarray], n_examples: int, vocab_size: int | None) -> str | None:
    """What is wrong with an entry's arrays, or None: the dtypes and shapes encode() makes, lengths that add up to
    the number of tokens, ids in the vocabulary, classes in CLASSES, history flags 0 or 1."""
    for name, dtype in DTYPES.items():
        if arrays[name].dtype != dtype or arrays[name].ndim != 1:
            return f"{name} is {arrays[name].dtype} of shape {arrays[name].shape}, expected 1-d {np.dtype(dtype)}"
    ids, lengths = arrays["input_ids"], arrays["lengths"]
    if len(lengths) != n_examples or ((lengths < 0) | (lengths > len(ids))).any() or int(lengths.sum()) != len(ids):
        return f"lengths do not add up ({len(lengths)} examples, {len(ids)} tokens; expected {n_examples} examples)"
    if not len(ids) == len(arrays["classes"]) == len(arrays["history"]):
        return "input_ids, classes and history differ in length"
    if len(ids) and ids.min() < 0:
        return "negative token ids"
    if len(ids) and vocab_size is not None and ids.max() >= vocab_size:
        return f"token id {ids.max()} beyond the vocabulary of {vocab_size}"
    if len(ids) and not (0 <= arrays["classes"].min() and arrays["classes"].max() < len(CLASSES)):
        return "token classes outside CLASSES"
    if len(ids) and not (0 <= arrays["history"].min() and arrays["history"].max() <= 1):
        return "history flags other than 0 and 1"
    return None


def _ignored(path: Path, why: str) -> None:
    say(f"imtune cache: ignored {path} ({why}); tokenizing again")
    return None


def write(path: Path, e: Encoded) -> None:
    """Write atomically: a temporary file in the same directory, then os.replace (imtune.files.replacing)."""
    arrays = _arrays(e)
    with files.replacing(path) as f:  # the user's cache directory: only the file itself is checked
        np.savez(f, checksum=np.array(_checksum(arrays)), **arrays)
    _prune(path.parent)


def _prune(d: Path) -> None:
    try:
        entries = sorted(d.glob("*.npz"), key=lambda p: p.stat().st_mtime, reverse=True)
        for p in entries[MAX_ENTRIES:]:
            files.remove(p)
    except (OSError, UsageError):  # another process pruning at the same time
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
    e = read(path, len(rendered), vocab_bound(tokenizer))
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
