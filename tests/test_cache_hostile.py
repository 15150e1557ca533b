"""The preparation cache (imtune.data.cache) does not trust its directory: a forged entry — one whose checksum was
recomputed by whoever wrote it, so only the checks on what the arrays hold can catch it — or a broken one is a miss
that is tokenized again, with a one-line note, never believed and never a traceback."""
from __future__ import annotations

import numpy as np
import pytest

from imtune.data import cache
from imtune.data.prepare import prepare_examples
from imtune.data.weights import loss_spec
from imtune.types import Conversation, Message, Where


def convs(n: int = 6) -> list[Conversation]:
    return [Conversation((Message("user", f"What is {i} + {i}?"), Message("assistant", f"{2 * i}, of course.")),
                         Where("m.jsonl", i + 1, i)) for i in range(n)]


def prepare(tok):
    return prepare_examples(convs(), tok, loss_spec("it"), template="tulu")


def as_tuples(prep):
    return [(e.input_ids.tolist(), e.weights.tolist(), e.classes.tolist()) for e in prep.examples]


def forge(arrays: dict, change) -> dict:
    """A copy of an entry's arrays with `change` applied; the caller saves it with a matching checksum."""
    arrays = {k: v.copy() for k, v in arrays.items() if k != "checksum"}
    change(arrays)
    return arrays


def _set(name, index, value):
    def change(a):
        a[name][index] = value
    return change


def _retype(name, dtype):
    def change(a):
        a[name] = a[name].astype(dtype)
    return change


def _negative_length(a):  # the sum still matches the number of tokens
    a["lengths"][0] += a["lengths"][1] + 3
    a["lengths"][1] = -3


FORGERIES = {
    "ids as int64": _retype("input_ids", np.int64),
    "ids as float32": _retype("input_ids", np.float32),
    "ids big-endian": _retype("input_ids", ">i4"),
    "classes as int32": _retype("classes", np.int32),
    "ids 2-d": lambda a: a.update(input_ids=a["input_ids"].reshape(-1, 1)),
    "negative id": _set("input_ids", 0, -5),
    "id beyond the vocabulary": _set("input_ids", 1, 49152 + 7),
    "class outside CLASSES": _set("classes", 2, 9),
    "history flag 2": _set("history", 0, 2),
    "negative length": _negative_length,
}


@pytest.mark.parametrize("name", FORGERIES)
def test_a_forged_entry_with_a_matching_checksum_is_a_miss(tok, cache_dir, capsys, name):
    first = prepare(tok)
    (entry,) = cache_dir.glob("*.npz")
    with np.load(entry) as z:
        arrays = forge({k: z[k] for k in z.files}, FORGERIES[name])
    np.savez(entry, checksum=np.array(cache._checksum(arrays)), **arrays)
    capsys.readouterr()
    again = prepare(tok)
    assert again.cache == "miss" and as_tuples(again) == as_tuples(first)
    notes = [line for line in capsys.readouterr().err.splitlines() if "imtune cache" in line]
    assert len(notes) == 1 and f"ignored {entry}" in notes[0] and "tokenizing again" in notes[0]
    assert prepare(tok).cache == "hit"  # the entry was rewritten


def test_a_compressed_entry_is_refused_unread(tok, cache_dir, capsys):
    """np.savez never compresses; a compressed member could inflate a small file to any size in memory."""
    first = prepare(tok)
    (entry,) = cache_dir.glob("*.npz")
    with np.load(entry) as z:
        arrays = {k: z[k] for k in z.files}
    np.savez_compressed(entry, **arrays)  # the very same arrays and checksum
    again = prepare(tok)
    assert again.cache == "miss" and as_tuples(again) == as_tuples(first)
    assert "ignored" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["half", "not a zip", "npy", "pickle", "empty", "no arrays"])
def test_broken_entries_are_a_miss_with_one_note(tok, cache_dir, capsys, bad, tmp_path):
    import pickle

    first = prepare(tok)
    (entry,) = cache_dir.glob("*.npz")
    good = entry.read_bytes()
    if bad == "npy":
        np.save(tmp_path / "x.npy", np.arange(5))
    content = {"half": good[: len(good) // 2], "not a zip": b"not a zip file", "empty": b"",
               "npy": (tmp_path / "x.npy").read_bytes() if bad == "npy" else b"",
               "pickle": pickle.dumps({"input_ids": [1, 2]}), "no arrays": None}[bad]
    if content is None:
        np.savez(entry, checksum=np.array("x"))
    else:
        entry.write_bytes(content)
    capsys.readouterr()
    again = prepare(tok)
    assert again.cache == "miss" and as_tuples(again) == as_tuples(first)
    notes = [line for line in capsys.readouterr().err.splitlines() if "imtune cache" in line]
    assert len(notes) == 1 and "unreadable" in notes[0]


def test_read_checks_ids_against_the_vocabulary_it_is_given(tok, cache_dir):
    prepare(tok)
    (entry,) = cache_dir.glob("*.npz")
    with np.load(entry) as z:
        top = int(z["input_ids"].max())
    assert cache.read(entry, len(convs()), top + 1) is not None
    assert cache.read(entry, len(convs()), top) is None
    assert cache.read(cache_dir / "absent.npz", 1) is None
    assert cache.vocab_bound(tok) == len(tok) == 49152
