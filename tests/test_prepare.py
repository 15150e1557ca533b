"""Data preparation at scale (issue 14 item 6): a record too long to ever fit is a `path:line` problem found before
the tokenizer sees it, and memory stays bounded on many records (measured in a subprocess, peak RSS)."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from imtune.cli import main
from imtune.data import tokenize
from imtune.data.prepare import chars_per_token, prepare_examples
from imtune.data.weights import loss_spec

LONG_WORDS = 40_000  # 200k characters: tokenizes fine, but cannot fit 64 tokens


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture
def long_file(tmp_path):
    return _write(tmp_path / "long.jsonl", [{"instruction": "Hi.", "output": "Hello."},
                                            {"instruction": "Read: " + "word " * LONG_WORDS, "output": "Done."},
                                            {"instruction": "Bye.", "output": "Goodbye."}])


@pytest.fixture
def seen(monkeypatch):
    """The length of the longest text the tokenizer was given."""
    longest = [0]
    real = tokenize._batch_encode

    def spy(texts, tokenizer, **kw):
        longest[0] = max([longest[0], *map(len, texts)])
        return real(texts, tokenizer, **kw)

    monkeypatch.setattr(tokenize, "_batch_encode", spy)
    return longest


def test_a_record_too_long_to_fit_is_dropped_before_tokenizing(tok, long_file, seen):
    prep = prepare_examples(long_file, tok, loss_spec("it"), max_length=64, cache=False)
    assert [str(p).split(": ")[0] for p in prep.report.dropped_unfit] == [f"{long_file}:2"]
    assert "cannot fit in --max-length 64 tokens" in str(prep.report.dropped_unfit[0])
    assert [e.source.line for e in prep.examples] == [1, 3] and prep.report.n_in == 3
    assert 0 < seen[0] <= 64 * chars_per_token(tok)  # the long text never reached the tokenizer
    assert f"first too long: {long_file}:2" in prep.summary()


def test_truncate_cuts_the_text_first_and_keeps_the_same_first_tokens(tok, long_file, seen):
    prep = prepare_examples(long_file, tok, loss_spec("im"), max_length=64, truncation="truncate", cache=False)
    ex = {e.source.line: e for e in prep.examples}[2]
    assert ex.truncated and len(ex) == 64 and not prep.report.dropped_unfit
    assert seen[0] <= 64 * chars_per_token(tok)
    whole = prep.renderer.render(next(c for c in prep.conversations if c.source.line == 2)).text
    assert ex.input_ids.tolist() == tok(whole, add_special_tokens=False)["input_ids"][:64]


def test_inspect_names_the_long_record(long_file, capsys):
    assert main(["inspect", long_file, "--max-length", "64", "--color", "never"]) == 0
    assert f"first too long: {long_file}:2" in capsys.readouterr().err


def test_inspect_reads_only_the_records_it_shows(tmp_path, capsys):
    """--limit 3 streams three records: a broken line further on is never reached."""
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"q{i}", "output": "a"}) + "\n" for i in range(5))
                    + "{broken\n", encoding="utf-8")
    assert main(["inspect", str(path), "--limit", "3", "--color", "never"]) == 0
    assert "── example 2" in capsys.readouterr().out


N_SMALL, N_BIG = 1_000, 20_000


def _peak_rss_mb(args: list[str], cwd) -> float:
    """Peak RSS of `python -m imtune ARGS` in a fresh child (ru_maxrss of the children waited for, in MB)."""
    code = textwrap.dedent(f"""
        import resource, subprocess, sys
        p = subprocess.run([sys.executable, "-m", "imtune", *{args!r}], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-2000:]
        print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd,
                         env={**os.environ, "IMTUNE_NO_CACHE": "1"}, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return float(out.stdout.split()[-1])


def test_data_stats_memory_grows_by_well_under_2kb_a_record(tmp_path):
    """The goal is 1M records in <= 2 GB; proportionally, each record may add at most 2 KB (20k records: 38 MB over a
    1k-record run) (before the fix: ~15 KB a record, 3.0 GB at 200k)."""
    for n in (N_SMALL, N_BIG):
        _write(tmp_path / f"r{n}.jsonl", ({"instruction": f"Say {i} twice", "output": f"{i} {i}"} for i in range(n)))
    stats = ["data", "stats", "--json", "--template", "tulu"]
    small = _peak_rss_mb([*stats, str(tmp_path / f"r{N_SMALL}.jsonl")], tmp_path)
    big = _peak_rss_mb([*stats, str(tmp_path / f"r{N_BIG}.jsonl")], tmp_path)
    per_record_kb = (big - small) * 1024 / (N_BIG - N_SMALL)
    assert per_record_kb < 2.0, f"peak RSS {small:.0f} MB -> {big:.0f} MB: {per_record_kb:.1f} KB a record"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > 0


def small_conversations(n: int):
    from imtune.types import Conversation, Message, Where

    return [Conversation((Message("user", f"Say {i} twice"), Message("assistant", f"{i} {i}")),
                         Where("s.jsonl", i + 1, i)) for i in range(n)]


def test_prepared_examples_hold_a_few_bytes_a_token(tok):
    """1M small records must prepare in <= 2 GB (issue 14): the examples are flat numpy arrays (types.Examples,
    13 bytes a token + ~17 an example). Measured with tracemalloc as everything the prepared examples keep alive.
    Per-token Python lists (~24 bytes a token + ~240 an example) or a numpy array per example (~110 bytes of header
    each, x3) exceed the bound: this test fails on either."""
    import gc
    import tracemalloc

    convs, spec = small_conversations(2000), loss_spec("it")
    prepare_examples(convs, tok, spec, template="tulu", cache=False)  # warm-up: memoised patterns and bounds
    gc.collect()
    tracemalloc.start()
    try:
        examples = prepare_examples(convs, tok, spec, template="tulu", cache=False).examples
        gc.collect()
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    n_tokens, n = int(examples.bounds[-1]), len(examples)
    assert n == 2000 and n_tokens > 20 * n
    assert all(isinstance(a, np.ndarray) for a in (examples.input_ids, examples.weights, examples.classes))
    assert held < 16 * n_tokens + 64 * n, f"{held / n_tokens:.1f} bytes a token ({held / n:.0f} an example)"


def test_examples_index_slice_and_select_agree(tok):
    """Examples[k] (a view), slices and select give the same tokens as the flat arrays; Examples.of round-trips."""
    from imtune.types import Examples

    ex = prepare_examples(small_conversations(7), tok, loss_spec("im"), template="tulu", cache=False).examples
    rows = [(e.input_ids.tolist(), e.weights.tolist(), e.classes.tolist(), e.source) for e in ex]
    assert len(rows) == 7 and sum(len(r[0]) for r in rows) == len(ex.input_ids)
    picked = ex.select([5, 0, 5])
    assert [(e.input_ids.tolist(), e.weights.tolist(), e.classes.tolist(), e.source) for e in picked] == \
        [rows[5], rows[0], rows[5]]
    assert [e.source for e in ex[2:4]] == [rows[2][3], rows[3][3]] and ex[-1].source == rows[6][3]
    again = Examples.of(list(ex))
    assert again.input_ids.dtype == np.int32 and again.weights.dtype == np.float64
    assert all((getattr(again, f) == getattr(ex, f)).all() for f in ("input_ids", "weights", "classes", "bounds"))
    with pytest.raises(IndexError):
        ex[7]


def test_sources_are_arrays_that_give_back_each_where():
    """Examples.sources holds paths, lines and indices as arrays (a million Where objects would keep the
    conversations' memory pinned, see Sources); each sources[k] is the Where the record was read with."""
    from imtune.types import Examples, Sources, Where

    wheres = [Where("a.jsonl", 3, 2), Where("b.jsonl", 1, 0), Where("a.jsonl", 9, 7)]
    src = Sources.of(wheres)
    assert src.paths == ("a.jsonl", "b.jsonl") and src.lines.dtype == np.int64 and Sources.of(src) is src
    assert list(src) == wheres and src == wheres and src == tuple(wheres) and src != wheres[:2]
    assert src[-1] == wheres[2] and src[1:] == wheres[1:] and src.select([2, 0]) == [wheres[2], wheres[0]]
    assert str(src[0]) == "a.jsonl:3" and "3 examples" in repr(src)
    with pytest.raises(IndexError):
        src[3]
    ex = Examples(np.zeros(3, np.int32), np.ones(3), np.zeros(3, np.int8), np.array([0, 1, 2, 3]), wheres,
                  np.zeros(3, bool))
    assert isinstance(ex.sources, Sources) and [e.source for e in ex] == wheres


def _live_conversations(path: str) -> int:
    """Conversation objects still alive that were read from `path`."""
    import gc

    from imtune.types import Conversation

    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is Conversation and str(o.source.path) == path)


def _live_wheres(path: str) -> int:
    """Where objects alive that name `path`."""
    import gc

    from imtune.types import Where

    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is Where and str(o.path) == path)


def test_release_keeps_only_the_picked_conversations_and_the_counts(tok, tmp_path):
    from helpers import write_conversations

    data = write_conversations(tmp_path / "d.jsonl", 12)
    prep = prepare_examples(data, tok, loss_spec("it"), cache=False)
    note, everyone = prep.system_note(), list(prep.conversations)
    assert note["line"] and prep.records_loaded == 12
    picked = prep.release([7, 2, 9])
    assert [c.source for c in picked] == [prep.examples.sources[k] for k in (7, 2, 9)]
    assert picked == [everyone[7], everyone[2], everyone[9]] and prep.conversations == []
    assert prep.system_note() == note and prep.records_loaded == 12  # counts, not the objects
    del everyone, picked
    assert _live_conversations(data) == 0
    assert _live_wheres(data) == 0  # the examples' sources are arrays: nothing pins the conversations' memory


@pytest.mark.parametrize("eval_every", [None, 1])
def test_training_lets_the_conversations_go_before_the_model_is_built(tmp_path, monkeypatch, eval_every):
    """Training holds the examples, not the Python conversations of every record (~0.5 KB a record): by the time
    the model is built, none read from the data is alive (the train sample is prepared and let go too)."""
    from helpers import tiny, write_conversations
    from imtune.train import loop as train

    data = write_conversations(tmp_path / "d.jsonl", 24)
    alive, build = [], train.build_model
    monkeypatch.setattr(train, "build_model",
                        lambda *a: alive.append((_live_conversations(data), _live_wheres(data))) or build(*a))
    run = train.setup(tiny(data, tmp_path / "run", max_steps=1, eval_every=eval_every, eval_train_sample=4))
    assert alive == [(0, 0)]
    assert json.loads((tmp_path / "run" / "data_stats.json").read_text())["records_loaded"] == 24
    if eval_every:
        assert len(run.eval_sets["train"][0]) == 4


def _live_rendered(path: str) -> int:
    """Rendered objects alive that were rendered from records read from `path`."""
    import gc

    from imtune.types import Rendered

    return sum(1 for o in gc.get_objects() if type(o) is Rendered and str(o.source.path) == path)


def test_only_one_chunk_of_rendered_texts_is_alive_while_tokenizing(tok, tmp_path, monkeypatch):
    """Conversations are rendered and tokenized ENCODE_CHUNK at a time: whenever the tokenizer runs, the rendered
    texts of its own chunk only are alive (all of a million records' at once cost ~0.5 GB; issue 14 item 6)."""
    from helpers import write_conversations

    data = write_conversations(tmp_path / "d.jsonl", 23)
    whole = prepare_examples(data, tok, loss_spec("im"), cache=False)
    monkeypatch.setattr(tokenize, "ENCODE_CHUNK", 5)
    alive, real = [], tokenize._batch_encode

    def spy(texts, tokenizer, **kw):
        alive.append(_live_rendered(data))
        return real(texts, tokenizer, **kw)

    monkeypatch.setattr(tokenize, "_batch_encode", spy)
    chunked = prepare_examples(data, tok, loss_spec("im"), cache=False)
    assert alive == [5, 5, 5, 5, 3]
    assert all((getattr(chunked.examples, f) == getattr(whole.examples, f)).all()
               for f in ("input_ids", "weights", "classes", "bounds", "truncated"))
    assert chunked.examples.sources == whole.examples.sources and chunked.summary() == whole.summary()


@pytest.mark.parametrize("policy", ["split", "keep", "error"])
def test_chunks_give_the_same_examples_reports_and_refusals(tok, tmp_path, monkeypatch, policy):
    """Records dropped before tokenizing and content that spells control tokens, spread over several chunks: the
    examples and the report equal one chunk's; --special-tokens-in-content error counts every chunk's."""
    from imtune.types import DataError

    rows = [{"instruction": f"Say {i}" + (" <|im_end|>" if i % 4 == 1 else ""), "output": f"{i} {i}"}
            for i in range(14)]
    rows[6]["instruction"] = "Read: " + "word " * LONG_WORDS
    data = _write(tmp_path / "mixed.jsonl", rows)

    def run():
        return prepare_examples(data, tok, loss_spec("im"), max_length=64, cache=False,
                                special_tokens_in_content=policy)

    if policy == "error":
        with pytest.raises(DataError) as whole:
            run()
        monkeypatch.setattr(tokenize, "ENCODE_CHUNK", 4)
        with pytest.raises(DataError) as chunked:
            run()
        assert str(chunked.value) == str(whole.value) and chunked.value.total == whole.value.total == 4
        return
    whole = run()
    monkeypatch.setattr(tokenize, "ENCODE_CHUNK", 4)
    chunked = run()
    assert len(whole.examples) == 13 and len(whole.report.content_specials) == 4
    assert all((getattr(chunked.examples, f) == getattr(whole.examples, f)).all()
               for f in ("input_ids", "weights", "classes", "bounds", "truncated"))
    assert chunked.examples.sources == whole.examples.sources
    assert chunked.report.as_dict() == whole.report.as_dict() and chunked.summary() == whole.summary()


def test_the_system_prompts_share_is_of_the_examples_kept(tok, tmp_path):
    """The template's default system prompt goes into every record without one; its share of the tokens counts
    those of the examples kept only (records dropped as too long have no tokens in the total)."""
    import json

    short = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    long = {"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]}
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in (long, short, long)))
    prep = prepare_examples(str(data), tok, loss_spec("it"), cache=False, max_length=64)
    note = prep.system_note()
    assert len(prep.examples) == 1 and note["examples"] == 3
    assert note["share"] == pytest.approx(note["tokens_each"] / len(prep.examples[0].input_ids))
